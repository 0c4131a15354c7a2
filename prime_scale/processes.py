"""Process lifetimes: a child that dies with its parent.

``launchers/local.py`` starts torchrun, and torchrun starts one process per rank, each in a session of its own.
If the launcher or torchrun is killed without a chance to clean up (SIGKILL, the OOM killer), nothing tells those
children, and they would train on, detached, writing the run's checkpoints. Linux's parent-death signal
(``prctl(PR_SET_PDEATHSIG)``) closes that hole: the kernel sends SIGKILL to the child the moment its parent exits,
before the child can touch the checkpoint pointer again. Elsewhere a watchdog thread polls the parent's pid.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1
EXIT_ORPHANED = 70  # (watchdog only: with prctl the kernel's SIGKILL ends the process)


def _set_parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def kill_with_parent() -> None:
    """For ``subprocess.Popen(preexec_fn=...)``: the child (after exec too) gets SIGKILL when this process dies."""
    _set_parent_death_signal(signal.SIGKILL)


def die_with_parent(poll_s: float = 1.0) -> None:
    """This process ends as soon as its parent does: SIGKILL from the kernel on Linux, else a watchdog thread that
    exits (status 70) within ``poll_s`` of noticing the parent gone. Call it first thing in a process entry point
    whose parent supervises it (a torchrun worker); it changes this process for the rest of its life."""
    parent = os.getppid()
    armed = _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(EXIT_ORPHANED)
    if armed:
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="prime-parent-watchdog", daemon=True).start()
