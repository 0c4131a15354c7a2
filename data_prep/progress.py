"""The progress bar of a data-prep job: one tqdm bar over all work units, fed by ``(advance, counters)`` events that
units send from this process (``BarQueue``), from pool workers (a queue that ``drain_events`` empties) or, for a
SLURM array, as each task finishes.
"""

from __future__ import annotations

import queue as queue_lib
import sys
import threading
import time

from tqdm.auto import tqdm


class ProgressBar:
    """One tqdm bar over all units, fed by (advance, counters) events from any process."""

    def __init__(self, total: int, unit: str, enabled: bool):
        self.bar = tqdm(total=total, unit=unit, unit_scale=True, desc="data prep", disable=not enabled,
                        dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
        self.counters: dict[str, int] = {}
        self.start = time.perf_counter()

    def __call__(self, advance: int = 0, **counters: int) -> None:
        for k, v in counters.items():
            self.counters[k] = self.counters.get(k, 0) + v
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix({f"{k}/s": f"{v / elapsed:,.0f}" for k, v in self.counters.items()}, refresh=False)
        self.bar.update(advance)

    def close(self) -> None:
        self.bar.close()


def drain_events(events, bar: ProgressBar, stop: threading.Event) -> None:
    """Feed the pool workers' events to the bar until ``stop`` is set and the queue is empty (a thread's loop)."""
    while not stop.is_set() or not events.empty():
        try:
            advance, counters = events.get(timeout=0.2)
        except queue_lib.Empty:
            continue
        bar(advance, **counters)


class BarQueue:
    """The ``events.put`` of the in-process path: straight into the bar."""

    def __init__(self, bar: ProgressBar):
        self.bar = bar

    def put(self, item) -> None:
        advance, counters = item
        self.bar(advance, **counters)
