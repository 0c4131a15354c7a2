"""``python -m prime_scale.sample``: text with a prompt, pixel grids, the AR model's NFE, and clear usage errors.

The models are trained for a few steps through the DeepSpeed engine, in this process: MDM-Prime and the AR baseline
on real text (conftest's ``trained_text_exports``: Python's documentation, a 512-piece SentencePiece vocabulary),
MDM-Prime on scikit-learn's 8x8 digits. The command runs as its ``main`` in this process; the usage-error test runs
the real command, to its exit status.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, fresh_env

from prime_scale import from_pretrained
from prime_scale.sample import main

PROMPT = "The json module"


def sample_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prime_scale.sample", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300,
                          env=fresh_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu"))


def sample_main(capsys, *args: str):
    """``python -m prime_scale.sample ARGS``'s main, in this process; fails the test unless it exits 0. Returns what
    it printed (``.out``, ``.err``)."""
    status = main(list(args))
    printed = capsys.readouterr()
    assert status == 0, printed.err[-3000:]
    return printed


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def digits_checkpoints(tmp_path_factory) -> Path:
    """A small MDM-Prime on the 8x8 digits (C = 17, l = 2, EMA on): its run's checkpoint folder, not exported."""
    from data_prep import digits
    from prime_scale import engine

    root = tmp_path_factory.mktemp("sample_digits")
    assert digits.main(["config=digits", f"data.path={root / 'data'}", "--no-progress"]) == 0
    assert engine.main(["config=digits", "data.source=shards", f"data.path={root / 'data'}", f"run.out_dir={root}",
                        "model.n_layer=1", "model.d_model=32", "model.n_head=2", "train.steps=6",
                        "train.batch_size=16", "train.warmup_steps=2", "train.eval_every=1000",
                        "eval.max_sequences=16", "ckpt.every_minutes=0", "log.wandb=disabled"]) == 0
    return root / "digits/checkpoints"


@pytest.mark.slow
def test_text_samples_keep_the_prompt_and_record_the_run(trained_text_exports, tmp_path, capsys):
    out = tmp_path / "out/samples.jsonl"
    done = sample_main(capsys, f"ckpt={trained_text_exports['prime']}", "num=3", "batch=2", "steps=16",
                       f"prompt={PROMPT}", "top_p=0.9", "float64=false", "seed=5", "sample.temperature=0.8",
                       f"out={out}")
    pre = from_pretrained(str(trained_text_exports["prime"]))
    prompt_ids = pre.tokenizer.encode(PROMPT)
    prompt_text = pre.detokenize([prompt_ids])[0]
    assert prompt_text == PROMPT
    got = rows(out)
    assert [r["index"] for r in got] == [0, 1, 2]
    for r in got:
        assert len(r["tokens"]) == 64 and all(0 <= t < 512 for t in r["tokens"])
        assert r["tokens"][: len(prompt_ids)] == prompt_ids  # the prompt stays fixed
        assert r["text"] == pre.detokenize([r["tokens"]])[0] and r["text"].startswith(prompt_text)
        assert r["prompt"] == prompt_text and r["completion"] == pre.detokenize([r["tokens"][len(prompt_ids):]])[0]
        assert 0 < r["nfe"] <= r["steps"] == 16 and r["corrector_nfe"] == 0
        assert 0 <= r["idle_steps"] < 16 and r["idle_ratio"] == sum(q["idle_steps"] for q in got) / (3 * 16)
        assert (r["top_p"], r["float64"], r["temperature"], r["seed"]) == (0.9, False, 0.8, 5)
        assert (r["prompt_tokens"], r["seq_len"], r["objective"]) == (len(prompt_ids), 64, "diffusion")
        assert r["tokens_per_s"] > 0 and r["weights"] == "trained" and r["model_step"] == 6
    assert [r["batch_seed"] for r in got] == [5, 5, 7]  # two batches: seed + index of their first sample
    assert got[0]["tokens"] != got[1]["tokens"]
    mean_nfe = sum(r["nfe"] for r in got) / 3
    assert got[0]["nfe"] == got[1]["nfe"]  # a row records the mean NFE of its batch
    assert f"NFE        : {mean_nfe:.1f} per sequence" in done.out
    assert "steps      : 16" in done.out and str(out) in done.out and "tokens/s" in done.out
    assert "batches" in done.err  # a progress bar over the 2 batches
    assert not out.with_suffix(".png").exists()  # text: no grid

    # the same seed gives the same samples: the first batch again, by a second call in this process
    again = tmp_path / "again.jsonl"
    assert main([f"ckpt={trained_text_exports['prime']}", "num=2", "batch=2", "steps=16", f"prompt={PROMPT}",
                 "top_p=0.9", "float64=false", "seed=5", "sample.temperature=0.8", f"out={again}"]) == 0
    assert [r["tokens"] for r in rows(again)] == [r["tokens"] for r in got[:2]]


