"""The sweep on SLURM: ``SweepJob``, a point as a task of the sweep's job array, and ``slurm.json``, the sweep
folder's record of its submissions (which array task trains which point), which ``live_tasks`` checks against
squeue."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import fsspec
import submitit

from prime_scale.launch.slurm_tools import squeue_states
from prime_scale.slurm_job import TrainJob
from prime_scale.storage import write_json
from prime_scale.sweep.points import Point
from prime_scale.sweep.state import mark_failed, mark_finished, record_attempt

SLURM_STATE = "slurm.json"


def record_submission(folder: Path, array_id: str, logs: Path, tasks: dict[str, str]) -> Path:
    """Add a submitted job array to ``folder/slurm.json`` (``tasks``: point id -> array task id); returns its path."""
    path = folder / SLURM_STATE
    state = json.loads(path.read_text()) if path.is_file() else {"submissions": []}
    state["submissions"].append({"array_job_id": array_id, "time": time.time(), "logs": str(logs), "tasks": tasks})
    write_json(fsspec.filesystem("file"), str(path), state)
    return path


def live_tasks(folder: Path) -> Optional[dict[str, str]]:
    """{point id: queued | running} for points whose task of a submission is still in SLURM; None when squeue
    cannot tell."""
    path = folder / SLURM_STATE
    if not path.is_file():
        return {}
    tasks: dict[str, str] = {}
    for sub in json.loads(path.read_text()).get("submissions", []):
        tasks.update(sub.get("tasks", {}))
    states = squeue_states(list(tasks.values()))
    if states is None:
        return None
    out = {}
    for pid, job in tasks.items():
        st = states.get(job)
        if st:
            out[pid] = "running" if st in ("running", "completing") else "queued"
    return out


class SweepJob(TrainJob):
    """A point as a SLURM array task: ``TrainJob`` (save-and-requeue on SIGUSR2, resume from the checkpoint) that
    also records its wall time and, on rank 0 after a complete run, the point's ``done.json``."""

    def __init__(self, point: Point, max_requeues: int = 20):
        super().__init__(list(point.overrides), max_requeues)
        self.point = point
        self._start = time.time()

    def __call__(self) -> dict:
        self._start = time.time()
        env = submitit.JobEnvironment()
        where = f"slurm:{env.job_id}"
        try:
            summary = super().__call__()
        except Exception as e:
            if env.global_rank == 0:
                record_attempt(self.point.run_dir, time.time() - self._start, 1, where)
                mark_failed(self.point, 1, f"{type(e).__name__}: {e} (log: the task's SLURM log)", where)
            raise
        if summary.get("rank", 0) == 0:
            record_attempt(self.point.run_dir, time.time() - self._start, summary["exit_code"], where)
            if summary["exit_code"] == 0:
                state = mark_finished(self.point, where)
                summary = {**summary, "sweep_status": state.status, "loss": state.loss}
        return summary

    def checkpoint(self):
        """Rank 0, after every rank saved: record this attempt, then requeue as a SweepJob again."""
        resubmit = super().checkpoint()
        record_attempt(self.point.run_dir, time.time() - self._start, 75,
                       f"slurm:{submitit.JobEnvironment().job_id} (preempted)")
        if resubmit is None:
            return None
        return submitit.helpers.DelayedSubmission(SweepJob(self.point, self.max_requeues))
