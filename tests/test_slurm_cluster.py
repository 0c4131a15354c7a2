"""submitit on a real (local, one-node) SLURM cluster: one job and a job array, end to end.

Needs root and the Debian packages ``slurm-wlm munge`` (see launchers/slurm_cluster.sh); fails, not skips, without.
"""

from __future__ import annotations

import logging

import pytest
import submitit

from slurm_helpers import PARTITION, ensure_slurm_cluster, wait_jobs


def _executor(folder, **params) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(slurm_partition=PARTITION, timeout_min=5, nodes=1, tasks_per_node=1,
                               cpus_per_task=1, mem_gb=1, **params)
    return executor


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_submitit_job_and_array(tmp_path, caplog):
    ensure_slurm_cluster()

    # Nested, so that cloudpickle sends the functions by value: the SLURM task could not import this test module.
    def square_in_slurm(x: int) -> tuple[int, str, str]:
        import os

        return x * x, os.environ.get("SLURM_JOB_ID", ""), os.environ.get("SLURM_ARRAY_TASK_ID", "")

    # sacct has no accounting storage here: submitit logs "Bypassing sacct error" and goes by its result files.
    caplog.set_level(logging.ERROR, logger="submitit")

    single = _executor(tmp_path / "logs" / "single", name="square").submit(square_in_slurm, 7)
    array_executor = _executor(tmp_path / "logs" / "array", name="square_array", slurm_array_parallelism=2)
    array = array_executor.map_array(square_in_slurm, [1, 2, 3, 4])
    assert len(array) == 4
    assert "#SBATCH --array=0-3%2" in array[0].paths.submission_file.read_text()  # at most 2 tasks at once

    (value, job_id, task), = wait_jobs([single], timeout_s=120)
    assert value == 49
    assert job_id == single.job_id and task == ""  # it really ran as a SLURM job, not in this process

    results = wait_jobs(array, timeout_s=120)
    assert [r[0] for r in results] == [1, 4, 9, 16]
    array_id = array[0].job_id.split("_")[0]
    assert all(j.job_id == f"{array_id}_{i}" for i, j in enumerate(array))
    assert [r[2] for r in results] == ["0", "1", "2", "3"]  # SLURM_ARRAY_TASK_ID of each task
    assert len({r[1] for r in results}) == 4  # each array task is its own SLURM job
