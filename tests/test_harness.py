"""prime_scale as an lm-evaluation-harness model (prime_scale/harness.py, docs/harness.md): local tasks run by
lm_eval's own machinery, offline, against prime_scale's own evaluation and direct computations."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from py_docs import py_docs

from prime_scale.evaluate import evaluate_nelbo

REPO = Path(__file__).resolve().parent.parent
MC_NUM = 16

TASK_HEAD = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
"""
CHOICE_TASK = TASK_HEAD + """\
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
ROLLING_TASK = TASK_HEAD + """\
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
"""


def text_of_tokens(tokenizer, source: str, n: int) -> str:
    """The shortest prefix of ``source`` (whole characters, no surrounding whitespace) that the tokenizer encodes
    into exactly ``n`` tokens."""
    for end in range(1, len(source) + 1):
        text = source[:end].strip()
        if text == source[:end] and len(tokenizer.encode(text)) == n:
            return text
    raise AssertionError(f"no prefix of the source encodes into {n} tokens")


@pytest.fixture(scope="module")
def world(world, tmp_path_factory):
    """conftest's untrained exports of one tokenizer (Prime l = 2, AR, GenMD4), and local lm_eval tasks over JSONL
    files (this fixture extends conftest's ``world`` of the same name)."""
    with pytest.MonkeyPatch.context() as mp:
        for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(key, "1")
        import datasets

        for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # read once at import: set them where they are used
            if hasattr(datasets.config, key):
                mp.setattr(datasets.config, key, True)
        import prime_scale.harness  # noqa: F401  (registers the model)
        from prime_scale.export import from_pretrained

        tmp = tmp_path_factory.mktemp("harness")
        world = {**world, "tmp": tmp}
        tok = from_pretrained(str(world["prime"])).tokenizer
        prose = " ".join(py_docs("tutorial", 3)[2].read_text().split())
        # a document of exactly two 64-token blocks (scored as evaluate_nelbo scores blocks) and one of 2 blocks
        # + 10 tokens (its last window overlaps the second block)
        world["docs"] = [text_of_tokens(tok, prose, 128), text_of_tokens(tok, prose[2000:], 138)]
        world["choices"] = [{"context": "The list type is", "choices": ["a mutable sequence.", "an integer."],
                             "label": 0},
                            {"context": "Strings are", "choices": ["immutable", "mutable"], "label": 0}]
        tasks = tmp / "tasks"
        tasks.mkdir()
        for name, rows, template in (("ps_choice", world["choices"], CHOICE_TASK),
                                     ("ps_rolling", [{"text": d} for d in world["docs"]], ROLLING_TASK)):
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (tasks / f"{name}.yaml").write_text(template.format(name=name, data=tmp / f"{name}.jsonl",
                                                                cache=tmp / "hf_cache"))
        world["tasks"] = tasks
        yield world


def run_tasks(world, export: Path, **model_args):
    """lm_eval.simple_evaluate over the local tasks, the model given by name and model_args as on the CLI."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = ",".join(f"{k}={v}" for k, v in {"pretrained": export, "device": "cpu", **model_args}.items())
    results = lm_eval.simple_evaluate(model="prime_scale", model_args=args, tasks=["ps_choice", "ps_rolling"],
                                      task_manager=TaskManager(include_path=str(world["tasks"]), include_defaults=False),
                                      log_samples=True,
                                      bootstrap_iters=0)
    return results


def responses(results, task: str) -> list:
    """Per document (in order): the model's raw responses, one per request."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [s["resps"] for s in samples]


def direct_ar_loglikelihood(pretrained, head: list[int], tail: list[int]) -> tuple[float, bool]:
    """log p(tail | head) and the greedy check from the causal network's logits, written out here."""
    from prime_scale.autoregressive import shifted_inputs

    model, codec = pretrained.model, pretrained.model.codec
    tokens = torch.tensor([head + tail])
    with torch.no_grad():
        logits = model(shifted_inputs(tokens, codec), None, causal=True)[0].double()
    log_probs = torch.log_softmax(logits, -1)
    codes = codec.token_to_code(tokens[0])
    positions = range(len(head), len(head) + len(tail))
    ll = sum(log_probs[i, codes[i]].item() for i in positions)
    return ll, all(logits[i].argmax().item() == codes[i].item() for i in positions)


# ------------------------------------------------------------------------------------------------ windows


def test_rolling_windows():
    from prime_scale.harness import rolling_windows

    assert rolling_windows(128, 64) == [(0, 64, 0), (64, 128, 64)]  # evaluate_nelbo's disjoint blocks
    assert rolling_windows(138, 64) == [(0, 64, 0), (64, 128, 64), (74, 138, 128)]  # a full window for the tail
    assert rolling_windows(40, 64) == [(0, 40, 0)]
    assert rolling_windows(40, 64, first=30) == [(0, 40, 30)]  # a continuation after its context
    assert rolling_windows(100, 64, first=50) == [(36, 100, 50)]  # the context left-truncated to fit
    assert rolling_windows(140, 64, first=30) == [(0, 64, 30), (64, 128, 64), (76, 140, 128)]  # too long: chunks
    assert rolling_windows(5, 4, first=5) == []
    for n, first in ((137, 0), (200, 13), (64, 63)):  # every scored token exactly once, within one window
        windows = rolling_windows(n, 64, first)
        assert [t for _, end, s in windows for t in range(s, end)] == list(range(first, n))
        assert all(end - start <= 64 and start <= s < end for start, end, s in windows)
    with pytest.raises(ValueError):
        rolling_windows(10, 64, first=11)


# ------------------------------------------------------------------------------------------------ through lm_eval


@pytest.mark.slow
def test_prime_through_lm_eval_agrees_with_evaluate_nelbo(world):
    """The rolling -log p bound of a two-block document equals evaluate_nelbo's NELBO of the two blocks within
    Monte Carlo error, and every number lm_eval received is the model's seeded estimate (reproduced directly)."""
    from prime_scale.harness import PrimeScaleLM

    results = run_tasks(world, world["prime"], mc_num=MC_NUM, seed=3)
    lm = PrimeScaleLM(pretrained=str(world["prime"]), mc_num=MC_NUM, device="cpu", seed=3)
    assert lm.mc_num == MC_NUM and lm.tokenizer is not None

    rolled = responses(results, "ps_rolling")
    ids = [lm.tokenizer.encode(d) for d in world["docs"]]
    assert [len(i) for i in ids] == [128, 138]
    scores = [lm.score_tokens(i)[0] for i in ids]
    assert [r[0][0] for r in rolled] == pytest.approx([-s.nll for s in scores], rel=1e-9)  # deterministic
    assert [s.windows for s in scores] == [2, 3] and [s.tokens for s in scores] == [128, 138]

    # prime_scale's own evaluation of the same blocks: each block 64 times, one draw each, so evaluate_nelbo's
    # standard error over "sequences" is the Monte Carlo error of its mean
    cfg = lm.pretrained.config
    cfg = replace(cfg, eval=replace(cfg.eval, repeats=1, max_sequences=0, batch_size=64))
    reference, variance = 0.0, 0.0
    for block in torch.tensor(ids[0]).view(2, 64):
        r = evaluate_nelbo(lm.model, block.repeat(64, 1), cfg, seed=11)
        assert r.tokens == 64 * 64 and r.estimator == "count"
        reference += r.nelbo_per_token * 64
        variance += (r.stderr * 64) ** 2
    error = math.sqrt(variance + scores[0].stderr ** 2)
    assert 0 < error < 0.02 * reference  # the comparison below can tell a wrong number from noise
    assert abs(scores[0].nll - reference) < 4 * error, (scores[0].nll, reference, error)

    # multiple choice: each choice's log-likelihood is the conditional bound of its tokens after the context's
    for doc, resps in zip(world["choices"], responses(results, "ps_choice")):
        for choice, resp in zip(doc["choices"], resps):
            head, tail = lm._encode_pair(doc["context"], " " + choice)
            score, greedy = lm.score_tokens(head + tail, len(head), greedy=True)
            assert resp[0][0] == pytest.approx(-score.nll, rel=1e-9) and resp[0][1] == greedy
            assert score.tokens == len(tail) and score.draws == MC_NUM and math.isfinite(score.stderr)
    assert results["results"]["ps_rolling"]["word_perplexity,none"] > 1


@pytest.mark.slow
def test_ar_through_lm_eval_is_exact(world):
    """AR: every log-likelihood and greedy flag equals the one computed from the network's logits here, and the
    rolling value equals evaluate_nelbo's exact NLL of the blocks."""
    from prime_scale.export import from_pretrained
    from prime_scale.harness import PrimeScaleLM

    results = run_tasks(world, world["ar"], mc_num=7)  # mc_num means nothing for an exact NLL
    pretrained = from_pretrained(str(world["ar"]))
    lm = PrimeScaleLM(pretrained=str(world["ar"]), device="cpu")
    assert lm.mc_num == 1
    for doc, resps in zip(world["choices"], responses(results, "ps_choice")):
        for choice, resp in zip(doc["choices"], resps):
            head, tail = lm._encode_pair(doc["context"], " " + choice)
            ll, greedy = direct_ar_loglikelihood(pretrained, head, tail)
            assert resp[0][0] == pytest.approx(ll, abs=1e-4) and resp[0][1] == greedy

    blocks = torch.tensor(lm.tokenizer.encode(world["docs"][0])).view(2, 64)
    r = evaluate_nelbo(pretrained.model, blocks, pretrained.config)
    assert r.estimator == "exact"
    assert responses(results, "ps_rolling")[0][0][0] == pytest.approx(-r.nelbo_per_token * 128, rel=1e-5)
    # 138 tokens: two blocks, then the last 10 tokens given the 54 before them (a full window of 64)
    ids = lm.tokenizer.encode(world["docs"][1])
    windows = [([], ids[:64]), ([], ids[64:128]), (ids[74:128], ids[128:])]
    expected = sum(direct_ar_loglikelihood(pretrained, head, tail)[0] for head, tail in windows)
    assert responses(results, "ps_rolling")[1][0][0] == pytest.approx(expected, abs=1e-3)
    # is_greedy is true for the argmax continuation of a context, token by token
    from prime_scale.autoregressive import shifted_inputs

    head, tail = lm.tokenizer.encode("The list type is"), []
    for _ in range(3):
        with torch.no_grad():
            logits = pretrained.model(shifted_inputs(torch.tensor([head + tail + [0]]), lm.codec), None, causal=True)
        tail.append(int(lm.codec.decode(logits[0, -1].argmax().view(1, 1))[0]))
    draws, greedy = lm.score_window(head + tail, len(head), greedy=True)
    assert greedy and direct_ar_loglikelihood(pretrained, head, tail)[1]
    assert -draws[0] == pytest.approx(direct_ar_loglikelihood(pretrained, head, tail)[0], abs=1e-4)
    assert lm.score_window(head + tail[:2] + [(tail[2] + 1) % 512], len(head), greedy=True)[1] is False


@pytest.mark.slow
def test_cli_entry(world, tmp_path):
    """python -m prime_scale.harness is lm_eval's own command line with the model registered."""
    out = tmp_path / "out"
    env = {**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "prime_scale.harness", "--model", "prime_scale", "--model_args",
                           f"pretrained={world['ar']},device=cpu", "--tasks", "ps_rolling", "--include_path",
                           str(world["tasks"]), "--output_path", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ps_rolling" in proc.stdout and "word_perplexity" in proc.stdout
    report = json.loads(next(out.rglob("results_*.json")).read_text())
    expected = run_tasks(world, world["ar"])["results"]["ps_rolling"]["word_perplexity,none"]
    assert report["results"]["ps_rolling"]["word_perplexity,none"] == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------------ the model itself


@pytest.mark.parametrize("family", ["prime", "genmd4"])
def test_context_is_never_masked_and_mc_num_is_honoured(world, family):
    """Every network input of a conditional bound shows the context's clean digits; only continuation digits
    are masked; the draws are mc_num rows, in forward passes of at most batch_size."""
    from lm_eval.api.instance import Instance

    from prime_scale.harness import PrimeScaleLM

    lm = PrimeScaleLM(pretrained=str(world[family]), mc_num=7, batch_size=3, device="cpu")
    head, tail = lm._encode_pair("The list type is", " a mutable sequence of items")
    assert len(head) > 0 and len(tail) > 1
    inputs = []
    handle = lm.model.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    try:
        (ll, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, ("The list type is",
                                                                         " a mutable sequence of items"), 0)])
    finally:
        handle.remove()
    clean = lm.codec.encode(torch.tensor([head + tail]))
    draws, check = inputs[:-1], inputs[-1]  # the last pass is is_greedy's (every continuation digit masked)
    assert [len(x) for x in draws] == [3, 3, 1]
    masked = torch.cat(draws) == lm.codec.mask_id
    assert not masked[:, : len(head)].any()  # the context: never masked, always its clean digits
    assert (torch.cat(draws)[:, : len(head)] == clean[:, : len(head)]).all()
    if family == "prime":  # the count estimator masks k >= 1 digits (GenMD4's continuous draws may mask none)
        assert masked[:, len(head):].flatten(1).any(1).all()
    assert masked[:, len(head):].any()
    assert (check[0, len(head):] == lm.codec.mask_id).all() and (check[0, : len(head)] == clean[0, : len(head)]).all()
    score = lm.last_scores[0]
    assert (score.draws, score.tokens, score.windows) == (7, len(tail), 1)
    assert ll == -score.nll and ll < 0 and score.stderr > 0 and isinstance(greedy, bool)


