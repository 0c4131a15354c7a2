"""The package installs as a wheel and runs from anywhere: the configs ship as package data, the launchers are
modules, and the training ranks that torchrun starts find the installed package (no PYTHONPATH, no checkout).

The wheel is built offline from a copy of the sources (the checkout gets no build/ or egg-info) and installed with
``--no-deps`` into a virtual environment that sees this environment's dependencies (``--system-site-packages``),
by this environment's pip run with the virtual environment's python (``--without-pip``: installing a pip of its
own takes seconds and is not what is tested). This environment's editable install of prime_scale is visible there
too, but its finder comes after the virtual environment's site-packages; the test checks that the wheel's copy is
the one imported."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD_INPUTS = ["pyproject.toml", "README.md", "prime_scale", "data_prep"]  # what pyproject.toml packages


def run(cmd: list, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_installs_and_runs_the_demo_from_outside_the_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PIP_")}
    env.update(OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", src,
         "-w", tmp_path / "dist"], tmp_path, env, 120)
    wheels = list((tmp_path / "dist").glob("prime_scale-*.whl"))
    assert len(wheels) == 1, wheels

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp_path, env, 120)
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheels[0]], tmp_path, env, 120)

    work = tmp_path / "work"  # not the checkout: nothing can come from the working directory
    work.mkdir()
    where = run([python, "-c", "import prime_scale, data_prep, prime_scale.launch.local as l; "
                 "from prime_scale.config import CONFIG_DIR, available_configs; from prime_scale.sweep import "
                 "available_sweeps; print(prime_scale.__file__, data_prep.__file__, l.__file__, CONFIG_DIR, "
                 "'demo' in available_configs(), 'pydocs_tiny' in available_sweeps())"], work, env, 120)
    site = str(venv / "lib")
    *files, found_demo, found_sweep = where.stdout.split()
    assert all(f.startswith(site) for f in files), where.stdout  # the wheel's copy, not the checkout's
    assert found_demo == found_sweep == "True", where.stdout  # config=demo, sweep=pydocs_tiny: package data

    # the demo's first steps on two ranks: torchrun's ranks import the installed package (python -m ...)
    demo = run([python, "-m", "prime_scale.launch.local", "--nproc", "2", "config=demo", "train.steps=3",
                "train.warmup_steps=1", "train.log_every=1", "train.eval_every=0", "data.train_sequences=256",
                "data.val_sequences=32", "data.shard_size_mb=0.01", "eval.max_sequences=16", "eval.repeats=1",
                "sample.num_samples=1", "sample.steps=8", "log.wandb=disabled", "ckpt.every_minutes=0"],
               work, env, 240)
    assert "step 3/3" in demo.stdout and "validation NELBO" in demo.stdout, demo.stdout[-3000:]
    run_dir = work / "runs" / "demo"  # run.out_dir and data.path are relative to the working directory
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "export/model.safetensors",
                 "checkpoints/latest.json"):
        assert (run_dir / name).exists(), name
    assert (work / "data" / "demo" / "manifest.json").exists()
