"""A one-node SLURM cluster for the tests that submit real SLURM jobs.

    from slurm_helpers import ensure_slurm_cluster, wait_jobs

    def test_something(tmp_path):
        ensure_slurm_cluster()  # partition "debug"; returns once a job runs

Two partitions share the node: ``PARTITION`` ("debug", the default, low priority; a preempted job there gets
SIGTERM, GraceTime to save, and is requeued) and ``URGENT_PARTITION`` ("urgent", high priority: a job there that
needs the node's CPUs preempts the debug jobs that hold them).

The cluster is started by ``launchers/slurm_cluster.sh start`` (root, Debian packages ``slurm-wlm munge``) and is
left running after the tests: a later session finds it ready in a fraction of a second. Missing packages are a
test *failure*, not a skip: CI installs them, and a skipped SLURM test would hide a broken launcher.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Sequence

import pytest

from prime_scale.launch import slurm_tools

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "launchers" / "slurm_cluster.sh"
PARTITION = "debug"
URGENT_PARTITION = "urgent"
# The script waits up to 60 s for the node and a test job; this bound covers that plus starting the daemons.
START_TIMEOUT_S = 120
_COMMANDS = ("sbatch", "srun", "sinfo", "scontrol", "slurmctld", "slurmd", "munged")

_ready = False


def _which(cmd: str) -> str | None:
    # slurmctld, slurmd and munged live in /usr/sbin, not always on a non-root PATH.
    return shutil.which(cmd, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def ensure_slurm_cluster() -> None:
    """Start the local one-node cluster if it is not up (once per test session); fail with a clear message."""
    global _ready
    if _ready:
        return
    missing = [c for c in _COMMANDS if _which(c) is None]
    if missing:
        pytest.fail(
            f"SLURM is not installed (missing: {', '.join(missing)}). Install the Debian packages with\n"
            "    apt-get update && apt-get install -y slurm-wlm munge\n"
            f"or run: bash {CLUSTER_SCRIPT.relative_to(REPO)} start --install",
            pytrace=False,
        )
    if os.geteuid() != 0:
        pytest.fail(f"the SLURM tests start a local cluster and need root: run them as root, or start it first "
                    f"with `sudo bash {CLUSTER_SCRIPT.relative_to(REPO)} start`", pytrace=False)
    try:
        proc = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True,
                              timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{CLUSTER_SCRIPT.name} start did not finish within {START_TIMEOUT_S} s:\n"
                    f"{e.stdout or ''}{e.stderr or ''}", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"{CLUSTER_SCRIPT.name} start failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}",
                    pytrace=False)
    _ready = True


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """Session fixture form of :func:`ensure_slurm_cluster`; its value is the partition to submit to."""
    ensure_slurm_cluster()
    return PARTITION


def wait_jobs(jobs: Sequence, timeout_s: float, poll_s: float = 0.5) -> list:
    """The results of submitit jobs, waiting at most ``timeout_s``.

    Without sacct (no accounting storage on the test cluster) submitit only learns that a job ended from its result
    file, so a job that died without one would make ``job.result()`` wait forever. Here a job still unfinished at
    the deadline is cancelled and the test fails with its state and log tails."""
    deadline = time.monotonic() + timeout_s
    while not all(j.done() for j in jobs):
        if time.monotonic() > deadline:
            lines = []
            for j in jobs:
                if not j.done():
                    lines.append(f"--- job {j.job_id} not done; squeue state: {_squeue_state(j.job_id)}")
                    lines.append("stdout: " + _tail(j.stdout()))
                    lines.append("stderr: " + _tail(j.stderr()))
                    j.cancel(check=False)
            pytest.fail(f"SLURM jobs not finished after {timeout_s:.0f} s (cancelled):\n" + "\n".join(lines),
                        pytrace=False)
        time.sleep(poll_s)
    return [j.result() for j in jobs]


def _squeue_state(job_id: str) -> str:
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T %R"], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "(gone from squeue)"
    except (OSError, subprocess.SubprocessError) as e:
        return f"(squeue failed: {e})"


def _tail(text: str | None, n: int = 15) -> str:
    if not text:
        return "(empty)"
    return "\n".join(text.splitlines()[-n:])


def scontrol_fields(*args: str) -> dict[str, str]:
    """``scontrol show ... -o`` as a dict of its KEY=VALUE words (e.g. ``scontrol_fields("job", "42")``); {} when
    SLURM no longer knows it."""
    return slurm_tools.scontrol_fields(["show", *args, "-o"]) or {}


def start_requeued_job_now(job_id: str, restarts: int, timeout_s: float = 120) -> float:
    """Skip SLURM's delay before a requeued job may start again: once job ``job_id`` is back in the queue for its
    ``restarts``-th time (PENDING, Reason=BeginTime: SLURM 22.05 sets its BeginTime about two minutes after the
    requeue), set its StartTime to now; it then starts as soon as the node is free. Returns the seconds SLURM
    would have made it wait. A real cluster waits; only the test hurries it.

    Not within the second of the requeue, though: the requeue revoked the job's credentials up to that second, and
    slurmd compares whole seconds, so a job started again within it is refused ("Job credential revoked", "already
    killed, do not launch batch job") and ends FAILED instead of running; avoiding that is what SLURM's delay is
    for. The revocation is made in the same step as the restart count goes up, so the first time this sees the new
    count bounds its second from above, and the StartTime set here is later than that second."""
    deadline = time.monotonic() + timeout_s
    fields: dict[str, str] = {}
    revoked_by = None  # the wall-clock second the credentials were revoked in, or a later one
    while time.monotonic() < deadline:
        fields = scontrol_fields("job", str(job_id))
        if fields.get("Restarts") == str(restarts):
            if revoked_by is None:
                revoked_by = int(time.time())
            if fields.get("JobState") == "PENDING" and fields.get("Reason") == "BeginTime":
                begin = _slurm_time(fields.get("EligibleTime")) or _slurm_time(fields.get("StartTime"))
                time.sleep(max(0.0, revoked_by + 1.02 - time.time()))  # now (slurmctld's clock: this one) is later
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30)
                return begin - time.time()
            if fields.get("JobState") == "RUNNING":
                return 0.0  # started again already
        time.sleep(0.1)
    pytest.fail(f"job {job_id} did not come back to the queue (restart {restarts}) within {timeout_s:.0f} s: "
                f"{fields}", pytrace=False)


def _slurm_time(value: str | None) -> float:
    """A time of ``scontrol show job`` (2026-12-01T16:53:17, local time) as a Unix time; 0.0 for Unknown/None."""
    try:
        return time.mktime(time.strptime(value or "", "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return 0.0