def test_seeded_and_order_free(world):
    from lm_eval.api.instance import Instance

    from prime_scale.harness import PrimeScaleLM

    pairs = [("The list type is", " a mutable sequence"), ("", "Strings are immutable"), ("Tuples", " are")]
    requests = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    lm = PrimeScaleLM(pretrained=str(world["prime"]), mc_num=4, device="cpu", seed=5)
    first = lm.loglikelihood(requests)
    assert lm.loglikelihood(requests[::-1]) == first[::-1]  # each request's draws depend on it alone
    other = PrimeScaleLM(pretrained=str(world["prime"]), mc_num=4, device="cpu", seed=6).loglikelihood(requests)
    assert [a[0] for a in other] != [a[0] for a in first]
    assert lm.loglikelihood([Instance("loglikelihood", {}, ("Tuples", ""), 0)]) == [(0.0, True)]


def test_model_args_win_over_the_command_line(world):
    """lm_eval's CLI passes its --batch_size (default 1) to every model; batch_size in model_args wins."""
    from prime_scale.harness import PrimeScaleLM

    lm = PrimeScaleLM.create_from_arg_string(f"pretrained={world['prime']},batch_size=5,mc_num=3,device=cpu",
                                             {"batch_size": 1, "max_batch_size": None, "device": "cuda"})
    assert (lm.batch_size, lm.mc_num, lm.device.type) == (5, 3, "cpu")
    lm = PrimeScaleLM.create_from_arg_string(f"pretrained={world['prime']}", {"batch_size": 2, "device": "cpu"})
    assert (lm.batch_size, lm.mc_num) == (2, lm.pretrained.config.eval.repeats)


