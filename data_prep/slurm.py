"""A data-prep job's work units as a SLURM job array (``--slurm``), through submitit: one array task per unit, the
finished ones collected as they end, and a task that leaves the queue without a result (watched with squeue)
reported as failed.
"""

from __future__ import annotations

import posixpath
import time

from data_prep.job import Job, run_one_unit
from data_prep.progress import ProgressBar
from prime_scale.data.errors import DataPrepError, DataPrepFailure
from prime_scale.launch.slurm_tools import SlurmOptions, make_executor, squeue_states

# Where and how the units run as a SLURM job array (``--slurm``): the SLURM options every submission shares
# (prime_scale/launch/slurm_tools.py), with data prep's defaults: small tasks, 16 at once.
SLURM_DEFAULTS = SlurmOptions(timeout_min=240, cpus_per_task=2, mem_gb=8, array_parallelism=16,
                              logs="slurm_logs/data_prep")


def run_slurm(job: Job, todo: list[tuple[int, dict]], facts: dict, opts: SlurmOptions, bar: ProgressBar) -> None:
    import shutil

    if shutil.which("sbatch") is None:
        raise DataPrepError("--slurm: no 'sbatch' on this machine; run the job locally with --workers N instead")
    logs = opts.logs or SLURM_DEFAULTS.logs
    # a unit that dies is redone by running the same command again: no save-and-requeue
    executor = make_executor(logs, opts.parameters(
        tasks_per_node=1, name=f"data_prep:{posixpath.basename(job.out_url.rstrip('/'))}", requeue=False))
    jobs = executor.map_array(run_one_unit, [job] * len(todo), [i for i, _ in todo], [s for _, s in todo],
                              [facts] * len(todo))
    print(f"[data_prep] submitted {len(jobs)} SLURM array tasks: {jobs[0].job_id.split('_')[0]} "
          f"(logs under {logs})", flush=True)
    sizes = {i: job.unit_size(s) for i, s in todo}
    pending = dict(zip(jobs, [i for i, _ in todo]))
    gone_since: dict[str, float] = {}
    while pending:
        for j in [j for j in pending if j.done()]:
            j.result()  # raises with the task's traceback if it failed
            bar(sizes[pending.pop(j)])
        # submitit learns of an end from sacct or the result file; a task killed without writing one (OOM,
        # node failure) on a cluster without accounting would be waited for forever: watch squeue instead.
        live = squeue_states([jobs[0].job_id]) if pending else {}
        for j in pending:
            if live is None or j.job_id in live:
                gone_since.pop(j.job_id, None)
            elif time.monotonic() - gone_since.setdefault(j.job_id, time.monotonic()) > 60 and not j.done():
                raise DataPrepFailure(f"SLURM task {j.job_id} (work unit {pending[j]}) left the queue without a "
                                    f"result; its log: {j.paths.stderr}. Run the same command again to redo it.")
        if pending:
            time.sleep(2.0)

