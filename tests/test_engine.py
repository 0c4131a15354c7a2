"""The DeepSpeed engine on CPU (gloo): ZeRO stages, atomic saves, signals, errors. (Kills of a run and its exact
resume, through the launcher as a user meets them: tests/test_faults.py.)

The two-rank trainings all run in one torchrun launch (the ``two_rank`` fixture, tests/engine_runs.py), each its own
``engine.main`` call with its own DeepSpeed engine and checkpoints on disk; one-rank trainings run in this process
(``engine.main`` leaves it as it found it), except where the test is about a process: signals, wandb's service."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, fresh_env, moto_endpoint, torchrun

from prime_scale import engine
from prime_scale.checkpoint import LATEST, CheckpointStore
from prime_scale.codec import SubtokenCodec
from prime_scale.cli import EXIT_RESUMABLE
from prime_scale.trainer import Geometry
from prime_scale.metrics import step_records
from prime_scale.config import ConfigError

pytestmark = pytest.mark.slow  # every test here trains with DeepSpeed


def engine_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["config=tiny", "data.source=shards", f"data.path={shards}", f"run.out_dir={out}", "train.steps=30",
            "train.log_every=1", "train.eval_every=1000", "ckpt.every_steps=10", "ckpt.every_minutes=0", "log.wandb=disabled",
            "train.warmup_steps=3", *extra]


def launch(args: list[str], nproc: int = 2, **kw) -> subprocess.Popen:
    env = fresh_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    engine_cmd = ["-m", "prime_scale.engine", *args]
    cmd = torchrun(nproc, *engine_cmd) if nproc > 1 else [sys.executable, *engine_cmd]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def run(args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = launch(args, nproc)
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(args, proc.returncode, out, "")


def run_here(args: list[str], capsys) -> str:
    """One rank in this process (``engine.main`` leaves it as it found it): for tests of what a run computes and
    writes, not of how a process behaves. Returns what it printed."""
    capsys.readouterr()
    assert engine.main(args) == 0
    return capsys.readouterr().out


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def two_rank_runs_of(data: Path, root: Path) -> list[tuple[str, list[str]]]:
    """Every two-rank training of this module, in the order they run (tests/engine_runs.py, one torchrun launch)."""
    def at(folder: str, *extra: str) -> list[str]:
        return engine_args(data, root / folder, *extra)

    runs = []
    for stage in (1, 2, 3):
        runs += [(f"z{stage}_first", at(f"z{stage}", f"engine.zero_stage={stage}", "train.steps=10")),
                 (f"z{stage}_second", at(f"z{stage}", f"engine.zero_stage={stage}", "train.steps=15"))]
    runs += [("refuse_first", at("refuse", "train.steps=10")),
             ("refuse_other", at("refuse", "train.steps=20", "model.d_model=96", "prime.num_subtokens=3"))]
    universal = ("engine.zero_stage=2", "engine.ema_decay=0.9")
    runs += [("universal_a10", at("universal/a", *universal, "train.steps=10")),
             ("universal_b10", at("universal/b", *universal, "train.steps=10")),  # the same run: b continues it
             ("universal_a11", at("universal/a", *universal, "train.steps=11"))]
    genmd4 = ("diffusion.schedule=genmd4", "diffusion.eval_estimator=continuous", "train.steps=6",
              "prime.shuffle_tokens=true", "prime.shuffle_seed=3")
    for stage in (1, 3):
        runs += [(f"export_z{stage}", at(f"export/z{stage}", f"engine.zero_stage={stage}", "train.steps=6",
                                         "engine.ema_decay=0.8")),
                 (f"genmd4_z{stage}", at(f"genmd4/z{stage}", f"engine.zero_stage={stage}", *genmd4))]
    runs += [("ar", at("ar", "model.objective=ar", "prime.num_subtokens=1", "engine.zero_stage=2", "train.steps=12",
                       "train.eval_every=12"))]
    s3 = (f"ckpt.dir={S3_CKPT}", "engine.zero_stage=2")
    runs += [("s3_first", at("s3", "train.steps=10", *s3)), ("s3_second", at("s3", "train.steps=15", *s3))]
    return runs


S3_CKPT = "s3://prime-ckpt/run1"


@pytest.fixture(scope="module")
def two_rank(markov_shards, tmp_path_factory):
    """The two-rank trainings, all in one torchrun launch, with a local S3 endpoint of their own: (root folder,
    {name: {"exit": [status per rank], "out": rank 0's stdout, "err": rank 0's stderr}}, S3 endpoint)."""
    root = tmp_path_factory.mktemp("two_rank")
    runs = root / "runs.json"
    runs.write_text(json.dumps(two_rank_runs_of(markov_shards, root)))
    with moto_endpoint() as (endpoint, aws):
        cmd = torchrun(2, str(REPO / "tests" / "engine_runs.py"), str(runs), str(root / "result.json"))
        done = subprocess.run(cmd, cwd=REPO, env=fresh_env(OMP_NUM_THREADS="1", **aws), capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        yield root, json.loads((root / "result.json").read_text()), aws


def succeeded(result: dict) -> bool:
    return result["exit"] == [0, 0]


def saves(result: dict) -> list[str]:
    """The checkpoints a run saved, as it printed them."""
    return re.findall(r"\[prime_scale\] saved (\S+)", result["out"])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_saves_loads_and_continues(two_rank, stage):
    root, runs, _ = two_rank
    first, second = runs[f"z{stage}_first"], runs[f"z{stage}_second"]
    assert succeeded(first), first["err"][-3000:]
    ckpt = root / f"z{stage}/tiny/checkpoints"
    assert saves(first) == [f"{ckpt}/step_00000010"]
    assert succeeded(second), second["err"][-3000:]
    assert "resumed from" in second["out"] and "at step 10" in second["out"]
    assert json.loads((ckpt / LATEST).read_text()) == {"tag": "step_00000015"}
    m = step_records(root / f"z{stage}/tiny")
    assert sorted(m) == list(range(1, 16))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in m.values())
    assert m[15]["loss"] < m[1]["loss"]
    manifest = json.loads((ckpt / "step_00000015/prime_manifest.json").read_text())
    assert (manifest["world_size"], manifest["zero_stage"], manifest["step"]) == (2, stage, 15)
    # the final evaluation, split over both ranks and reduced, scored every validation sequence exactly once
    evals = [json.loads(line) for line in (root / f"z{stage}/tiny/metrics.jsonl").read_text().splitlines()
             if "val/tokens" in line]
    assert evals and all((e["val/sequences"], e["val/tokens"]) == (64, 64 * 32) for e in evals)


def test_signal_saves_at_a_step_boundary_and_exits_resumable(markov_shards, tmp_path, capsys):
    args = engine_args(markov_shards, tmp_path, "train.steps=100000", "ckpt.every_steps=0")
    proc = launch(args, nproc=1)  # a process of its own: it receives the signals
    deadline = time.time() + 120
    while time.time() < deadline and not ((tmp_path / "tiny/metrics.jsonl").exists()
                                          and max(step_records(tmp_path / "tiny"), default=0) >= 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR2)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # a second signal while it saves changes nothing
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_RESUMABLE, out[-3000:]
    tag = json.loads((tmp_path / "tiny/checkpoints" / LATEST).read_text())["tag"]
    saved = int(tag.split("_")[1])
    assert saved >= 3 and f"stopped by signal {int(signal.SIGUSR2)} at step {saved}" in out
    again = run_here(engine_args(markov_shards, tmp_path, f"train.steps={saved + 2}", "ckpt.every_steps=0"), capsys)
    assert f"at step {saved}" in again


def test_crash_during_a_save_leaves_the_previous_checkpoint_chosen(markov_shards, tmp_path, capsys, monkeypatch):
    """The manifest of step 20 never gets written (the run dies first): latest stays on step 10."""
    real = CheckpointStore._write_json

    def dying(self, path, data):
        if path.endswith("step_00000020/prime_manifest.json"):
            raise OSError("disk gone while saving")
        real(self, path, data)

    with monkeypatch.context() as patched:
        patched.setattr(CheckpointStore, "_write_json", dying)
        with pytest.raises(OSError, match="disk gone while saving"):
            engine.main(engine_args(markov_shards, tmp_path))
    ckpt = tmp_path / "tiny/checkpoints"
    assert (ckpt / "step_00000020/mp_rank_00_model_states.pt").exists()  # the partial save is there ...
    assert CheckpointStore(str(ckpt)).latest() == "step_00000010"  # ... but not chosen
    resumed = run_here(engine_args(markov_shards, tmp_path, "train.steps=25"), capsys)
    assert "at step 10" in resumed, resumed[-3000:]
    assert CheckpointStore(str(ckpt)).complete_tags() == ["step_00000020", "step_00000025"]  # keep_last=2


def test_resume_refuses_another_model_clearly(two_rank):
    _, runs, _ = two_rank
    assert succeeded(runs["refuse_first"]), runs["refuse_first"]["err"][-3000:]
    other = runs["refuse_other"]
    assert other["exit"] == [2, 2]  # every rank refuses, before DeepSpeed starts
    assert "model.d_model: checkpoint 64, config 96" in other["err"]
    assert "prime.num_subtokens: checkpoint 2, config 3" in other["err"]


def test_another_world_size_continues_through_a_universal_checkpoint(markov_shards, two_rank, capsys):
    """2 ranks to step 10, then 1 rank (same global batch, now with accumulation) to step 11, against 2 ranks to
    step 11. The data differ (shards are assigned per rank), so the weights are close, not equal: one step apart
    from each other, ten steps away from a fresh start."""
    from prime_scale.config import load_config
    from prime_scale.model import PrimeTransformer

    root, runs, _ = two_rank
    folder = root / "universal"
    assert all(succeeded(runs[name]) for name in ("universal_a10", "universal_b10", "universal_a11"))
    base = ["engine.zero_stage=2", "engine.ema_decay=0.9"]
    one = run_here(engine_args(markov_shards, folder / "b", *base, "train.steps=11", "engine.micro_batch_size=8"),
                   capsys)
    assert "written by 2 ranks, this run has 1: converting it to a universal checkpoint" in one
    assert "at step 10 (universal checkpoint)" in one
    assert (folder / "b/tiny/checkpoints/universal/step_00000010").is_dir()
    a = weights(folder / "a/tiny/checkpoints/step_00000011")
    b = weights(folder / "b/tiny/checkpoints/step_00000011")
    torch.manual_seed(0)
    fresh = PrimeTransformer.from_config(load_config(engine_args(markov_shards, folder))).state_dict()
    apart = sum((a[k] - b[k]).norm() ** 2 for k in a) ** 0.5
    trained = sum((a[k] - fresh[k]).norm() ** 2 for k in a) ** 0.5
    assert apart < 0.2 * trained, (float(apart), float(trained))
    manifest = json.loads((folder / "b/tiny/checkpoints/step_00000011/prime_manifest.json").read_text())
    assert manifest["world_size"] == 1
    m = step_records(folder / "b/tiny")
    assert m[11]["loss"] < m[1]["loss"]


@pytest.mark.parametrize("policy", ["drop_batch", "stop"])
def test_a_non_finite_loss_is_dropped_on_every_rank_or_stops_clearly(markov_shards, tmp_path, policy, capsys,
                                                                     monkeypatch):
    from prime_scale import trainer

    real, calls = trainer.training_loss, [0]

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls[0] += 1
        return loss * float("nan") if calls[0] == 4 else loss

    monkeypatch.setattr(trainer, "training_loss", poisoned)
    args = engine_args(markov_shards, tmp_path, "train.steps=8", f"engine.nan_policy={policy}")
    if policy == "stop":
        capsys.readouterr()
        assert engine.main(args) == 1  # failed, said plainly
        err = capsys.readouterr().err
        assert "Traceback" not in err and \
            "non-finite loss at micro-step 3 (optimizer step 4); the last checkpoint is intact" in err, err[-3000:]
        return
    out = run_here(args, capsys)
    assert "non-finite loss at micro-step 3 (optimizer step 4): batch dropped (1 so far)" in out
    m = step_records(tmp_path / "tiny")
    assert [m[k]["dropped_batches"] for k in (3, 4, 8)] == [0, 1, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for k, r in m.items() if k != 4)
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "tiny/checkpoints/step_00000008").values())


def test_activation_checkpointing_trains_identically(markov_shards, tmp_path, capsys):
    run_here(engine_args(markov_shards, tmp_path / "plain", "train.steps=6"), capsys)
    run_here(engine_args(markov_shards, tmp_path / "ckpt", "train.steps=6", "engine.activation_checkpointing=true"),
             capsys)
    a, b = step_records(tmp_path / "plain/tiny"), step_records(tmp_path / "ckpt/tiny")
    assert [a[k]["loss"] for k in range(1, 7)] == [b[k]["loss"] for k in range(1, 7)]


def test_token_joint_training_logs_a_loss_that_says_it_is_not_a_bound(markov_shards, tmp_path, capsys):
    """diffusion.loss=token_joint trains on the withdrawn MDM-Prime objective: its training loss is logged as
    loss_token_joint_not_a_bound (never as loss), and the evaluation still reports the NELBO, with token_joint
    beside it under its own name."""
    out = run_here(engine_args(markov_shards, tmp_path, "train.steps=12", "prime.num_subtokens=2",
                               "diffusion.loss=token_joint", "train.eval_every=12", "ckpt.every_steps=0",
                               "eval.max_sequences=64"), capsys)
    assert "loss_token_joint_not_a_bound" in out and "token_joint (not a bound)" in out
    m = step_records(tmp_path / "tiny")
    assert sorted(m) == list(range(1, 13)) and not any("loss" in r for r in m.values())
    assert m[12]["loss_token_joint_not_a_bound"] < m[1]["loss_token_joint_not_a_bound"]
    val = [json.loads(line) for line in (tmp_path / "tiny/metrics.jsonl").read_text().splitlines()
           if "val/nelbo_per_token" in line][-1]
    # the same draws: the joint drops the digits' dependence, so it lies below the bound
    assert val["val/token_joint_not_a_bound"] < val["val/nelbo_per_token"]
    assert val["val/token_joint_stderr"] > 0


def test_wandb_offline_keeps_one_run_id_across_restarts(markov_shards, tmp_path):
    args = [a for a in engine_args(markov_shards, tmp_path, "train.steps=4", "ckpt.every_steps=2")
            if a != "log.wandb=disabled"]
    first = run([*args, "log.wandb=offline"], nproc=1)
    assert first.returncode == 0, first.stdout[-3000:]
    run_id = (tmp_path / "tiny/wandb_id.txt").read_text().strip()
    (tmp_path / "tiny/wandb_id.txt").unlink()  # the id must come back from the checkpoint too
    again = run([*args[:-1], "train.steps=6", "ckpt.every_steps=2", "log.wandb=offline"], nproc=1)
    assert again.returncode == 0, again.stdout[-3000:]
    offline = sorted((tmp_path / "tiny/wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(d.name.endswith(run_id) for d in offline)  # two histories, one id
    shared = torch.load(tmp_path / "tiny/checkpoints/step_00000006/mp_rank_00_model_states.pt", weights_only=False)
    assert shared["wandb_id"] == run_id


def test_global_batch_sets_accumulation_for_any_world_size():
    assert Geometry.resolve(32, 0, 1, 0, 0).accumulation == 1
    g = Geometry.resolve(32, 4, 2, 1, 1)
    assert (g.micro_batch, g.accumulation) == (4, 4)
    assert Geometry.resolve(512, 8, 64, 0, 0).accumulation == 1
    with pytest.raises(ConfigError, match="not a multiple"):
        Geometry.resolve(32, 5, 2, 0, 0)


def test_export_consolidates_any_zero_stage_into_one_safetensors_file(two_rank, tmp_path):
    from prime_scale.export import export, load_exported

    root, runs, _ = two_rank
    assert succeeded(runs["export_z1"]) and succeeded(runs["export_z3"]), runs["export_z3"]["err"][-3000:]
    exported = {}
    for stage in (1, 3):
        for which in ("trained", "ema"):
            out = export(str(root / f"export/z{stage}/tiny/checkpoints"), str(tmp_path / f"x{stage}{which}"), which)
            exported[stage, which] = load_exported(str(out)).state_dict()
            assert json.loads((out / "export.json").read_text())["weights"] == which
    # ZeRO-1 and ZeRO-3 ran the same arithmetic: the consolidated weights and averages agree
    for which in ("trained", "ema"):
        a, b = exported[1, which], exported[3, which]
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not all(torch.equal(exported[3, "trained"][k], exported[3, "ema"][k]) for k in exported[3, "ema"])
    cli = subprocess.run([sys.executable, "-m", "prime_scale.export", f"ckpt={root / 'export/z3/tiny/checkpoints'}",
                          f"out={tmp_path / 'cli'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and json.loads(cli.stdout)["weights"] == "ema"  # the default when an EMA exists


def test_genmd4_exponents_train_alike_under_zero_1_and_zero_3(two_rank, tmp_path):
    """GenMD4's exponents are used by the loss outside the network's forward; under ZeRO-3 calling the schedule
    module is what gathers them. Both stages must learn the same exponents and weights; the index-shuffling
    permutation is exported from the checkpoint at both stages."""
    from prime_scale.export import export, load_exported

    root, runs, _ = two_rank
    exported = {}
    for stage in (1, 3):
        assert succeeded(runs[f"genmd4_z{stage}"]), runs[f"genmd4_z{stage}"]["err"][-3000:]
        out = export(str(root / f"genmd4/z{stage}/tiny/checkpoints"), str(tmp_path / f"x{stage}"))
        exported[stage] = load_exported(str(out)).state_dict()
    a, b = exported[1], exported[3]
    assert a["schedule.log_power"].abs().max() > 1e-3  # moved away from log w = 0 (w = schedule_power = 1)
    assert a.keys() == b.keys() and all(torch.allclose(a[k].double(), b[k].double(), atol=1e-5) for k in a)
    assert torch.equal(b["codec.permutation"], SubtokenCodec(64, 2, shuffle_seed=3).permutation)


def test_the_ar_baseline_trains_on_the_engine_and_reports_its_exact_nll(two_rank):
    root, runs, _ = two_rank
    assert succeeded(runs["ar"]), runs["ar"]["err"][-3000:]
    m = step_records(root / "ar/tiny")
    assert m[12]["loss"] < m[1]["loss"]
    evals = [json.loads(line) for line in (root / "ar/tiny/metrics.jsonl").read_text().splitlines()
             if "val/estimator" in line]
    assert evals and evals[-1]["val/estimator"] == "exact" and evals[-1]["val/sequences"] == 64


def test_checkpoints_on_s3_save_resume_and_export(two_rank, tmp_path, monkeypatch):
    root, runs, aws = two_rank
    for key, value in aws.items():  # the endpoint the runs wrote to (monkeypatch restores the variables)
        monkeypatch.setenv(key, value)
    assert succeeded(runs["s3_first"]), runs["s3_first"]["err"][-3000:]
    second = runs["s3_second"]
    assert succeeded(second) and f"resumed from {S3_CKPT}/step_00000010 at step 10" in second["out"]
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    assert json.loads(fs.cat_file(f"{S3_CKPT}/{LATEST}")) == {"tag": "step_00000015"}
    files = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{S3_CKPT}/step_00000015"))
    assert {"prime_manifest.json", "rank_00000.pt", "rank_00001.pt", "mp_rank_00_model_states.pt"} <= set(files)
    assert not (root / "s3/tiny/checkpoints").exists()  # nothing went to the local disk
    from prime_scale.export import export

    out = export(S3_CKPT, str(tmp_path / "export"), "trained")
    assert json.loads((out / "export.json").read_text())["step"] == 15
    s3fs.S3FileSystem.clear_instance_cache()


def test_compiled_model_trains_like_the_eager_one_and_exports_clean_names(markov_shards, tmp_path, capsys):
    from prime_scale.export import export, load_exported

    run_here(engine_args(markov_shards, tmp_path / "eager", "train.steps=4"), capsys)
    run_here(engine_args(markov_shards, tmp_path / "compiled", "train.steps=4", "engine.compile=true"), capsys)
    a, b = step_records(tmp_path / "eager/tiny"), step_records(tmp_path / "compiled/tiny")
    assert [b[k]["loss"] for k in range(1, 5)] == pytest.approx([a[k]["loss"] for k in range(1, 5)], rel=1e-4)
    out = export(str(tmp_path / "compiled/tiny/checkpoints"), str(tmp_path / "x"))
    assert all(not k.startswith("_orig_mod") for k in load_exported(str(out)).state_dict())


def test_wall_clock_saves_and_retention_keep_the_last_k_plus_every_nth(markov_shards, tmp_path, capsys):
    # a save whenever 60 microseconds passed (after every step), none by count; keep the last 2 and every 4th
    out = run_here(engine_args(markov_shards, tmp_path, "train.steps=9", "ckpt.every_steps=0",
                               "ckpt.every_minutes=0.000001", "ckpt.keep_last=2", "ckpt.keep_every=4"), capsys)
    assert out.count("[prime_scale] saved") == 9
    ckpt = tmp_path / "tiny/checkpoints"
    assert CheckpointStore(str(ckpt)).complete_tags() == ["step_00000004", "step_00000008", "step_00000009"]


def test_trains_on_imagenet32_format_image_shards_made_by_data_prep(tmp_path, imagenet32_shards):
    """The image data prep's ImageNet layout -> 32x32 pixel shards -> the engine on 2 ranks, C = 256, P = 3."""
    from PIL import Image

    data = imagenet32_shards
    done = run(["config=tiny_image", f"data.path={data}", f"run.out_dir={tmp_path}", "log.wandb=disabled",
                "train.log_every=5", "ckpt.every_minutes=0", "sample.every_steps=10"])
    assert done.returncode == 0, done.stdout[-3000:]
    evals = [json.loads(line) for line in (tmp_path / "tiny_image/metrics.jsonl").read_text().splitlines()
             if "val/bits_per_dim" in line]
    assert evals[-1]["val/tokens"] == 8 * 3072 and evals[-1]["val/bits_per_dim"] < 7.0  # uniform: 8 bits/dim
    # sample grids during training: 4 samples of 32x32, upscaled 2x, 2 tiles per row with 2-pixel gaps
    grids = sorted((tmp_path / "tiny_image/samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_00000010.png", "step_00000020.png"]
    assert Image.open(grids[-1]).size == (2 * 64 + 2, 2 * 64 + 2)