@pytest.mark.parametrize("family", ["prime", "ar"])
def test_generate_until_stops_at_until(world, family):
    from lm_eval.api.instance import Instance

    from prime_scale.harness import PrimeScaleLM

    lm = PrimeScaleLM(pretrained=str(world[family]), device="cpu", seed=2)
    context = "The list type is"
    ids = lm.generate_tokens(lm.tokenizer.encode(context), 24)
    assert 0 < len(ids) <= 24 and lm.tokenizer.eos_id not in ids
    assert len(lm.generate_tokens(lm.tokenizer.encode(context), 500)) <= 64 - 1  # bounded by seq_len
    request = lambda until: Instance("generate_until", {}, (context, {"until": until, "max_gen_toks": 24}), 0)  # noqa: E731
    full, = lm.generate_until([request([])])
    assert full == lm.tokenizer.decode(ids)
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full.find(full[i:i + 2]) == i)
    cut, = lm.generate_until([request([stop, "never appears in any sample \x00"])])
    assert cut == full[: full.find(stop)] and stop not in cut and len(cut) >= 3


def test_export_without_tokenizer_or_model_is_refused(world, tmp_path):
    from prime_scale.harness import PrimeScaleLM
    from prime_scale.text_metrics import EvalError

    bare = tmp_path / "bare"
    shutil.copytree(world["prime"], bare)
    (bare / "tokenizer.model").unlink()
    (bare / "dataset.json").unlink()
    with pytest.raises(EvalError, match="tokenizer"):
        PrimeScaleLM(pretrained=str(bare), device="cpu")
    with pytest.raises(EvalError, match="neither an export folder"):
        PrimeScaleLM(pretrained=str(tmp_path / "nothing"), device="cpu")
