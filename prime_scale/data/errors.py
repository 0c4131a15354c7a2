"""What goes wrong reading raw inputs, for data prep and the library's readers alike.

An input that cannot be used at all stops the job: ``DataPrepError`` (refused before any work unit ran; exit status
2) or ``DataPrepFailure`` (a unit failed or vanished; exit status 1). A single document or image that cannot be
used is left out and counted by reason in a ``SkipLog``, which the dataset's manifest keeps.
"""

from __future__ import annotations

import logging

log = logging.getLogger("data_prep")  # the skips are reported as data prep's, whichever reader finds them

# How many examples of each skip reason a manifest keeps (the counts are always complete).
SKIP_EXAMPLES = 5


class DataPrepError(RuntimeError):
    """A data-prep job that cannot start: a bad input path, an unknown dataset, a tokenizer it cannot use, another
    dataset at data.path, ... (exit status 2: nothing was prepared)."""


class DataPrepFailure(DataPrepError):
    """A job that started and did not finish: a work unit that failed or vanished (exit status 1; the finished
    units stand, and running the same command again redoes the rest)."""


class SkipLog:
    """Counts of skipped inputs by reason, with the first few examples of each."""

    def __init__(self, quiet: bool = False) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self.quiet = quiet

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < SKIP_EXAMPLES:
            examples.append(where)
            if not self.quiet:
                log.warning("skipped %s: %s", where, reason)

    def as_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "examples": dict(sorted(self.examples.items()))}

    @staticmethod
    def merge(parts: list[dict]) -> dict:
        total = SkipLog()
        for part in parts:
            for reason, n in part["counts"].items():
                total.counts[reason] = total.counts.get(reason, 0) + n
            for reason, examples in part["examples"].items():
                kept = total.examples.setdefault(reason, [])
                kept.extend(examples[: SKIP_EXAMPLES - len(kept)])
        return total.as_dict()
