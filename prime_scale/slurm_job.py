"""The training job as SLURM runs it (submitted by ``python -m prime_scale.launch.slurm``
through submitit).

Every task of the job calls ``TrainJob.__call__``: rank, local rank, world size and the rendezvous come from
``submitit.JobEnvironment`` (via ``submitit.helpers.TorchDistributedEnvironment``), then the engine trains. There is
no torchrun: each SLURM task is one rank, and SLURM signals every task itself.

Two signals stop a job, and in both cases every rank saves before anything else happens. The engine's handler
(``run_context.StopFlag``) takes SIGTERM, SIGUSR1 and SIGUSR2 (and SIGINT) on every rank and only sets a flag; the ranks agree on it
at the next optimizer-step boundary, save together (a DeepSpeed save is a collective that needs every rank, so it
cannot run in submitit's handler, which calls ``checkpoint()`` on global rank 0 alone, in the middle of whatever
that rank was doing) and the engine returns EXIT_RESUMABLE (75). The ranks other than 0 then exit without a
submitit result (a result file tells submitit's client that the job is over, while it may only be requeued), and
rank 0 decides:

* SIGUSR2 (or SIGUSR1): ``--signal=USR2@delay``, the launcher's ``--signal-delay-s`` seconds before the time
  limit, or ``scancel --signal=USR2 JOBID`` by hand. Rank 0 hands it to submitit's handler, which calls
  ``checkpoint()`` (only returning the resubmission), requeues the job (``scontrol requeue``) and exits. The save
  must fit into the signal delay, or the time limit's SIGTERM/SIGKILL comes first.
* SIGTERM from a preemption (PreemptMode=REQUEUE): SLURM sends SIGCONT+SIGTERM to every task, lets it run for the
  partition's (or QOS's) GraceTime, then kills it (SIGTERM, KillWait, SIGKILL) and requeues it. Rank 0 asks SLURM
  (``scontrol show job``: PreemptTime is set) and requeues the job at once through the same submitit handler: SLURM
  22.05 does *not* requeue a preempted job whose tasks exit by themselves within GraceTime (it ends COMPLETED or
  FAILED), and waiting out the grace period would hold the preemptor's nodes for nothing. The save (the rest of the
  current step, then the checkpoint) must fit into GraceTime. A partition whose PreemptMode is CANCEL, or a job
  that may not be requeued (``Requeue=0``), ends instead; so does a job after ``max_requeues`` restarts.
* SIGTERM without a preemption (``scancel JOBID``, the time limit without the USR2 before it, a node shut down):
  the job ends; rank 0 records a submitit error that says so. The checkpoint stays: the same launcher command
  submits a job that resumes from it. When SLURM cannot be asked, rank 0 waits for SLURM to end the
  step, which then requeues a preempted job itself after GraceTime.

What makes a save fit: a stop costs the rest of the current optimizer step plus one checkpoint save (every rank
writes its shard, rank 0 commits). For a preemption that must be shorter than GraceTime, a cluster setting
(``scontrol show partition NAME``; per QOS with preempt/qos); for the time limit, shorter than
``--signal-delay-s`` (default 120 s), which the launcher sets; for ``scancel``, shorter than KillWait (default
30 s). When it is not, SIGKILL comes first and the job resumes from its last periodic save
(``ckpt.every_steps``, ``ckpt.every_minutes``).

A signal that arrives before training starts (imports, DeepSpeed set-up) meets submitit's handlers: USR2 requeues
at once (there is nothing to save yet), SIGTERM is only logged ("Bypassing signal SIGTERM"). The requeued job
starts again with the same job id (``SLURM_RESTART_COUNT`` + 1, after SLURM's delay of about two minutes), the
engine resumes from the latest checkpoint (``ckpt.resume=auto``), and each start is logged in the task-0 log and in
``runs/NAME/restarts.jsonl``. ``max_requeues`` bounds how often the job requeues itself. See docs/launching.md.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import submitit
from submitit.core.utils import UncompletedJobError

from prime_scale.cli import EXIT_RESUMABLE
from prime_scale.launch.slurm_tools import slurm_preemption
from prime_scale.run_paths import RunPaths

# How long rank 0 waits for SLURM to end a step after a SIGTERM it could not classify (slurmctld unreachable).
_WAIT_FOR_SLURM_S = 15 * 60


class TrainJob(submitit.helpers.Checkpointable):
    def __init__(self, overrides: list[str], max_requeues: int = 20):
        self.overrides = list(overrides)
        self.max_requeues = max_requeues

    def __call__(self) -> dict:
        from prime_scale import engine
        from prime_scale.config import load_config
        from prime_scale.run_context import StopFlag

        env = submitit.JobEnvironment()
        # A result file of an earlier start of this job id (it ended, then SLURM requeued it anyway) would make
        # submitit's client take this start as finished: this start writes its own.
        env.paths.result_pickle.unlink(missing_ok=True)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        cfg = load_config(self.overrides)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if env.global_rank == 0:
            print(f"[prime_scale] SLURM job {env.job_id}: {env.num_tasks} tasks on {env.num_nodes} node(s), "
                  f"start {restarts + 1} (restarts so far: {restarts}, at most {self.max_requeues})", flush=True)
            _append_restart_log(cfg, env, restarts)
        stop = StopFlag()
        summary = engine.train(cfg, stop)
        if summary["exit_code"] == EXIT_RESUMABLE:
            self._after_save(env, stop, summary)  # requeues and exits, or ends the job
        return summary

    def _after_save(self, env, stop, summary: dict) -> None:
        """Every rank has saved and the engine stopped on ``stop.signum``: requeue or end, without a result file."""
        signum = int(stop.signum)
        handler = stop.previous(signal.SIGUSR2)  # submitit's: checkpoint(), scontrol requeue, exit
        if not callable(handler):  # not started by submitit (no requeue machinery): a plain return
            return
        if env.global_rank != 0:
            sys.exit(0)  # rank 0 requeues (or not); 0, so that srun's --kill-on-bad-exit cannot kill it first
        if signum in (signal.SIGUSR1, signal.SIGUSR2):
            handler(signum, None)  # exits (requeued) or raises UncompletedJobError (not requeued)
            return
        preemption = slurm_preemption(env.job_id)
        name = signal.Signals(signum).name
        if preemption is None:
            print(f"[prime_scale] {name} at step {summary['step']}, saved; SLURM cannot be asked whether this is a "
                  "preemption: waiting for SLURM to end the step (it requeues a preempted job after GraceTime)",
                  flush=True)
            time.sleep(_WAIT_FOR_SLURM_S)
            raise UncompletedJobError(
                f"stopped by {name} at step {summary['step']} (saved); SLURM did not end the job within "
                f"{_WAIT_FOR_SLURM_S} s; submit the same command again to resume")
        if preemption["preempted"] and preemption["requeue"]:
            print(f"[prime_scale] preempted by SLURM ({name}, PreemptTime {preemption['preempt_time']}, partition "
                  f"{preemption['partition']} PreemptMode={preemption['mode'] or '?'}): saved at step "
                  f"{summary['step']}; requeuing job {env.job_id}", flush=True)
            handler(signum, None)  # as for USR2: checkpoint() (max_requeues), scontrol requeue, exit
            return
        why = (f"preempted, but not requeued by SLURM (partition {preemption['partition']} PreemptMode="
               f"{preemption['mode']}, job Requeue={preemption['requeue_flag']})" if preemption["preempted"] else
               f"not a preemption (JobState={preemption['state']}: scancel, the time limit or a node going down)")
        message = (f"stopped by {name} at step {summary['step']}, {why}: the job ends here; the checkpoint stays, "
                   "and the same launcher command (python -m prime_scale.launch.slurm) resumes from it")
        print(f"[prime_scale] {message}", flush=True)
        raise UncompletedJobError(message)

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
    paths = RunPaths.of(cfg)
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.restarts, "a") as f:
        f.write(json.dumps({"time": time.time(), "job_id": env.job_id, "restart": restarts,
                            "hosts": env.hostnames, "tasks": env.num_tasks}) + "\n")
