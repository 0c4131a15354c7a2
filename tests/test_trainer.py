"""The Trainer, its callbacks and its RunContext, in this process: a training run called from Python leaves the
process as it found it (signal handlers, rendezvous variables, process group, thread count), so a second run, or
an export, an evaluation or Ctrl-C after it, behaves as in a fresh process; a callback is the extension point; and
the small fixes of issue 18 (the gradient norm under ZeRO-0 on logged steps only, weight decay chosen by layer
type)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import torch.distributed as dist

from prime_scale import engine, trainer
from prime_scale.callbacks import Callback
from prime_scale.cli import EXIT_RESUMABLE
from prime_scale.config import load_config
from prime_scale.data.manifest import checked_dataset
from prime_scale.metrics import step_records
from prime_scale.run_context import RENDEZVOUS_VARIABLES, STOP_SIGNALS, RunContext
from prime_scale.run_paths import RunPaths
from prime_scale.trainer import Geometry

pytestmark = pytest.mark.slow  # trains tiny models under DeepSpeed (a few seconds each)


def args(data, out, *extra: str) -> list[str]:
    return ["config=tiny", "data.source=shards", f"data.path={data}", f"run.out_dir={out}", "train.steps=6",
            "train.log_every=2", "train.eval_every=1000", "ckpt.every_steps=0", "ckpt.every_minutes=0",
            "log.wandb=disabled", "train.warmup_steps=2", "train.device=cpu", *extra]


def process_state() -> dict:
    return {"handlers": {s: signal.getsignal(s) for s in STOP_SIGNALS},
            "variables": {k: os.environ.get(k) for k in (*RENDEZVOUS_VARIABLES, "DS_ACCELERATOR")},
            "group": dist.is_initialized(), "threads": torch.get_num_threads()}


def test_training_in_process_leaves_the_process_as_it_found_it(markov_shards, tmp_path, capsys):
    before = process_state()
    assert engine.main(args(markov_shards, tmp_path, "train.num_threads=1", "engine.ema_decay=0.9")) == 0
    assert process_state() == before
    # a second run in the same process: a fresh process group, and the first run's checkpoint to resume from
    assert engine.main(args(markov_shards, tmp_path, "train.steps=8", "engine.zero_stage=0")) == 0
    assert "resumed from" in capsys.readouterr().out
    assert process_state() == before
    assert sorted(step_records(tmp_path / "tiny")) == [2, 4, 6, 8]


class SignalAt(Callback):
    """Sends this process a signal after a given step: the stop path, in-process."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum, self.steps = step, signum, []

    def post_step(self, t, result) -> None:
        self.steps.append(t.progress.step)
        if t.progress.step == self.step:
            os.kill(os.getpid(), self.signum)


def test_a_callback_sees_every_step_and_a_signal_saves_and_stops(markov_shards, tmp_path):
    cfg = load_config(args(markov_shards, tmp_path, "train.steps=20"))
    before = process_state()
    with RunContext.of(cfg) as ctx:
        t = engine.build_trainer(cfg, ctx, Geometry.of(cfg, ctx), checked_dataset(cfg).to_json())
        probe = SignalAt(3, signal.SIGUSR2)
        t.callbacks.insert(0, probe)  # runs before the Checkpointer: the signal is agreed in the next step
        summary = t.fit()
    assert process_state() == before  # the handlers the trainer installed are gone again
    assert summary["exit_code"] == EXIT_RESUMABLE and summary["step"] == 4
    assert probe.steps == [1, 2, 3, 4]
    assert t.last_saved == (4, "step_00000004")
    stops = [r for r in (tmp_path / "tiny/metrics.jsonl").read_text().splitlines() if "stopped_by_signal" in r]
    assert len(stops) == 1 and f'"stopped_by_signal": {int(signal.SIGUSR2)}' in stops[0]


