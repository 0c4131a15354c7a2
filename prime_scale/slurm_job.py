"""The training job as SLURM runs it (submitted by launchers/slurm.py through submitit).

Every task of the job calls ``TrainJob.__call__``: rank, local rank, world size and the rendezvous come from
``submitit.JobEnvironment`` (via ``submitit.helpers.TorchDistributedEnvironment``), then the engine trains.

Preemption and time limits: SLURM sends SIGUSR2 to every task (``--signal=USR2@delay``). submitit's own handler
would call ``checkpoint()`` on global rank 0 alone, in the middle of whatever that rank was doing; a DeepSpeed save
is a collective, so it cannot run there. Instead the engine's handler takes the signal on every rank, the ranks
agree at the next step boundary and save together, and the engine returns EXIT_RESUMABLE. Rank 0 then hands the
signal to submitit's handler, which calls ``checkpoint()`` — now only returning the resubmission — requeues the
job and exits. The requeued job starts again, and the engine resumes from the latest checkpoint
(``ckpt.resume=auto``). ``max_requeues`` bounds how often that happens.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import submitit


class TrainJob(submitit.helpers.Checkpointable):
    def __init__(self, overrides: list[str], max_requeues: int = 20):
        self.overrides = list(overrides)
        self.max_requeues = max_requeues

    def __call__(self) -> dict:
        from prime_scale import engine
        from prime_scale.config import load_config

        env = submitit.JobEnvironment()
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        cfg = load_config(self.overrides)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if env.global_rank == 0:
            print(f"[prime_scale] SLURM job {env.job_id}: {env.num_tasks} tasks on {env.num_nodes} node(s), "
                  f"start {restarts + 1} (restarts so far: {restarts}, at most {self.max_requeues})", flush=True)
            _append_restart_log(cfg, env, restarts)
        stop = engine.StopFlag()
        summary = engine.train(cfg, stop)
        if summary["exit_code"] == engine.EXIT_RESUMABLE and env.global_rank == 0:
            # the save is done on every rank: now let submitit requeue (it calls checkpoint() and exits)
            handler = stop.previous(signal.SIGUSR2)
            if callable(handler):
                handler(signal.SIGUSR2, None)
        return summary

    def checkpoint(self) -> submitit.helpers.DelayedSubmission | None:
        """Called by submitit on global rank 0 only: no collective may happen here, and none does — the engine
        saved on every rank already. Returns the resubmission (the same job; it resumes from its checkpoint)."""
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts >= self.max_requeues:
            print(f"[prime_scale] not requeuing: {restarts} restarts reached max_requeues={self.max_requeues}; "
                  "the latest checkpoint is kept, submit again to continue", flush=True)
            return None
        return submitit.helpers.DelayedSubmission(TrainJob(self.overrides, self.max_requeues))


def _append_restart_log(cfg, env, restarts: int) -> None:
    """One JSON line per (re)start in the run folder: when, which job, which restart."""
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "restarts.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), "job_id": env.job_id, "restart": restarts,
                            "hosts": env.hostnames, "tasks": env.num_tasks}) + "\n")
