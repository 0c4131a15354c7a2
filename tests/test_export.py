"""Export -> from_pretrained: the same network as the DeepSpeed engine that trained it, without DeepSpeed.

Each model is trained through the DeepSpeed engine (ZeRO-2 on 2 ranks under torchrun, ZeRO-0 on 1 rank in this
process), exported by ``python -m prime_scale.export``'s main, and compared with a second DeepSpeed engine, built
from the run's config.yaml after the training's engine is gone, that loaded the same checkpoint from disk (the
engine's own ``restore``): the same logits on the same inputs. The second engine runs where the training ran: in
this process (1 rank), or in the same torchrun launch, after the training (2 ranks), so that the start-up of
torchrun, Python, torch and DeepSpeed is paid once.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pytest
from engine_logits import engine_logits
from helpers import REPO, export_cli, fresh_env, torchrun, train, train_args
from py_docs import PY_DOCS
import torch
from safetensors.torch import load_file, save_file

from prime_scale import from_pretrained
from prime_scale.objective import sample_with_config


def train_and_engine_logits(data: Path, out: Path, *extra: str, nproc: int) -> Path:
    """``helpers.train``'s run (returns its folder), then tests/engine_logits.py's reference saved at
    out/engine.pt: 1 rank in this process, more in one torchrun launch, each rank on one thread."""
    if nproc == 1:
        run_dir = train(data, out, *extra)
        engine_logits(str(run_dir), str(out / "engine.pt"))
        return run_dir
    done = subprocess.run(torchrun(nproc, str(REPO / "tests/engine_logits.py"), str(out / "tiny"),
                                   str(out / "engine.pt"), *train_args(data, out, *extra)), cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=fresh_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu"))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return out / "tiny"


@pytest.mark.slow  # trains through DeepSpeed
@pytest.mark.parametrize("name,nproc,extra", [
    ("prime_shuffled_zero2", 2, ["engine.zero_stage=2", "prime.shuffle_tokens=true", "prime.shuffle_seed=7"]),
    ("genmd4_zero0", 1, ["diffusion.schedule=genmd4", "diffusion.eval_estimator=continuous",
                         "diffusion.schedule_power=2.0"]),
    ("ar_zero0", 1, ["model.objective=ar", "prime.num_subtokens=1"]),
])
def test_exported_model_gives_the_engines_logits(markov_shards, tmp_path, name, nproc, extra):
    run_dir = train_and_engine_logits(markov_shards, tmp_path, *extra, nproc=nproc)
    ref = torch.load(tmp_path / "engine.pt", weights_only=True)

    info = export_cli(run_dir, tmp_path / "export")
    assert (info["step"], info["weights"], info["world_size"]) == (6, "trained", nproc)
    pre = from_pretrained(str(tmp_path / "export"))
    assert pre.info == info and pre.tokenizer is None and pre.dataset["source"] == "markov"
    assert not pre.model.training and all(p.dtype == torch.float32 for p in pre.model.parameters())
    state = pre.model.state_dict()
    assert state.keys() == ref["state"].keys()
    assert all(torch.equal(state[k], ref["state"][k].float()) for k in state), name
    with torch.no_grad():
        logits = pre.model(ref["digits"], ref["rate"], causal=pre.config.model.objective == "ar")
    assert logits.shape == ref["logits"].shape == (4, 32, 64)
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-6, atol=1e-6)
    # a trained model, not the initial one: the logits are not those of a fresh network of the same config
    torch.manual_seed(0)
    fresh = type(pre.model).from_config(pre.config).eval()
    with torch.no_grad():
        initial = fresh(ref["digits"], ref["rate"], causal=pre.config.model.objective == "ar")
    assert (initial - logits).abs().max() > 1e-3

    # the export samples with the run's own sampler settings (GenMD4: its learned schedule; AR: left to right)
    pre.config.sample.steps = 8
    out = sample_with_config(pre.config, pre.model, pre.model.codec, 2, 0, "cpu")
    assert out.tokens.shape == (2, 32) and int(out.tokens.min()) >= 0 and int(out.tokens.max()) < 64
    if pre.config.model.objective == "ar":
        assert out.nfe == out.steps == 32  # one call per token
    else:
        assert 0 < out.nfe <= 8  # at most one evaluation per step

    if "prime.shuffle_tokens=true" in extra:
        codec = pre.model.codec
        perm = codec.permutation
        assert perm is not None and torch.equal(perm, ref["state"]["codec.permutation"])
        assert not torch.equal(perm, torch.arange(64)) and torch.equal(perm.sort().values, torch.arange(64))
        assert "codec.permutation" in load_file(str(tmp_path / "export/model.safetensors"))
        assert torch.equal(codec.encode(ref["tokens"]), ref["clean"])  # the engine's digits for the same tokens
        every = torch.arange(64)
        assert torch.equal(codec.decode(codec.encode(every)), every)  # exact decoding of every token
        assert torch.equal(codec.decode(ref["clean"]), ref["tokens"])
        # the permutation in the file is the one used, not one regenerated from the seed in the config
        weights = load_file(str(tmp_path / "export/model.safetensors"))
        other = torch.from_numpy(np.random.default_rng(123).permutation(64).astype(np.int64))
        weights["codec.permutation"] = other
        save_file(weights, str(tmp_path / "export/model.safetensors"))
        changed = from_pretrained(str(tmp_path / "export")).model.codec
        assert torch.equal(changed.permutation, other)
        assert torch.equal(changed.encode(every)[:, 0] * changed.base + changed.encode(every)[:, 1], other)
        assert torch.equal(changed.decode(changed.encode(every)), every)
    if "diffusion.schedule=genmd4" in extra:
        log_power = pre.model.schedule.log_power
        assert log_power.shape == (2, 8)  # (l, b): C = 64, l = 2 -> b = 8
        assert torch.equal(log_power.detach(), ref["state"]["schedule.log_power"])
        init = torch.full_like(log_power, float(np.log(2.0)))
        assert (log_power - init).abs().max() > 1e-4  # learned during training, and kept by the export
        assert "schedule.log_power" in load_file(str(tmp_path / "export/model.safetensors"))
    if "model.objective=ar" in extra:
        assert pre.config.model.objective == "ar" and pre.model.codec.num_subtokens == 1
        assert pre.model.schedule is None


@pytest.mark.slow  # trains through DeepSpeed (conftest's trained_text_exports)
def test_text_export_carries_the_tokenizer_that_made_the_data(text_shards, trained_text_exports):
    import sentencepiece as spm

    from prime_scale.data.shards import read_token_shards

    data, export = text_shards, trained_text_exports["prime"]
    pre = from_pretrained(str(export))

    model_bytes = (data / "tokenizer.model").read_bytes()
    assert (export / "tokenizer.model").read_bytes() == model_bytes
    assert pre.dataset["kind"] == "text"
    assert pre.dataset["tokenizer"]["sha256"] == hashlib.sha256(model_bytes).hexdigest()
    assert pre.tokenizer is not None and pre.tokenizer.vocab_size == pre.config.data.vocab_size == 512
    # the training data decodes to the same text through the export as through the data's own tokenizer
    sp = spm.SentencePieceProcessor(model_file=str(data / "tokenizer.model"))
    val = read_token_shards(str(data), "val")[:8, :64]
    assert pre.detokenize(val) == [sp.decode(row.tolist()) for row in val]
    # and real prose round-trips: encode -> detokenize gives the text back
    prose = [line for line in (PY_DOCS / "library/json.rst.txt").read_text().splitlines() if len(line) > 40][:20]
    assert len(prose) == 20
    assert pre.detokenize([pre.tokenizer.encode(s) for s in prose]) == prose
    # a model without a tokenizer says so
    pre.tokenizer = None
    with pytest.raises(ValueError, match="no tokenizer"):
        pre.detokenize(val)


def test_export_cli_says_what_is_wrong(tmp_path, capsys):
    from prime_scale.export import main

    assert main([f"out={tmp_path / 'x'}"]) == 2
    assert "error: ckpt= is required" in capsys.readouterr().err
    assert main([f"ckpt={tmp_path}", f"out={tmp_path / 'x'}", "wieghts=ema"]) == 2
    assert "unknown key 'wieghts'; did you mean 'weights'?" in capsys.readouterr().err
    assert main([f"ckpt={tmp_path}", f"out={tmp_path / 'x'}", "weights=best"]) == 2
    assert "weights must be one of auto, ema, trained" in capsys.readouterr().err
    assert main([f"ckpt={tmp_path / 'nothing'}", f"out={tmp_path / 'x'}"]) == 2
    assert f"ckpt={tmp_path / 'nothing'} does not exist" in capsys.readouterr().err
    assert main([f"ckpt={tmp_path}", f"out={tmp_path / 'x'}"]) == 2  # a folder without checkpoints
    assert f"cannot export ckpt={tmp_path}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
