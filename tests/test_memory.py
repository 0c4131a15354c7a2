"""The memory model (prime_scale/memory.py) against the code it models: parameter counts, the tensors autograd
saves, ZeRO's arithmetic, the batch rules; and the loss head's measured peak on CPU."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from prime_scale import memory
from prime_scale.config import ConfigError, load_config
from prime_scale.model import PrimeTransformer

SMALL = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "data.seq_len=32", "data.vocab_size=100",
         "prime.num_subtokens=2"]
VARIANTS = [[], ["model.time_conditioning=true"], ["model.merge=mlp"], ["model.tokens_per_position=2"],
            ["model.mlp_ratio=2.5", "prime.num_subtokens=3"]]


@pytest.mark.parametrize("overrides", [
    ["config=tiny"], ["config=demo"], ["config=owt_small"], ["config=owt_large"], ["config=cifar10"],
    ["config=text_ar"], ["config=text_genmd4"], ["config=tiny", "model.time_conditioning=true", "model.merge=mlp"],
    ["config=tiny", "prime.num_subtokens=3", "prime.shuffle_tokens=true", "model.mlp_ratio=3.0"],
])
def test_parameter_count_is_the_models(overrides):
    cfg = load_config(overrides)
    with torch.device("meta"):  # owt_large's billion weights are counted, never allocated
        model = PrimeTransformer.from_config(cfg)
    assert memory.parameter_count(cfg) == model.num_params()


def saved_bytes(cfg, batch: int, dtype: torch.dtype, checkpointing: bool) -> int:
    """What autograd saves in a training forward, tensor by tensor (each storage once, parameters excluded)."""
    torch.manual_seed(0)
    model = PrimeTransformer.from_config(cfg).to(dtype)
    model.activation_checkpointing = checkpointing
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    digits = torch.randint(0, model.codec.base, (batch, cfg.data.seq_len, cfg.prime.num_subtokens))
    rate = torch.rand(batch).to(dtype) if cfg.model.time_conditioning else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(digits, rate)
    return sum(seen.values())


@pytest.mark.parametrize("extra", VARIANTS)
def test_activation_bytes_are_what_autograd_saves(extra):
    cfg = load_config(SMALL + extra)
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        for checkpointing in (False, True):
            assert memory.activation_bytes(cfg, 3, name, checkpointing, "cpu") == \
                saved_bytes(cfg, 3, dtype, checkpointing), (extra, name, checkpointing)


def test_zero_stages_shard_optimizer_then_gradients_then_parameters():
    """Exact bytes for a model of psi parameters on 8 GPUs: AdamW's fp32 moments (8 psi) and, with bf16 or any
    ZeRO stage, fp32 master weights (4 psi), over 8 from ZeRO-1 on (ZeRO-0's bf16 wrapper, FP16_UnfusedOptimizer,
    keeps them whole and makes an fp32 copy of every gradient in the step); gradients over 8 from ZeRO-2 (ZeRO-1
    keeps the full .grad until its reduction); parameters over 8 at ZeRO-3."""
    cfg = load_config(["config=owt_small"])
    psi = memory.parameter_count(cfg)
    state = {z: memory.engine_state(cfg, 8, z, 2, "cuda", accumulation=1) for z in (0, 1, 2, 3)}  # bf16
    params = {z: s[0] for z, s in state.items()}
    optimizer = {z: s[1] for z, s in state.items()}
    start = {z: s[2] for z, s in state.items()}
    end = {z: s[3] for z, s in state.items()}
    assert params[0] == params[1] == params[2] == 2 * psi and params[3] == 2 * psi // 8
    assert optimizer[0] == 12 * psi and end[0]["gradients"] == 2 * psi + 4 * psi
    assert start[0]["gradients"] == 0  # nothing to accumulate into at accumulation 1
    for z in (1, 2, 3):
        assert optimizer[z] == 4 * psi // 8 + 8 * psi // 8
    assert end[1]["gradients"] == 2 * psi + 2 * psi // 8 + 4 * psi // 8
    assert end[2]["gradients"] == end[3]["gradients"] == 2 * psi // 8 + 4 * psi // 8
    bucket = memory.BUCKET_ELEMENTS * 2  # a GPU allocates the whole bucket at the start of the backward
    assert start[1]["engine"] == start[2]["engine"] == end[1]["engine"] == end[2]["engine"] == bucket
    assert "engine" not in end[0]
    assert end[3]["engine"] == bucket + 2 * memory.PREFETCH_ELEMENTS * 2
    # a CPU touches at most psi of the bucket, and gloo's reduction copies it (1.5x at its peak)
    cpu_bucket = min(psi, memory.BUCKET_ELEMENTS) * 2
    assert memory.engine_state(cfg, 8, 2, 2, "cpu", 1)[3]["engine"] == cpu_bucket + cpu_bucket * 3 // 2
    assert memory.engine_state(cfg, 8, 2, 2, "cpu", 4)[2]["gradients"] == 2 * psi // 8  # accumulated partition
    fp32 = memory.engine_state(cfg, 1, 0, 4, "cuda", 1)
    assert (fp32[0], fp32[1], fp32[3]["gradients"]) == (4 * psi, 8 * psi, 4 * psi)
    # the estimate is the larger moment; the activations and the head do not depend on the stage or world size
    est = {z: memory.estimate(cfg, 8, 4, "cuda", z) for z in (0, 1, 2, 3)}
    assert len({(e.activations, e.logits, e.head) for e in est.values() if e.activations}) == 1
    assert memory.estimate(cfg, 64, 4, "cuda", 2).activations == est[2].activations


def test_largest_micro_batch_fits_and_grows_with_the_budget():
    cfg = load_config(["config=owt_small"])
    batches = []
    for gb in (20, 40, 80, 141):
        budget = gb * memory.GB
        b = memory.largest_micro_batch(cfg, 8, budget, "cuda", 2)
        assert memory.estimate(cfg, 8, b, "cuda", 2).total <= budget * (1 - memory.HEADROOM)
        assert memory.estimate(cfg, 8, b + 1, "cuda", 2).total > budget * (1 - memory.HEADROOM)
        batches.append(b)
    assert batches == sorted(batches) and batches[0] >= 1 and batches[-1] > batches[0]
    assert memory.largest_micro_batch(cfg, 8, 1 * memory.GB, "cuda", 2) == 0  # not even one sequence
    # activation checkpointing and ZeRO-3 on more GPUs only ever make room
    assert memory.largest_micro_batch(cfg, 8, 80 * memory.GB, "cuda", 2, activation_checkpointing=True) > batches[2]


@pytest.mark.parametrize("rule,estimator", [(memory.eval_batch_size, memory.estimate_eval),
                                            (memory.sample_batch_size, memory.estimate_sample)])
def test_batch_from_the_budget_fits_and_is_monotone(rule, estimator):
    cfg = load_config(["config=owt_small", "eval.batch_size=0"])
    need = lambda b: (lambda e: e.total - e.parameters - e.runtime)(estimator(cfg, b, "cuda"))  # noqa: E731
    previous = 0
    for mb in (4096, 8192, 16384, 65536):
        b = rule(cfg, "cuda", budget_mb=mb)
        assert need(b) <= mb * memory.MB * (1 - memory.HEADROOM) < need(b + 1)
        assert b >= previous
        previous = b
    assert rule(replace(cfg, eval=replace(cfg.eval, memory_mb=8192.0)), "cuda") == rule(cfg, "cuda", budget_mb=8192)
    assert rule(replace(cfg, eval=replace(cfg.eval, batch_size=7)), "cuda") == 7  # a set batch size wins
    with pytest.raises(ValueError, match=r"eval.memory_mb=10 MB does not hold one .*\(it needs \d+ MB on cuda, 10% headroom"):
        rule(cfg, "cuda", budget_mb=10)


def test_loss_chunk_and_eval_memory_are_validated():
    assert load_config(["config=tiny", "eval.batch_size=0"]).eval.batch_size == 0
    for override, message in (("engine.loss_chunk_mb=0", "engine.loss_chunk_mb must be positive"),
                              ("eval.memory_mb=-1", "eval.memory_mb must be positive"),
                              ("eval.batch_size=-2", "eval.batch_size must be non-negative")):
        with pytest.raises(ConfigError, match=message):
            load_config(["config=tiny", override])


def _vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(key)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_loss_head_peak_is_the_gradient_and_one_chunk():
    """Forward + backward of the head at C = 50,257 on 512 rows: beyond the float32 logits (the input) the peak is
    their gradient and one row chunk, far from the three full-size buffers of F.cross_entropy; the model's count
    of the same (gradient + chunk) bounds it. (A resident-size peak can only under-count reused heap pages.)"""
    from prime_scale.codec import SubtokenCodec
    from prime_scale.diffusion import subtoken_cross_entropy

    g = torch.Generator().manual_seed(0)
    rows, C = 512, 50257
    cfg = load_config(["config=owt_small", f"data.seq_len={rows}", "train.dtype=float32"])
    for l in (2, 4):
        codec = SubtokenCodec(C, l)
        logits = torch.randn(rows, C, generator=g).requires_grad_()
        clean = codec.encode(torch.randint(0, C, (rows,), generator=g))
        noisy = torch.where(torch.rand(clean.shape, generator=g) < 0.5, codec.mask_id, clean)
        Path("/proc/self/clear_refs").write_text("5")
        base = _vm("VmRSS")
        (grad,) = torch.autograd.grad(subtoken_cross_entropy(logits, noisy, clean, codec).sum(), logits)
        peak = _vm("VmHWM") - base
        logits_and_grad, head = memory.loss_head_bytes(replace(cfg, prime=replace(cfg.prime, num_subtokens=l)), 1,
                                                       "cpu", training=True)
        predicted = logits_and_grad - rows * C * 4 + head  # the logits are the input, already counted
        assert grad.shape == logits.shape and peak <= 1.15 * predicted, (l, peak, predicted)
        # the gradient (the padded (rows, b**l) buffer: 1.007x the logits at l = 2) and at most one 64 MB chunk
        # (0.65x here), where F.cross_entropy(logits.float()) keeps three full-size buffers
        assert peak <= 2.0 * logits.numel() * 4, (l, peak)
        del logits, grad
