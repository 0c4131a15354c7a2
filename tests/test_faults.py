"""Faults around a run: a killed launcher takes its ranks with it, a dead peer ends its rank, one writer per run
folder, and checkpoints whose pickles would run code are refused.

The launcher tests run ``launchers/local.py --nproc 2`` (torchrun, two CPU ranks, ZeRO-2) as a user would, kill
it in the ways a machine does, run the same command again, and compare the final export byte for byte with an
uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import REPO, fresh_env

from prime_scale.checkpoint import LATEST, UnsafeCheckpointError, safe_load, verify_folder
from prime_scale.export import export
from prime_scale.metrics import step_records
from prime_scale.runlock import LOCK_FILE, RunLock, RunLocked

STEPS = 60
KILL_SEED = 15  # the number: the kill steps below are drawn from it (and printed)


def local_args(data: Path, out: Path) -> list[str]:
    """tiny on 2 ranks, ZeRO-2 with an EMA (the export is the EMA, so a resume that lost it would show), a save
    every 5 steps; no periodic evaluation (eval_every=0: never, only at the end)."""
    return ["config=tiny", f"data.path={data}", f"run.out_dir={out}", f"train.steps={STEPS}", "train.log_every=1",
            "train.eval_every=0", "ckpt.every_steps=5", "ckpt.every_minutes=0", "log.wandb=disabled",
            "engine.zero_stage=2", "engine.ema_decay=0.9", "train.warmup_steps=3", "data.train_sequences=2000",
            "data.val_sequences=32",
            "eval.max_sequences=32", "sample.num_samples=2", "train.num_threads=1"]


def env() -> dict[str, str]:
    return fresh_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def start(args: list[str], log: Path) -> subprocess.Popen:
    """The launcher in a process group of its own (as a shell job is), its output into ``log``."""
    return subprocess.Popen([sys.executable, "launchers/local.py", "--nproc", "2", *args], cwd=REPO, env=env(),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_step(log: Path, proc: subprocess.Popen, step: int, timeout: float = 180) -> int:
    """Wait until this launch (its own log, not the run's metrics, which hold earlier launches too) logs ``step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reached = max((int(m) for m in re.findall(rf"\] step (\d+)/{STEPS} loss", log.read_text())), default=0)
        if reached >= step:
            return reached
        assert proc.poll() is None, f"the launcher ended (status {proc.returncode}) before step {step}"
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def family(proc: subprocess.Popen) -> list[psutil.Process]:
    """The launcher, torchrun and the ranks (each rank is in a session of its own, torchrun too)."""
    parent = psutil.Process(proc.pid)
    members = [parent, *parent.children(recursive=True)]
    assert len(members) >= 4, [m.cmdline()[:4] for m in members]  # launcher, torchrun, 2 ranks
    return members


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(processes: list[psutil.Process], within: float = 30.0) -> float:
    started = time.monotonic()
    while alive(processes) and time.monotonic() - started < within:
        time.sleep(0.05)
    left = alive(processes)
    assert not left, f"still alive {within} s after the kill: {[(p.pid, p.cmdline()[:5]) for p in left]}"
    return time.monotonic() - started


def latest_step(run_dir: Path) -> int:
    return int(json.loads((run_dir / "checkpoints" / LATEST).read_text())["tag"].split("_")[-1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """(data, the uninterrupted run's folder)."""
    root = tmp_path_factory.mktemp("faults")
    data, out = root / "data", root / "ref"
    done = subprocess.run([sys.executable, "launchers/local.py", "--nproc", "2", *local_args(data, out)], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return data, out / "tiny"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_launchers_and_dead_peers_leave_nothing_running_and_the_reruns_end_byte_identical(reference, tmp_path):
    data, ref_dir = reference
    args = local_args(data, tmp_path)
    run_dir = tmp_path / "tiny"
    rng = random.Random(KILL_SEED)
    kill_steps = sorted(rng.sample(range(7, STEPS - 12), 3))
    print(f"kill -9 of the launcher's process group at steps {kill_steps} (seed {KILL_SEED})")
    logs = [tmp_path / name for name in ("kill0.log", "kill1.log", "kill2.log", "peer.log", "term.log")]
    resumed_from = []  # the newest complete checkpoint after each interruption
    for i, kill_at in enumerate(kill_steps):
        proc = start(args, logs[i])
        reached = wait_for_step(logs[i], proc, kill_at)
        members = family(proc)
        if i == 0:
            # a second run of the same command while this one lives (held still, so that it cannot finish in the
            # meantime): refused before DeepSpeed starts, naming the holder
            for p in members:
                p.suspend()
            t0 = time.monotonic()
            second = subprocess.run([sys.executable, "launchers/local.py", "--nproc", "2", *args], cwd=REPO,
                                    env=env(), capture_output=True, text=True, timeout=60)
            took = time.monotonic() - t0
            assert second.returncode == 2 and took < 30, (second.returncode, took, second.stderr[-2000:])
            holder = json.loads((run_dir / LOCK_FILE).read_text())
            assert f"is in use by training by pid {holder['pid']} on {holder['host']}" in second.stderr
            assert "DeepSpeed" in logs[0].read_text()  # what a start prints, and the refused one did not:
            assert "DeepSpeed" not in second.stdout + second.stderr and "torch.distributed.run" not in second.stdout
            for p in members:
                p.resume()
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's whole process group, as a job scheduler or a shell does
        proc.wait()
        gone_in = wait_gone(members)
        print(f"kill {i}: at step {reached}, every process gone {gone_in:.2f} s after the kill, latest checkpoint "
              f"step {latest_step(run_dir)}")
        resumed_from.append(latest_step(run_dir))

    # a rank dies (the OOM killer takes one): its peer and torchrun end within seconds, and the pointer stays sound
    proc = start(args, logs[3])
    wait_for_step(logs[3], proc, resumed_from[-1] + 3)
    members = family(proc)
    ranks = [p for p in members if "prime_scale.engine" in " ".join(p.cmdline()) and "torch.distributed.run" not in
             " ".join(p.cmdline())]
    assert len(ranks) == 2
    ranks[1].kill()
    status = proc.wait(timeout=60)
    gone_in = wait_gone(members)
    assert status not in (0, 75)
    print(f"peer death: launcher status {status}, every process gone {gone_in:.2f} s after rank 1 was killed")
    resumed_from.append(latest_step(run_dir))

    # SIGTERM to the launcher alone: every rank saves at the next step boundary, all exit, the launcher says 75
    proc = start(args, logs[4])
    wait_for_step(logs[4], proc, resumed_from[-1] + 4)
    members = family(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    wait_gone(members)
    log = logs[4].read_text()
    saved = latest_step(run_dir)
    assert f"stopped by signal 15 at step {saved}" in log and f"saved {run_dir / 'checkpoints'}/step_{saved:08d}" in log
    assert saved > resumed_from[-1]
    print(f"SIGTERM: saved at step {saved}, launcher status 75")

    final = subprocess.run([sys.executable, "launchers/local.py", "--nproc", "2", *args], cwd=REPO, env=env(),
                           capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints'}/step_{saved:08d} at step {saved}" in final.stdout
    for step, after in zip(resumed_from, logs[1:]):  # each rerun went on from the newest checkpoint left to it
        assert f"resumed from {run_dir / 'checkpoints'}/step_{step:08d} at step {step}" in after.read_text()
    assert (run_dir / "export/model.safetensors").read_bytes() == (ref_dir / "export/model.safetensors").read_bytes()
    ref, got = step_records(ref_dir), step_records(run_dir)
    # the very same token ids and bitwise the same losses at every step, whichever launch ran it (fp32 on CPU)
    assert all(got[s]["batch_crc"] == ref[s]["batch_crc"] and got[s]["loss"] == ref[s]["loss"]
               for s in range(1, STEPS + 1))


class Hostile:
    """A pickle that creates a file when it is loaded (what an attacker's checkpoint would do instead)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> None:
    state = safe_load(path)
    state["extra"] = Hostile(marker)
    torch.save(state, path)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_checkpoint_whose_pickle_would_run_code_is_refused_by_resume_and_export(reference, tmp_path):
    data, ref_dir = reference
    tag = f"step_{STEPS:08d}"
    refused = 0
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rank_00000.pt"):
        folder = tmp_path / name / "checkpoints"
        shutil.copytree(ref_dir / "checkpoints", folder)
        marker = tmp_path / name / "pwned"
        plant(folder / tag / name, marker)
        with pytest.raises(UnsafeCheckpointError, match=f"refused to load .*{name}"):
            verify_folder(str(folder / tag)) if name != "rank_00000.pt" else safe_load(folder / tag / name)
        if name == "mp_rank_00_model_states.pt":  # export's command line, and resume on the same two ranks
            out = subprocess.run([sys.executable, "-m", "prime_scale.export", f"ckpt={folder}", "weights=trained",
                                  f"out={tmp_path / 'x'}"], cwd=REPO, env=env(), capture_output=True, text=True,
                                 timeout=120)  # (the EMA export reads rank_00000.pt, not this file)
            # a checkpoint that cannot be exported is a usage error (docs/cli.md), reported in one line
            assert out.returncode == 2 and "refused to load" in out.stderr and name in out.stderr, out.stderr[-2000:]
            resume = subprocess.run(
                [sys.executable, "launchers/local.py", "--nproc", "2", *local_args(data, tmp_path / "resume"),
                 f"train.steps={STEPS + 5}", f"ckpt.resume={folder / tag}"], cwd=REPO, env=env(), capture_output=True,
                text=True, timeout=300)
            assert resume.returncode != 0 and "refused to load" in resume.stdout + resume.stderr
            assert "DeepSpeed" in resume.stdout + resume.stderr  # the engine started, and then refused the file
        else:
            with pytest.raises(UnsafeCheckpointError, match=name):  # the trained weights need the shards
                export(str(folder), str(tmp_path / "x"), "trained" if "optim" in name else "auto")
        assert not marker.exists()
        refused += 2 if name == "mp_rank_00_model_states.pt" else 1
    print(f"3 hostile files, {refused} loads refused (export 3, resume 1); the marker file was never created")
    assert refused == 4
    assert not (tmp_path / "x" / "model.safetensors").exists()


@pytest.mark.slow  # the reference run: the launcher with two DeepSpeed ranks
def test_the_allowlist_covers_every_file_deepspeed_writes(reference):
    """Every real checkpoint file loads with the restricted unpickler (ZeRO-2 here; ZeRO 0-3 and bf16 are covered
    by tests/test_bf16.py's resumes, which load through the same path)."""
    _, ref_dir = reference
    assert verify_folder(str(ref_dir / "checkpoints")) >= 5


# ---------------------------------------------------------------------------------------------- the lock alone

HOLD = """
import sys, time
from prime_scale.runlock import RunLock
RunLock(sys.argv[1], purpose="training").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_live_holder_refuses_a_second_writer_and_a_dead_one_is_taken_over(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"in use by training by pid {holder.pid} on "):
            RunLock(str(tmp_path)).acquire()
        with pytest.raises(RunLocked):
            RunLock(str(tmp_path)).probe()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(str(tmp_path)).acquire()  # the kernel dropped the dead holder's flock
    assert lock.took_over["pid"] == holder.pid
    assert f"took over the lock of training by pid {holder.pid}" in capsys.readouterr().out
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert RunLock(str(tmp_path)).acquire().took_over is None  # a clean release leaves nothing to take over


def lease(url: str, **fields) -> None:
    import fsspec

    record = {"purpose": "training", "host": "node-7", "pid": 4242, "slurm_job_id": "900", "command": ["x"],
              "token": "theirs", "lease": True, "started": time.time() - 50, "heartbeat": time.time() - 5, **fields}
    with fsspec.open(f"{url}/{LOCK_FILE}", "wb") as f:
        f.write(json.dumps(record).encode())


def test_leases_on_an_object_store_refuse_a_live_holder_and_take_over_stale_ones(s3_endpoint, monkeypatch):
    url = "s3://prime-ckpt/run"
    lease(url)
    with pytest.raises(RunLocked, match=r"node-7, SLURM job 900, started .*, last heartbeat \d+ s ago \(x\)"):
        RunLock(url, settle_s=0).acquire()
    lease(url, heartbeat=time.time() - 11 * 60)  # not renewed for longer than lock_stale_minutes=10
    lock = RunLock(url, settle_s=0).acquire()
    assert lock.took_over["token"] == "theirs"
    lock.release()
    import socket

    lease(url, host=socket.gethostname(), pid=2**22 + 17)  # a dead pid on this host
    RunLock(url, settle_s=0).acquire().release()
    lease(url)
    monkeypatch.setenv("SLURM_JOB_ID", "900")  # the same SLURM job, requeued
    lock = RunLock(url, settle_s=0).acquire()
    assert lock.took_over["slurm_job_id"] == "900"
    lock.release()
    import fsspec

    assert not fsspec.filesystem("s3").exists(f"{url}/{LOCK_FILE}")  # released: the lease is gone


def test_a_data_prep_job_on_a_folder_another_job_writes_exits_2_naming_it(tmp_path):
    prep = [sys.executable, "-m", "data_prep.synthetic", "config=tiny", f"data.path={tmp_path / 'data'}"]
    holder = subprocess.Popen([sys.executable, "-c", HOLD.replace('purpose="training"', 'purpose="data prep"'),
                               str(tmp_path / "data")], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = subprocess.run(prep, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and f"is in use by data prep by pid {holder.pid}" in out.stderr, out.stderr[-2000:]
        assert not (tmp_path / "data" / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()
    again = subprocess.run(prep, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and (tmp_path / "data" / "manifest.json").exists(), again.stderr[-2000:]
