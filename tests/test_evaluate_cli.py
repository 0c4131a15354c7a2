"""The evaluation CLI (python -m prime_scale.evaluate) and its metrics: unigram entropy, zero-shot PPL through the
model's tokenizer, generative PPL under an AR export or a local HuggingFace model, float64 and float32 samples."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import prepare_text
from py_docs import PY_DOCS, py_docs
import torch

from prime_scale.autoregressive import autoregressive_nll
from prime_scale.data.shards import read_token_shards
from prime_scale.evaluate import evaluate_nelbo, main
from prime_scale.export import from_pretrained
from prime_scale.data.packing import pack_documents
from prime_scale.text_metrics import (ARScorer, EvalError, HFScorer, mean_unigram_entropy, read_documents, split_at,
                                      unigram_entropy, windows, zero_shot_blocks)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("hf") / "gpt2")


def make_hf_model(folder: Path, context: int = 32) -> Path:
    """A tiny randomly initialised GPT-2 and a byte-level BPE tokenizer trained offline, saved as a local folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    lines = [line for f in py_docs("tutorial", 5) for line in f.read_text().splitlines() if line.strip()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(fast), n_positions=context, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------ unigram entropy


def test_unigram_entropy_known_values():
    assert unigram_entropy(torch.full((3, 50), 7)).tolist() == [0.0, 0.0, 0.0]
    for k in (2, 5, 64):
        row = torch.arange(k).repeat(3)  # k distinct tokens, each 3 times
        assert unigram_entropy(row[None])[0].item() == pytest.approx(math.log(k), abs=1e-12)
    # rows of different lengths; p = (1/3, 2/3)
    h = unigram_entropy([[0, 1, 1], [4, 4, 4, 4], [9, 8, 7, 6]])
    assert h.tolist() == pytest.approx([-(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3), 0.0, math.log(4)])
    assert mean_unigram_entropy(np.array([[1, 1], [1, 2]])) == pytest.approx(math.log(2) / 2)
    # the order of tokens does not matter, only their counts
    assert unigram_entropy([[3, 1, 3, 2]])[0] == pytest.approx(unigram_entropy([[1, 2, 3, 3]])[0].item())


def test_packing_and_windows_are_data_prep_concat_packing():
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    blocks, dropped = pack_documents(docs, "concat", 4, eos=2)
    stream = [5, 6, 7, 2, 8, 2, 9, 10, 11, 12, 13, 2]
    assert blocks.tolist() == [stream[0:4], stream[4:8], stream[8:12]] and dropped == 0
    blocks, dropped = pack_documents(docs, "concat", 5, eos=2)
    assert blocks.tolist() == [stream[0:5], stream[5:10]] and dropped == 2
    assert blocks.dtype == np.int64
    assert windows(range(7), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert split_at([1, 2, 9, 3, 9, 9], 9) == [[1, 2], [3], [], []]


# ------------------------------------------------------------------------------------------------ generative PPL


def test_gen_ppl_of_an_ar_scorer_is_the_exact_nll(world):
    source, judge = from_pretrained(str(world["prime"])), from_pretrained(str(world["ar"]))
    tokens = torch.randint(0, 512, (5, 64), generator=torch.Generator().manual_seed(3))
    scorer = ARScorer(judge, batch_size=2)
    got = scorer.score(source, tokens)
    nll = autoregressive_nll(judge.model, tokens, judge.model.codec)
    expected = nll.per_sequence.double().sum().item() / nll.tokens.sum().item()
    assert not got.retokenized and got.tokens == 5 * 64 and got.sequences == 5
    assert got.nll_per_token == pytest.approx(expected, rel=1e-6)
    assert got.ppl == pytest.approx(math.exp(expected), rel=1e-6)
    # samples longer than the scorer's seq_len are scored in windows of it, each from BOS
    long = tokens.reshape(-1)[:160][None]
    parts = [long[:, :64], long[:, 64:128], long[:, 128:]]
    total = sum(autoregressive_nll(judge.model, p, judge.model.codec).per_sequence.double().sum().item()
                for p in parts)
    assert scorer.score(source, long).nll_per_token == pytest.approx(total / 160, rel=1e-6)
    # another tokenizer: the samples go through text and the scorer's tokenizer
    foreign = from_pretrained(str(world["prime"]))
    foreign.dataset = {**foreign.dataset, "tokenizer": {**foreign.dataset["tokenizer"], "sha256": "0" * 64}}
    again = scorer.score(foreign, tokens)
    sp = judge.tokenizer
    ids = []
    for row in tokens.tolist():
        pieces = [sp.encode(sp.decode(p)) for p in split_at(row, 2)]
        ids += windows([t for i, p in enumerate(pieces) for t in ([2] if i else []) + p], 64)
    assert again.retokenized and again.nll_per_token == pytest.approx(scorer.score_ids(ids).nll_per_token)
    # a diffusion export cannot judge
    with pytest.raises(EvalError, match="not an autoregressive export"):
        ARScorer(source)


def test_hf_scorer_agrees_with_the_models_own_loss(world, hf_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = hf_model  # context 32
    source = from_pretrained(str(world["prime"]))
    tokens = torch.from_numpy(read_token_shards(str(world["data"]), "val")[:6, :64].astype(np.int64))
    tokens[0, 30] = 2  # an EOS inside a sample: two documents, joined by the HF tokenizer's EOS
    scorer = HFScorer(str(hf), batch_size=4)
    got = scorer.score(source, tokens)

    model = AutoModelForCausalLM.from_pretrained(str(hf), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(hf), local_files_only=True)
    bos = eos = tok.convert_tokens_to_ids("<|endoftext|>")
    total, count = 0.0, 0
    for row in tokens.tolist():
        docs = [source.tokenizer.decode(p) for p in split_at(row, 2)]
        ids = []
        for i, d in enumerate(docs):
            ids += ([eos] if i else []) + tok(d, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), 31):  # context 32 = BOS + 31 tokens
            window = torch.tensor([[bos] + ids[start : start + 31]])
            with torch.no_grad():
                loss = model(input_ids=window, labels=window).loss.item()  # mean over the predicted tokens
            total += loss * (window.shape[1] - 1)
            count += window.shape[1] - 1
    assert got.retokenized and got.tokens == count and got.sequences > len(tokens)  # windows were needed
    assert got.nll_per_token == pytest.approx(total / count, rel=1e-5)
    assert got.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_hf_scorer_without_transformers_or_folder_is_a_clear_error(monkeypatch, tmp_path):
    with pytest.raises(EvalError, match="no such local folder"):
        HFScorer(str(tmp_path / "nowhere"))
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(EvalError, match="pip install transformers"):
        HFScorer(str(tmp_path))


# ------------------------------------------------------------------------------------------------ zero-shot


def test_zero_shot_ppl_equals_evaluate_nelbo_on_hand_packed_blocks(world, tmp_path, capsys):
    py_docs("tutorial", 1)  # the Debian docs are there
    # a glob and a file, comma-separated; read in sorted order, one document per .txt file
    pattern = f"{PY_DOCS / 'tutorial' / 'app*.rst.txt'},{PY_DOCS / 'tutorial' / 'whatnow.rst.txt'}"
    chosen = sorted([*PY_DOCS.glob("tutorial/app*.rst.txt"), PY_DOCS / "tutorial" / "whatnow.rst.txt"])
    assert read_documents(pattern) == [f.read_text() for f in chosen] and len(chosen) == 3
    out = tmp_path / "report.json"
    # max_sequences caps the validation and the zero-shot blocks alike (evaluate_nelbo scores the first 40)
    rc = main([f"models=p={world['prime']},a={world['ar']}", f"zero_shot={pattern}", "max_sequences=40", "repeats=2",
               "seed=5", f"out={out}"])
    assert rc == 0
    report = json.loads(out.read_text())
    for row, key in zip(report["models"], ("prime", "ar")):
        pretrained = from_pretrained(str(world[key]))
        sp = pretrained.tokenizer
        stream = [t for f in chosen for t in sp.encode(f.read_text()) + [2]]
        n = len(stream) // 64
        by_hand = torch.tensor(stream[: n * 64]).reshape(n, 64)
        assert torch.equal(zero_shot_blocks(pretrained, [f.read_text() for f in chosen])[0], by_hand)
        cfg = pretrained.config
        cfg.eval.max_sequences, cfg.eval.repeats = 40, 2
        expected = evaluate_nelbo(pretrained.model, by_hand, cfg, seed=5)
        zs = row["zero_shot"]
        assert n > 40 and (zs["sequences"], zs["tokens"], zs["blocks"]) == (40, 40 * 64, n)
        assert zs["nelbo_per_token"] == pytest.approx(expected.nelbo_per_token, rel=1e-9)
        assert zs["ppl"] == pytest.approx(math.exp(expected.nelbo_per_token), rel=1e-9)
        assert zs["dropped_tail_tokens"] == len(stream) - n * 64
    assert report["models"][1]["zero_shot"]["estimator"] == "exact"

    # refused, clearly, without the tokenizer
    bare = tmp_path / "bare"
    shutil.copytree(world["prime"], bare)
    (bare / "tokenizer.model").unlink()
    with pytest.raises(EvalError, match="needs the model's tokenizer"):
        zero_shot_blocks(from_pretrained(str(bare)), ["some text"])
    capsys.readouterr()
    assert main([f"models={bare}", f"zero_shot={pattern}"]) == 2
    err = capsys.readouterr().err
    assert "bare: zero-shot perplexity needs the model's tokenizer" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ the CLI


def test_cli_table_and_json_with_an_hf_scorer(world, hf_model, tmp_path, capsys):
    hf = hf_model
    out = tmp_path / "r.json"
    assert main([f"models={world['prime']},{world['ar']}", f"scorer=hf:{hf}", "gen_samples=3", "gen_steps=16",
                 "max_sequences=16", f"out={out}"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0].split()[:4] == ["model", "family", "l", "schedule"] and "genPPL f64" in lines[0]
    assert lines[0].endswith("NFE  idle %") and lines[3].split()[-2:] == ["64.0", "0.0"]  # AR: a token per step
    assert lines[2].split()[:4] == ["prime", "MDM-Prime", "2", "linear"]
    assert lines[3].split()[:4] == ["ar", "AR", "1", "-"]
    report = json.loads(out.read_text())
    assert report["scorer"]["kind"] == "hf" and report["scorer"]["bos_prefix"]
    prime, ar = report["models"]
    for row in (prime, ar):
        v = row["val"]
        assert v["sequences"] == 16 and v["tokens"] == 16 * 64 and math.isfinite(v["nelbo_per_token"])
        assert v["ppl"] == pytest.approx(math.exp(v["nelbo_per_token"]))
        for precision in ("float64", "float32"):
            g = row["gen"][precision]
            assert g["float64"] == (precision == "float64") and g["samples"] == 3 and g["retokenized"]
            assert math.isfinite(g["gen_ppl"]) and g["gen_ppl"] == pytest.approx(math.exp(g["gen_nll_per_token"]))
            assert 0 < g["entropy"] <= math.log(64)
        assert 0 < row["gen"]["val_entropy"] <= math.log(64)
    assert prime["gen"]["float64"]["steps"] == 16 and prime["gen"]["float64"]["nfe"] <= 16
    assert 0 <= prime["gen"]["float64"]["idle_ratio"] < 1 and ar["gen"]["float64"]["idle_ratio"] == 0
    assert ar["gen"]["float64"]["nfe"] == 64 and ar["val"]["estimator"] == "exact" and prime["val"]["estimator"] == "count"
    # the val numbers are evaluate_nelbo's with the CLI's settings
    pretrained = from_pretrained(str(world["prime"]))
    cfg = pretrained.config
    cfg.eval.max_sequences, cfg.eval.repeats, cfg.eval.batch_size = 16, 4, 64
    seqs = torch.from_numpy(read_token_shards(str(world["data"]), "val").astype(np.int64))
    assert prime["val"]["nelbo_per_token"] == pytest.approx(
        evaluate_nelbo(pretrained.model, seqs, cfg, seed=0).nelbo_per_token, rel=1e-9)


def test_cli_bad_keys_paths_and_mismatched_data_exit_2(world, tmp_path, capsys):
    def fails(*argv: str) -> str:
        assert main(list(argv)) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    assert "did you mean 'zero_shot'" in fails(f"models={world['prime']}", "zeroshot=x")
    assert "models= is required" in fails("gen_samples=4")
    assert "gen_samples expects int, got 'many'" in fails(f"models={world['prime']}", "gen_samples=many")
    assert "neither an export folder" in fails(f"models={tmp_path / 'nowhere'}")
    assert "does not exist" in fails(f"models={world['prime']}", f"zero_shot={tmp_path / 'nothing.txt'}")
    assert "not an autoregressive export" in fails(f"models={world['ar']}", f"scorer={world['prime']}",
                                                   "gen_samples=2")
    assert "no such local folder" in fails(f"models={world['ar']}", f"scorer=hf:{tmp_path / 'nohf'}",
                                           "gen_samples=2")
    assert "no prepared shards" in fails(f"models={world['prime']}", f"data={tmp_path / 'nodata'}")
    # shards made by another tokenizer (trained on other documents) are refused, not scored
    other = prepare_text(tmp_path, "other", py_docs("tutorial", 8))
    err = fails(f"models=mine={world['prime']}", f"data={other}")
    assert "mine:" in err and "tokenizer sha256" in err
    # shards of the model's own tokenizer are fine
    assert main([f"models={world['prime']}", f"data={world['data']}", "max_sequences=4", "repeats=1"]) == 0


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_end_to_end_prepare_train_export_evaluate(text_shards, tmp_path, capsys):
    """Real text prepared by the text data prep, two tiny models trained by the DeepSpeed engine (one rank, in this
    process), the AR one exported, then python -m prime_scale.evaluate's main (in this process, on one thread as
    the command would run here) with the AR export as the judge of both models' samples."""
    from prime_scale import engine
    from prime_scale.export import main as export_main

    data = text_shards
    common = ["config=tiny", "data.source=shards", f"data.path={data}", "data.vocab_size=512", "data.seq_len=64",
              "train.steps=20", "train.eval_every=1000", "log.wandb=disabled", f"run.out_dir={tmp_path / 'runs'}"]
    assert engine.main([*common, "run.name=prime", "prime.num_subtokens=2"]) == 0
    assert engine.main([*common, "run.name=ar", "model.objective=ar", "prime.num_subtokens=1"]) == 0
    assert export_main([f"ckpt={tmp_path / 'runs/ar/checkpoints'}", f"out={tmp_path / 'ar_export'}"]) == 0

    out = tmp_path / "eval.json"
    zero_shot = ",".join(str(p) for p in py_docs("tutorial", 3))
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the Prime model as its checkpoint folder (exported on the fly), the AR model as an export
        status = main([f"models={tmp_path / 'runs/prime/checkpoints'},ar={tmp_path / 'ar_export'}",
                       f"scorer={tmp_path / 'ar_export'}", "gen_samples=4", "max_sequences=64",
                       f"zero_shot={zero_shot}", f"out={out}"])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr()
    assert status == 0, (printed.out[-2000:], printed.err[-3000:])
    table = printed.out.splitlines()
    assert table[0].split()[:4] == ["model", "family", "l", "schedule"]
    assert "genPPL f64" in table[0] and "genPPL f32" in table[0] and "H f64" in table[0] and "H f32" in table[0]
    assert table[2].split()[:4] == ["prime", "MDM-Prime", "2", "linear"]
    assert table[3].split()[:4] == ["ar", "AR", "1", "-"]

    report = json.loads(out.read_text())
    assert report["scorer"]["kind"] == "ar" and report["scorer"]["seq_len"] == 64
    prime, ar = report["models"]
    assert (prime["step"], ar["step"]) == (20, 20)
    assert ar["val"]["estimator"] == "exact" and ar["val"]["repeats"] == 1
    assert prime["val"]["estimator"] == "count"
    for row in (prime, ar):
        for part in (row["val"], row["zero_shot"]):
            assert math.isfinite(part["nelbo_per_token"]) and part["stderr"] > 0
            assert part["ppl"] == pytest.approx(math.exp(part["nelbo_per_token"]), rel=1e-12)
            assert part["bits_per_dim"] == pytest.approx(part["nelbo_per_token"] / math.log(2), rel=1e-12)
            # 20 steps on real text already beat the uniform model's log(512) = 6.24 nats/token
            assert part["nelbo_per_token"] < math.log(512)
        assert row["val"]["sequences"] == 64 and row["zero_shot"]["documents"] == 3
        gen = row["gen"]
        for precision in ("float64", "float32"):
            g = gen[precision]
            assert g["float64"] == (precision == "float64") and g["samples"] == 4 and not g["retokenized"]
            assert g["gen_scored_tokens"] == 4 * 64 and math.isfinite(g["gen_ppl"]) and g["gen_ppl"] > 1
            assert 0 < g["entropy"] <= math.log(64) and len(g["examples"]) == 2
        assert 0 < gen["val_entropy"] <= math.log(64)
    assert ar["gen"]["float64"]["nfe"] == 64 and 0 < prime["gen"]["float64"]["nfe"] <= 64 * 2
    # the table shows the JSON's numbers
    assert f"{prime['val']['nelbo_per_token']:.4f} ± {prime['val']['stderr']:.4f}" in table[2]
    assert f"{ar['gen']['float32']['gen_ppl']:.2f}" in table[3]
