"""The user's first command, end to end, and the errors a user meets first."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from prime_scale.config import ConfigError, load_config
from prime_scale.pipeline import load_split, prepare_data

REPO = Path(__file__).resolve().parent.parent


def launch(*args, cwd):
    return subprocess.run(
        [sys.executable, str(REPO / "launchers" / "local.py"), *args], cwd=cwd, capture_output=True, text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_local_launcher_runs_prep_train_eval_sample(tmp_path):
    proc = launch("config=tiny", f"run.out_dir={tmp_path}/runs", f"data.path={tmp_path}/data", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for needle in ("validation NELBO", "validation PPL", "true entropy", "sample 0:", "NFE", "idle steps"):
        assert needle in out, out
    run_dir = tmp_path / "runs" / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    val = summary["val"]
    assert val["ppl"] == pytest.approx(math.exp(val["nelbo_per_token"]))
    assert val["tokens"] == val["sequences"] * 32
    assert summary["true_entropy_per_token"] > 0
    assert val["nelbo_per_token"] >= summary["true_entropy_per_token"] - 3 * val["stderr"]
    assert summary["sampling"]["nfe"] < 64 * 2  # cached: never more than the number of sub-tokens
    assert 0 <= summary["sampling"]["idle_ratio"] < 1
    # the resolved config is saved with the run and reloads to the same values
    saved = load_config([f"config={run_dir / 'config.yaml'}"])
    assert saved == load_config(["config=tiny", f"run.out_dir={tmp_path}/runs", f"data.path={tmp_path}/data"])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 50 and "val/nelbo_per_token" in metrics[-1]
    assert (run_dir / "export/model.safetensors").exists() and summary["step"] == 50
    assert json.loads((run_dir / "checkpoints/latest.json").read_text()) == {"tag": "step_00000050"}


@pytest.mark.slow
def test_local_launcher_trains_on_two_ranks_and_resumes_with_the_same_command(tmp_path):
    args = ("--nproc", "2", "config=tiny", f"run.out_dir={tmp_path}/runs", f"data.path={tmp_path}/data",
            "log.wandb=disabled", "train.steps=20", "ckpt.every_steps=10")
    first = launch(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "--nproc_per_node 2" in first.stdout and "validation NELBO" in first.stdout
    again = launch(*args[:-2], "train.steps=30", "ckpt.every_steps=10", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "at step 20" in again.stdout
    assert json.loads((tmp_path / "runs/tiny/summary.json").read_text())["step"] == 30


def test_config_typo_fails_before_anything_runs(tmp_path):
    proc = launch("config=tiny", "model.n_layers=3", cwd=tmp_path)
    assert proc.returncode == 2
    assert "did you mean 'model.n_layer'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "override,message",
    [("data.vocab_size=1", "vocab_size"), ("prime.num_subtokens=0", "num_subtokens"), ("data.seq_len=0", "seq_len")],
)
def test_degenerate_settings_are_refused_clearly(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["config=tiny", override])


def test_sequences_shorter_than_seq_len_are_a_clear_error(tmp_path):
    cfg = load_config(["config=tiny", f"data.path={tmp_path}", "data.seq_len=16"])
    manifest = prepare_data(cfg)
    longer = load_config(["config=tiny", f"data.path={tmp_path}", "data.seq_len=32", "data.source=shards"])
    with pytest.raises(ValueError, match="hold 16 tokens, but seq_len=32"):
        load_split(longer, manifest, "train")


def test_missing_shards_point_to_data_prep(tmp_path):
    cfg = load_config(["config=tiny", f"data.path={tmp_path}/nothing", "data.source=shards"])
    with pytest.raises(ConfigError, match="run data prep first"):  # launchers/local.py: exit status 2
        prepare_data(cfg)


def test_data_prep_runs_as_a_child_and_its_exit_status_carries_over(tmp_path, capfd, monkeypatch):
    """The markov and digits sources are prepared by their data-prep job in a child process: its refusal (exit 2)
    is a ConfigError (the launcher exits 2), any other failure a DataPrepFailure (the pipeline returns 1); the
    job's own message shows."""
    from prime_scale import pipeline
    from prime_scale.data.errors import DataPrepFailure

    prepare_data(load_config(["config=tiny", f"data.path={tmp_path}/data"]))
    assert "data prep: python -m data_prep.synthetic" in capfd.readouterr().out
    other = load_config(["config=tiny", f"data.path={tmp_path}/data", "data.markov_seed=99",
                         f"run.out_dir={tmp_path}/runs"])
    with pytest.raises(ConfigError, match="python -m data_prep.synthetic refused to prepare data.path="):
        prepare_data(other)
    assert "different data config" in capfd.readouterr().err  # the job's own error, above the launcher's

    monkeypatch.setitem(pipeline.PREP_JOBS, "markov", ["data_prep.no_such_job"])
    with pytest.raises(DataPrepFailure, match="exit status 1"):
        prepare_data(other)
    assert pipeline.run(other, [], nproc=1) == 1  # before training starts
    assert "failed to prepare" in capfd.readouterr().err and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_digits_demo_beats_the_independent_pixel_model_and_writes_a_grid(tmp_path):
    """The image demo, shortened (400 steps of a 2-layer model with a narrower MLP instead of the config's 1500
    steps of 4 layers): bits/dim on held-out digits below the best independent per-pixel categorical model fitted
    on the training set, both printed, and a PNG grid of the samples."""
    from PIL import Image

    # Settings chosen by measurement for a short run: EMA 0.98, as plain EMA from the initial weights would keep
    # 0.995^400 = 13% of them; rope_base 100, as positions come from RoPE alone and with base 10000 the model sits
    # on a plateau for a seed-dependent number of steps. (baseline - ours) / stderr measured with these settings:
    # 8.7, 9.5, 7.4, 9.2, 8.6 for train.seed 0-4 (the test needs > 3); the config's model and EMA for 450 steps
    # gave 5.2 and -9.4 (seeds 0, 1).
    proc = launch("config=digits", f"run.out_dir={tmp_path}/runs", f"data.path={tmp_path}/data", "log.wandb=disabled",
                  "train.steps=400", "train.warmup_steps=40", "train.lr=3e-3", "train.eval_every=400",
                  "engine.ema_decay=0.98", "model.n_layer=2", "model.mlp_ratio=2", "model.rope_base=100",
                  "sample.num_samples=16", "sample.steps=64", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/digits/summary.json").read_text())
    ours, baseline = summary["val"]["bits_per_dim"], summary["independent_pixel_baseline"]["bits_per_dim"]
    assert ours + 3 * summary["val"]["stderr"] / math.log(2) < baseline, (ours, baseline)
    assert f"{baseline:.4f} bits/dim" in proc.stdout and f"{ours:.4f}" in proc.stdout
    grid = Image.open(summary["sample_grid"])
    assert grid.mode == "L" and grid.size == (4 * 64 + 3 * 2, 4 * 64 + 3 * 2)  # 16 samples, 8x8 upscaled 8x


@pytest.mark.slow
def test_image_run_reports_fid_and_inception_score_with_the_stand_in_network(tmp_path, imagenet32_shards):
    proc = launch("config=tiny_image", f"data.path={imagenet32_shards}", f"run.out_dir={tmp_path}/runs",
                  "log.wandb=disabled", "train.steps=6", "eval.fid_samples=8", "eval.fid_features=standin",
                  "sample.num_samples=4", "sample.steps=16", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/tiny_image/summary.json").read_text())
    f = summary["fid"]
    assert f["samples"] == 8 and f["reference_split"] == "train" and f["fid"] > 0 and f["inception_score"] >= 1.0
    assert "stand-in features: not comparable to published FIDs" in proc.stdout
    assert list(imagenet32_shards.glob("fid_stats_train_*.npz"))  # the reference statistics, cached once
    assert Path(summary["sample_grid"]).exists()
