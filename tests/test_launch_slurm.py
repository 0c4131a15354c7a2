"""launchers/slurm.py (python -m prime_scale.launch.slurm) against the real one-node SLURM: SIGUSR2 and a real
preemption (SIGTERM, GraceTime) -> save on every rank -> requeue -> resume, ending with the very weights of an
uninterrupted run; the dry run (the script a real submission writes); the old option spellings; the refusals."""

from __future__ import annotations

import datetime
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slurm_helpers import (PARTITION, URGENT_PARTITION, ensure_slurm_cluster, scontrol_fields,
                           start_requeued_job_now)

from prime_scale.metrics import step_records

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def common(tmp_path: Path, out: str) -> list[str]:
    """The demo model on the demo source (fewer sequences), one thread per rank so both runs share numerics."""
    return ["config=demo", f"data.path={tmp_path / 'data'}", f"run.out_dir={tmp_path / out}", "train.steps=40",
            "data.train_sequences=4000", "data.val_sequences=64", "eval.max_sequences=64", "train.log_every=1",
            "train.eval_every=1000", "ckpt.every_steps=1000", "ckpt.every_minutes=0", "log.wandb=disabled",
            "train.num_threads=1", "engine.zero_stage=2", "train.warmup_steps=4"]


def losses(run_dir: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in step_records(run_dir).items()}


def wait_for(what: str, condition, timeout_s: float, poll_s: float = 0.2) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"not within {timeout_s:.0f} s: {what}", pytrace=False)
        time.sleep(poll_s)


