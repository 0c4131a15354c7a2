"""launchers/slurm.py against the real one-node SLURM: preemption -> save on every rank -> requeue -> resume,
ending with the very weights of an uninterrupted run; the dry run; the refusals."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slurm_helpers import PARTITION, ensure_slurm_cluster

from prime_scale.metrics import step_records

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def common(tmp_path: Path, out: str) -> list[str]:
    """The demo model on the demo source (fewer sequences), one thread per rank so both runs share numerics."""
    return ["config=demo", f"data.path={tmp_path / 'data'}", f"run.out_dir={tmp_path / out}", "train.steps=40",
            "data.train_sequences=4000", "data.val_sequences=64", "eval.max_sequences=64", "train.log_every=1",
            "train.eval_every=1000", "ckpt.every_steps=1000", "ckpt.every_minutes=0", "log.wandb=disabled",
            "train.num_threads=1", "engine.zero_stage=2"]


def losses(run_dir: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in step_records(run_dir).items()}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_preempted_job_saves_requeues_resumes_and_ends_like_an_uninterrupted_run(tmp_path):
    ensure_slurm_cluster()
    prep = subprocess.run([PY, "-m", "data_prep.synthetic", *common(tmp_path, "x")[:7]], cwd=REPO,
                          capture_output=True, text=True)
    assert prep.returncode == 0, prep.stderr
    reference = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                                "prime_scale.engine", *common(tmp_path, "ref")], cwd=REPO, capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]

    submit = subprocess.run([PY, "launchers/slurm.py", "--nodes", "1", "--tasks-per-node", "2", "--cpus-per-task",
                             "1", "--partition", PARTITION, "--time", "20", "--signal-delay", "60",
                             *common(tmp_path, "slurm")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"submitted job (\d+)", submit.stdout).group(1)
    assert "1 node(s) x 2 task(s) = 2 tasks" in submit.stdout and f"scancel --signal=USR2 {job_id}" in submit.stdout
    run_dir = tmp_path / "slurm" / "demo"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and
                                              max(losses(run_dir), default=0) >= 8):
            time.sleep(0.2)
        assert max(losses(run_dir), default=0) >= 8, "the job did not start training"
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        # the job saves, requeues itself, starts again (SLURM waits about two minutes) and finishes
        deadline = time.time() + 600
        while time.time() < deadline:
            state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
            if not state.strip() and max(losses(run_dir), default=0) >= 40:
                break
            time.sleep(2)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    log0 = (tmp_path / "slurm/demo/slurm" / f"{job_id}_0_log.out").read_text()  # both starts, appended
    match = re.search(r"saved .*step_(\d+)\n\[prime_scale\] stopped by signal 12 at step (\d+)", log0)
    assert match and match.group(1).lstrip("0") == match.group(2), log0[-3000:]  # saved, then stopped
    saved_at = int(match.group(2))
    assert log0.index("stopped by signal 12") < log0.index("Calling checkpoint method") \
        < log0.index(f"Requeued job {job_id}") < log0.index("start 2 (restarts so far: 1")
    assert 8 <= saved_at < 40
    assert f"resumed from {run_dir / 'checkpoints'}/step_{saved_at:08d} at step {saved_at}" in log0
    restarts = [json.loads(line) for line in (run_dir / "restarts.jsonl").read_text().splitlines()]
    assert [r["restart"] for r in restarts] == [0, 1] and all(r["job_id"] == job_id for r in restarts)

    ref, got = losses(tmp_path / "ref/demo"), losses(run_dir)
    assert all(got[s] == ref[s] for s in range(saved_at + 1, 41))  # bitwise after the restart
    a = torch.load(tmp_path / "ref/demo/checkpoints/step_00000040/mp_rank_00_model_states.pt", weights_only=False)
    b = torch.load(run_dir / "checkpoints/step_00000040/mp_rank_00_model_states.pt", weights_only=False)
    assert all(torch.equal(a["module"][k], b["module"][k]) for k in a["module"])


def test_dry_run_shows_tasks_signal_time_limit_and_config(tmp_path):
    out = subprocess.run([PY, "launchers/slurm.py", "--nodes", "8", "--gpus-per-node", "8", "--dry-run",
                          "config=owt_large", f"run.out_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "8 node(s) x 8 task(s) = 64 tasks" in text
    for line in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR2@120", "#SBATCH --time=1440"):
        assert line in text, text
    config = text.split("# resolved config\n", 1)[1]
    assert "n_layer: 16" in config and "d_model: 2048" in config and "name: owt_large" in config
    assert not (tmp_path / "owt_large").exists()  # nothing submitted, nothing written


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