@pytest.mark.slow
def test_ar_model_spends_one_call_per_generated_token(trained_text_exports, tmp_path, capsys):
    out = tmp_path / "ar.jsonl"
    done = sample_main(capsys, f"ckpt={trained_text_exports['ar']}", "num=2", f"prompt={PROMPT}", "temperature=0.7",
                       f"out={out}")
    prompt_ids = from_pretrained(str(trained_text_exports["ar"])).tokenizer.encode(PROMPT)
    for r in rows(out):
        assert r["objective"] == "ar" and r["tokens"][: len(prompt_ids)] == prompt_ids
        assert r["nfe"] == r["steps"] == 64 - len(prompt_ids)
        assert r["idle_steps"] == 0 and r["idle_ratio"] == 0.0  # every step generates a token
        assert r["text"].startswith(PROMPT) and r["temperature"] == 0.7
    steps = 64 - len(prompt_ids)
    assert f"NFE        : {steps:.1f} per sequence; idle steps 0.0% of {steps}" in done.out


@pytest.mark.slow
def test_pixel_samples_from_a_checkpoint_folder_make_a_grid(digits_checkpoints, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "digits.jsonl"
    done = sample_main(capsys, f"ckpt={digits_checkpoints}", "num=4", "steps=8", f"out={out}")
    grid = Image.open(tmp_path / "digits.png")
    assert grid.mode == "L" and grid.size == (2 * 64 + 2, 2 * 64 + 2)  # 4 digits of 8x8, upscaled 8x, 2x2 tiles
    got = rows(out)
    assert len(got) == 4 and all(len(r["tokens"]) == 64 and max(r["tokens"]) < 17 for r in got)
    assert all("text" not in r and r["weights"] == "ema" and 0 < r["nfe"] <= 8 for r in got)  # the EMA by default
    assert "digits.png" in done.out
    # prompt_ids keeps the first pixels fixed on any model
    fixed = tmp_path / "fixed.jsonl"
    assert main([f"ckpt={digits_checkpoints}", "num=2", "steps=8", "prompt_ids=0,0,16,16", "weights=trained",
                 f"out={fixed}"]) == 0
    assert all(r["tokens"][:4] == [0, 0, 16, 16] and r["weights"] == "trained" for r in rows(fixed))


def test_an_unknown_key_is_a_usage_error(tmp_path):
    """The real command: exit status 2, one line, no traceback."""
    done = sample_cli(f"ckpt={tmp_path}", "nmu=3", f"out={tmp_path / 's.jsonl'}")
    assert done.returncode == 2
    assert "unknown key 'nmu'; did you mean 'num'?" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "s.jsonl").exists()


@pytest.mark.parametrize("args,message", [
    (["sample.tempature=2"], "did you mean 'sample.temperature'"),
    (["top_p=1.5"], "sample.top_p must be in (0, 1]"),
    (["data.seq_len=8"], "only sample.* settings can change at sampling time"),
    (["num=0"], "num must be at least 1"),
    (["prompt=a", "prompt_ids=1"], "not both"),
    ([], "ckpt= is required"),
])
def test_bad_arguments_fail_before_loading_anything(args, message, capsys):
    assert main(["ckpt=/nowhere", *args] if args else ["num=2"]) == 2
    assert message in capsys.readouterr().err


def test_missing_checkpoint_is_a_usage_error(tmp_path, capsys):
    assert main([f"ckpt={tmp_path / 'nothing'}"]) == 2
    assert f"ckpt={tmp_path / 'nothing'} does not exist" in capsys.readouterr().err
    assert main([f"ckpt={tmp_path}"]) == 2  # a folder, but neither an export nor a checkpoint
    assert "neither an export (model.safetensors) nor a checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_prompts_the_model_cannot_take_are_usage_errors(trained_text_exports, digits_checkpoints, tmp_path, capsys):
    assert main([f"ckpt={digits_checkpoints}", "prompt=hello", f"out={tmp_path / 'a.jsonl'}"]) == 2
    assert "prompt=TEXT needs a tokenizer, and this model's data (digits) has none" in capsys.readouterr().err
    long = " ".join(["json"] * 80)
    assert main([f"ckpt={trained_text_exports['prime']}", f"prompt={long}", f"out={tmp_path / 'b.jsonl'}"]) == 2
    assert "but the model makes sequences of data.seq_len=64" in capsys.readouterr().err
    assert main([f"ckpt={trained_text_exports['prime']}", "prompt_ids=1,512", f"out={tmp_path / 'c.jsonl'}"]) == 2
    assert "lie outside [0, 512)" in capsys.readouterr().err
    assert not any(tmp_path.glob("*.jsonl"))


@pytest.fixture(autouse=True)
def one_thread():
    """In-process sampling on one thread, like the subprocesses (2 threads on a busy 2-core machine crawl)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