def submitit_time(line: str) -> float:
    """The time of a submitit log line, ``submitit INFO (2026-12-01 16:33:50,568) - ...``, as a Unix time."""
    stamp = re.search(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\)", line).group(1)
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_usr2_and_a_real_preemption_save_requeue_resume_and_end_like_an_uninterrupted_run(tmp_path):
    """One 2-task job, stopped twice: first by SIGUSR2 (what ``--signal=USR2@delay`` sends before the time limit;
    here ``scancel --signal=USR2``), then by a real preemption: a job in the high-priority partition that needs the
    node makes SLURM send SIGTERM and start GraceTime. Both times every rank saves, the job requeues (same id) and
    resumes; losses and final weights are bitwise those of an uninterrupted local 2-rank run."""
    ensure_slurm_cluster()
    grace = int(scontrol_fields("partition", PARTITION)["GraceTime"])
    assert grace >= 30 and scontrol_fields("partition", URGENT_PARTITION)["PreemptMode"] == "OFF"
    prep = subprocess.run([PY, "-m", "data_prep.synthetic", *common(tmp_path, "x")[:7]], cwd=REPO,
                          capture_output=True, text=True)
    assert prep.returncode == 0, prep.stderr
    reference = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                                "prime_scale.engine", *common(tmp_path, "ref")], cwd=REPO, capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]

    submit = subprocess.run([PY, "launchers/slurm.py", "--nodes", "1", "--tasks-per-node", "2", "--cpus-per-task",
                             "1", "--partition", PARTITION, "--timeout-min", "20", "--signal-delay-s", "60",
                             *common(tmp_path, "slurm")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"submitted job (\d+)", submit.stdout).group(1)
    assert "1 node(s) x 2 task(s) = 2 tasks" in submit.stdout and f"scancel --signal=USR2 {job_id}" in submit.stdout
    run_dir = tmp_path / "slurm" / "demo"
    logs = run_dir / "slurm"
    log0_path = logs / f"{job_id}_0_log.out"  # every start appends to it

    def log0() -> str:
        return log0_path.read_text() if log0_path.exists() else ""

    def trained() -> int:
        return max(losses(run_dir), default=0) if (run_dir / "metrics.jsonl").exists() else 0

    urgent_id, urgent_out, delays = "", tmp_path / "urgent.out", []
    try:
        # 1. SIGUSR2, as before the time limit: save, submitit requeues, resume
        wait_for("the job trains 8 steps", lambda: trained() >= 8, 300)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        wait_for("submitit requeues the job", lambda: f"Requeued job {job_id}" in log0(), 120)
        # no task left a result file: submitit's client must not take the requeued job for a finished one
        assert not list(logs.glob(f"{job_id}_*_result.pkl"))
        delays.append(start_requeued_job_now(job_id, restarts=1))
        wait_for("the second start trains 4 steps past its checkpoint",
                 lambda: "start 2 (restarts so far: 1" in log0() and "resumed from" in log0()
                 and trained() >= int(re.search(r"at step (\d+)", log0().split("resumed from", 1)[1]).group(1)) + 4,
                 300)

        # 2. a real preemption: a job in the urgent partition needs the whole node
        preempted_at = time.time()
        urgent = subprocess.run(["sbatch", "--parsable", "-p", URGENT_PARTITION, "--exclusive", "-t", "1",
                                 "-J", f"urgent-{job_id}", "-o", str(urgent_out), "--wrap",
                                 'echo "urgent job ran at $(date +%s.%N) in $SLURM_JOB_PARTITION"'],
                                capture_output=True, text=True, timeout=30)
        assert urgent.returncode == 0, urgent.stderr
        urgent_id = urgent.stdout.strip().split(";")[0]
        wait_for("the preempted job requeues itself", lambda: log0().count(f"Requeued job {job_id}") == 2, grace + 30)
        assert not list(logs.glob(f"{job_id}_*_result.pkl"))
        delays.append(start_requeued_job_now(job_id, restarts=2))
        wait_for("the third start finishes", lambda: trained() >= 40 and not subprocess.run(  # squeue: once trained
            ["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip(), 400)
    finally:
        subprocess.run(["scancel", job_id, *([urgent_id] if urgent_id else [])], capture_output=True)
    text = log0()
    assert all(d > 60 for d in delays), delays  # SLURM's own requeue delay, skipped here

    usr2 = re.search(r"saved .*step_(\d+)\n\[prime_scale\] stopped by signal 12 at step (\d+)", text)
    term = re.search(r"saved .*step_(\d+)\n\[prime_scale\] stopped by signal 15 at step (\d+)", text)
    assert usr2 and usr2.group(1).lstrip("0") == usr2.group(2), text[-3000:]  # saved, then stopped
    assert term and term.group(1).lstrip("0") == term.group(2), text[-3000:]
    first, second = int(usr2.group(2)), int(term.group(2))
    assert 8 <= first < first + 4 <= second < 40
    order = ["start 1 (restarts so far: 0", "stopped by signal 12", "Caught signal SIGUSR2",
             "Calling checkpoint method", f"Requeued job {job_id}", "start 2 (restarts so far: 1",
             f"resumed from {run_dir / 'checkpoints'}/step_{first:08d} at step {first}", "stopped by signal 15",
             "preempted by SLURM (SIGTERM, PreemptTime", "Caught signal SIGTERM", "Calling checkpoint method",
             f"Requeued job {job_id}", "start 3 (restarts so far: 2",
             f"resumed from {run_dir / 'checkpoints'}/step_{second:08d} at step {second}"]
    at = 0
    for needle in order:
        at = text.index(needle, at) + 1  # each in this order
    restarts = [json.loads(line) for line in (run_dir / "restarts.jsonl").read_text().splitlines()]
    assert [r["restart"] for r in restarts] == [0, 1, 2] and all(r["job_id"] == job_id for r in restarts)

    # the save and the requeue fit into GraceTime: SLURM never had to kill the job
    caught = submitit_time(next(line for line in text.splitlines() if "Caught signal SIGTERM" in line))
    requeued = submitit_time([line for line in text.splitlines() if f"Requeued job {job_id}" in line][1])
    assert 0 < caught - preempted_at <= requeued - preempted_at < grace, (preempted_at, caught, requeued)
    assert "DUE TO PREEMPTION" not in (logs / f"{job_id}_0_log.err").read_text()  # not killed at GraceTime's end
    # the urgent job ran after the preempted job left the node, before its third start
    ran_at = float(re.search(r"urgent job ran at (\S+) in (\w+)", urgent_out.read_text()).group(1))
    third = submitit_time([line for line in text.splitlines() if "Starting with JobEnvironment" in line][2])
    assert requeued < ran_at < third
    print(f"preemption: saved and requeued {requeued - preempted_at:.1f} s after the urgent job was submitted "
          f"(GraceTime {grace} s); SLURM's requeue delays skipped: {', '.join(f'{d:.0f} s' for d in delays)}")

    ref, got = losses(tmp_path / "ref/demo"), losses(run_dir)
    assert sorted(got) == list(range(1, 41)) and all(got[s] == ref[s] for s in range(1, 41))  # bitwise, every step
    a = torch.load(tmp_path / "ref/demo/checkpoints/step_00000040/mp_rank_00_model_states.pt", weights_only=False)
    b = torch.load(run_dir / "checkpoints/step_00000040/mp_rank_00_model_states.pt", weights_only=False)
    assert all(torch.equal(a["module"][k], b["module"][k]) for k in a["module"])
    # the last start's results, one per task (the stops wrote none)
    results = [pickle.loads((logs / f"{job_id}_{t}_result.pkl").read_bytes()) for t in (0, 1)]
    assert [(r[0], r[1]["step"], r[1]["exit_code"], r[1]["rank"]) for r in results] == \
        [("success", 40, 0, 0), ("success", 40, 0, 1)]


class _FakeStop:
    """What TrainJob._after_save reads of run_context.StopFlag: the signal, and the handler it replaced (submitit's)."""

    def __init__(self, signum: int, calls: list):
        self.signum = signum
        self._calls = calls

    def previous(self, signum: int):
        def submitit_handler(sig, frame):  # like submitit's checkpoint_and_try_requeue: requeues, then exits
            self._calls.append(sig)
            raise SystemExit(-1)
        return submitit_handler if signum == signal.SIGUSR2 else None


def test_after_a_save_rank0_requeues_on_usr2_and_on_a_preemption_only(tmp_path, monkeypatch):
    """The decision after every rank saved, against a stand-in ``scontrol`` that says what SLURM would: requeue on
    SIGUSR2 and on a SIGTERM of a preemption that SLURM would requeue; end the job (an error result, no requeue)
    on a SIGTERM of scancel or the time limit, a partition with PreemptMode=CANCEL, a job with Requeue=0."""
    from submitit.core.utils import UncompletedJobError

    from prime_scale import slurm_job
    from prime_scale.launch import slurm_tools

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\n[[ -n $FAKE_FAIL ]] && exit 1\n'
        'case "$2" in\n'
        '  job) echo "JobId=77 JobName=demo JobState=$FAKE_STATE Requeue=$FAKE_REQUEUE Restarts=0 Partition=debug '
        'PreemptEligibleTime=2026-12-01T16:00:00 PreemptTime=$FAKE_PREEMPT" ;;\n'
        '  partition) echo "PartitionName=debug PriorityTier=1 PreemptMode=$FAKE_MODE GraceTime=60" ;;\n'
        'esac\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    job, summary = slurm_job.TrainJob(["config=tiny"]), {"step": 7, "exit_code": 75}

    def after_save(rank: int, signum: int, **slurm: str) -> tuple[list, BaseException]:
        for key in ("FAIL", "STATE", "REQUEUE", "PREEMPT", "MODE"):
            monkeypatch.delenv(f"FAKE_{key}", raising=False)
        defaults = {"STATE": "RUNNING", "REQUEUE": "1", "PREEMPT": "2026-12-01T16:56:22", "MODE": "REQUEUE"}
        for key, value in {**defaults, **slurm}.items():
            if value:
                monkeypatch.setenv(f"FAKE_{key}", value)
        calls: list = []
        env = type("Env", (), {"global_rank": rank, "job_id": "77"})()
        with pytest.raises((SystemExit, UncompletedJobError)) as stopped:
            job._after_save(env, _FakeStop(signum, calls), summary)
        return calls, stopped.value

    calls, stopped = after_save(1, signal.SIGTERM)
    assert calls == [] and isinstance(stopped, SystemExit) and stopped.code == 0  # only rank 0 decides
    calls, stopped = after_save(0, signal.SIGUSR2, FAIL="1")  # SLURM is not even asked
    assert calls == [signal.SIGUSR2] and isinstance(stopped, SystemExit)
    calls, stopped = after_save(0, signal.SIGTERM)  # preempted, PreemptMode=REQUEUE, Requeue=1
    assert calls == [signal.SIGTERM] and isinstance(stopped, SystemExit)
    for slurm, why in (({"PREEMPT": "None", "STATE": "CANCELLED"}, "not a preemption (JobState=CANCELLED"),
                       ({"MODE": "CANCEL"}, "PreemptMode=CANCEL"), ({"REQUEUE": "0"}, "Requeue=0")):
        calls, stopped = after_save(0, signal.SIGTERM, **slurm)
        assert calls == [] and isinstance(stopped, UncompletedJobError), slurm
        assert why in str(stopped) and "stopped by SIGTERM at step 7" in str(stopped), str(stopped)
    monkeypatch.setattr(slurm_job, "_WAIT_FOR_SLURM_S", 0)
    calls, stopped = after_save(0, signal.SIGTERM, FAIL="1")  # SLURM cannot be asked: it is left to SLURM
    assert calls == [] and "SLURM did not end the job within 0 s" in str(stopped)
    assert slurm_tools.slurm_preemption("77") is None


def test_dry_run_shows_tasks_signal_time_limit_and_config(tmp_path):
    out = subprocess.run([PY, "launchers/slurm.py", "--nodes", "8", "--gpus-per-node", "8", "--dry-run",
                          "config=owt_large", f"run.out_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "8 node(s) x 8 task(s) = 64 tasks" in text
    for line in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR2@120", "#SBATCH --time=1440", "#SBATCH --requeue"):
        assert line in text, text
    config = text.split("# resolved config\n", 1)[1]
    assert "n_layer: 16" in config and "d_model: 2048" in config and "name: owt_large" in config
    assert not (tmp_path / "owt_large").exists()  # nothing submitted, nothing written


def dry_run(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """``--dry-run`` of the launcher module, from a folder outside the checkout (config=NAME is package data)."""
    return subprocess.run([PY, "-m", "prime_scale.launch.slurm", "--dry-run", *args], cwd=folder,
                          capture_output=True, text=True, timeout=120)


def test_old_option_spellings_still_work_with_a_deprecation_note(tmp_path):
    new = dry_run(tmp_path, "--timeout-min", "30", "--mem-gb", "4", "--signal-delay-s", "60", "config=tiny",
                  f"run.out_dir={tmp_path}")
    old = dry_run(tmp_path, "--time", "30", "--mem", "4", "--signal-delay", "60", "config=tiny",
                  f"run.out_dir={tmp_path}")
    assert new.returncode == 0 and old.returncode == 0, new.stderr + old.stderr
    for line in ("#SBATCH --time=30", "#SBATCH --mem=4GB", "#SBATCH --signal=USR2@60"):
        assert line in new.stdout, new.stdout
    assert old.stdout == new.stdout and "deprecated" not in new.stderr
    notes = [line for line in old.stderr.splitlines() if "deprecated" in line]
    assert len(notes) == 3 and all(f"{was} is deprecated, use {now}" in old.stderr for was, now in
                                   (("--time", "--timeout-min"), ("--mem", "--mem-gb"),
                                    ("--signal-delay", "--signal-delay-s"))), old.stderr


def test_dry_run_prints_the_script_a_real_submission_writes(tmp_path):
    ensure_slurm_cluster()
    logs = tmp_path / "logs"
    args = ["--nodes", "1", "--tasks-per-node", "2", "--cpus-per-task", "1", "--partition", PARTITION,
            "--timeout-min", "5", "--logs", str(logs), "--sbatch", "hold=",  # held: submitted, never started
            "config=tiny", f"data.path={tmp_path / 'data'}", f"run.out_dir={tmp_path / 'runs'}"]
    dry = dry_run(tmp_path, *args)
    assert dry.returncode == 0, dry.stderr
    assert not logs.exists()  # the dry run wrote nothing there
    submit = subprocess.run([PY, "-m", "prime_scale.launch.slurm", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"submitted job (\d+)", submit.stdout).group(1)
    try:
        written = (logs / f"{job_id}_submission.sh").read_text()
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    assert "#SBATCH --hold" in written and f"#SBATCH --partition={PARTITION}" in written
    assert "\n" + written + "\n# resolved config\n" in dry.stdout  # the very text sbatch was given


def test_refusals_before_anything_is_submitted(tmp_path):
    bare = tmp_path / "bin"  # a machine without SLURM: python and nothing else on PATH
    bare.mkdir()
    (bare / "python").symlink_to(PY)
    no_slurm = {**os.environ, "PATH": str(bare)}
    assert shutil.which("sbatch", path=no_slurm["PATH"]) is None
    out = subprocess.run([PY, "launchers/slurm.py", "config=tiny"], cwd=REPO, capture_output=True, text=True,
                         env=no_slurm, timeout=120)
    assert out.returncode == 2 and "no 'sbatch'" in out.stderr and "launchers/local.py --nproc 1" in out.stderr
    typo = subprocess.run([PY, "launchers/slurm.py", "config=tiny", "train.step=3"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert typo.returncode == 2 and "did you mean 'train.steps'" in typo.stderr
    ensure_slurm_cluster()
    gpus = subprocess.run([PY, "launchers/slurm.py", "--gpus-per-node", "4", "--partition", PARTITION, "config=tiny",
                           f"run.out_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert gpus.returncode == 2 and f"partition '{PARTITION}' has no GPUs per node" in gpus.stderr
    missing = subprocess.run([PY, "launchers/slurm.py", "--partition", PARTITION, "config=tiny", "data.source=shards",
                              f"data.path={tmp_path / 'nothing'}", f"run.out_dir={tmp_path}"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no prepared data at data.path=" in missing.stderr