@pytest.mark.parametrize("stage, expected", [(0, 3), (2, 0)])
def test_the_gradient_norm_is_measured_on_logged_steps_only(markov_shards, tmp_path, monkeypatch, stage, expected):
    calls = []
    real = trainer._grad_norm
    monkeypatch.setattr(trainer, "_grad_norm", lambda m: calls.append(1) or real(m))
    assert engine.main(args(markov_shards, tmp_path, f"engine.zero_stage={stage}")) == 0
    assert len(calls) == expected  # ZeRO-0: at steps 2, 4, 6; ZeRO 1-3 report the norm DeepSpeed clipped with
    records = step_records(tmp_path / "tiny")
    assert sorted(records) == [2, 4, 6] and all(r["grad_norm"] > 0 for r in records.values())


def test_weight_decay_falls_on_linear_matrices_only():
    from prime_scale.model import PrimeTransformer
    from prime_scale.optim import build_optimizer

    cfg = load_config(["config=tiny", "prime.num_subtokens=2", "model.merge=mlp", "model.time_conditioning=true",
                       "diffusion.schedule=genmd4", "diffusion.eval_estimator=continuous"])
    model = PrimeTransformer.from_config(cfg)
    decay, no_decay = build_optimizer(model, cfg.train).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == cfg.train.weight_decay and no_decay["weight_decay"] == 0.0
    # the merge MLP's and the time embedding's matrices are decayed although their names contain "embed"
    assert {"embed.merge_mlp.1.weight", "embed.merge_mlp.3.weight", "time_embed.mlp.0.weight",
            "time_embed.mlp.2.weight", "head.weight", "blocks.0.attn.qkv.weight"} <= decayed
    assert decayed == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) for n in [f"{n}.weight"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert {"embed.table.weight", "schedule.log_power", "time_embed.mlp.0.bias"} <= kept
    assert len(decayed) + len(kept) == len(list(model.parameters()))


def test_run_paths_is_the_run_folder_layout(tmp_path):
    cfg = load_config(["config=tiny", f"run.out_dir={tmp_path}", "run.name=r"])
    paths = RunPaths.of(cfg)
    assert (paths.root, paths.checkpoints, paths.metrics) == (tmp_path / "r", str(tmp_path / "r/checkpoints"),
                                                              tmp_path / "r/metrics.jsonl")
    assert paths.lock_folders() == [str(tmp_path / "r")]
    outside = RunPaths(tmp_path / "r", "s3://bucket/ckpt")
    assert outside.checkpoints == "s3://bucket/ckpt" and outside.lock_folders() == [str(tmp_path / "r"),
                                                                                  "s3://bucket/ckpt"]
    assert RunPaths(tmp_path / "r", str(tmp_path / "r/ck")).lock_folders() == [str(tmp_path / "r")]


def test_run_paths_reads_the_metrics_a_live_or_killed_run_left(tmp_path):
    """metric_records skips a line cut short (a kill, or a write in progress); validation_records keeps the
    evaluations, in order, at one step when asked (a resumed run may have evaluated a step twice)."""
    paths = RunPaths(tmp_path)
    assert list(paths.metric_records()) == [] and paths.validation_records() == []  # before the first line
    lines = [{"step": 1, "loss": 2.0}, {"step": 2, "val/nelbo_per_token": 1.9, "val/stderr": 0.1},
             {"step": 2, "val/nelbo_per_token": 1.8, "val/stderr": 0.1}, {"step": 3, "loss": 1.7},
             {"step": 4, "val/nelbo_per_token": 1.6, "val/stderr": 0.1}]
    paths.metrics.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 5, "lo')
    assert list(paths.metric_records()) == lines
    assert [r["val/nelbo_per_token"] for r in paths.validation_records()] == [1.9, 1.8, 1.6]
    assert [r["val/nelbo_per_token"] for r in paths.validation_records(2)] == [1.9, 1.8]
    assert paths.validation_records(3) == []
