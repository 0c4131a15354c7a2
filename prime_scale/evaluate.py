"""Validation NELBO per token (nats), its Monte Carlo standard error, perplexity = exp(NELBO per token), and
bits per dimension = NELBO per token / ln 2 (the image literature's unit: a token is one pixel channel)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from prime_scale.config import Config
from prime_scale.diffusion import nelbo
from prime_scale.schedules import make_schedule


@dataclass
class EvalResult:
    nelbo_per_token: float  # nats per token (never per sub-token)
    stderr: float  # Monte Carlo standard error of nelbo_per_token
    ppl: float  # exp(nelbo_per_token)
    bits_per_dim: float  # nelbo_per_token / ln 2: for images every token (a pixel channel) is one dimension
    sequences: int
    tokens: int
    estimator: str

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_nelbo(model, sequences: torch.Tensor, cfg: Config, seed: int = 0, rank: int = 0,
                   world_size: int = 1) -> EvalResult:
    """Average ``cfg.eval.repeats`` independent NELBO draws per sequence, then total nats / total tokens.

    ``model`` is the network or a DeepSpeed engine (called the same way). With several ranks each scores every
    world_size-th sequence and the sums are all-reduced; every rank runs the same number of forward passes (the
    short ones score a padding sequence with weight 0), which ZeRO-3's collective parameter gathering needs.
    The standard error treats sequences as the independent units (the per-sequence estimates include both the
    data's and the estimator's randomness)."""
    if cfg.eval.max_sequences:
        sequences = sequences[: cfg.eval.max_sequences]
    n = len(sequences)
    if n < 2:
        raise ValueError("need at least 2 validation sequences to estimate a standard error")
    device = next(model.parameters()).device
    schedule = make_schedule(cfg.diffusion)
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + rank)
    was_training = model.training
    model.eval()
    per_rank = -(-n // world_size)
    index = torch.arange(per_rank) * world_size + rank
    weight = (index < n).double()
    index = torch.where(index < n, index, torch.zeros_like(index))
    stats = torch.zeros(6, dtype=torch.float64)  # sums of x, t, x^2, x t, t^2 and the count of sequences
    codec = model.codec if hasattr(model, "codec") else model.module.codec
    for start in range(0, per_rank, cfg.eval.batch_size):
        rows = index[start : start + cfg.eval.batch_size]
        w = weight[start : start + cfg.eval.batch_size]
        batch = sequences[rows].to(device)
        draws = [
            nelbo(model, batch, codec, schedule, generator, estimator=cfg.diffusion.eval_estimator)
            for _ in range(cfg.eval.repeats)
        ]
        x = torch.stack([d.per_sequence for d in draws]).double().mean(0).cpu()
        t = draws[0].tokens.double().cpu()
        stats += torch.stack([(w * x).sum(), (w * t).sum(), (w * x * x).sum(), (w * x * t).sum(),
                              (w * t * t).sum(), w.sum()])
    model.train(was_training)
    if world_size > 1:
        stats = stats.to(device)
        dist.all_reduce(stats)
        stats = stats.cpu()
    sx, st, sxx, sxt, stt, count = stats.tolist()
    value = sx / st
    # ratio estimator's standard error (delta method): residual r = x - value * t has mean 0 by construction
    residual_ss = sxx - 2 * value * sxt + value * value * stt
    stderr = math.sqrt(max(residual_ss, 0.0) / (count - 1)) / math.sqrt(count) / (st / count)
    return EvalResult(value, stderr, math.exp(value), value / math.log(2), int(count), int(st),
                      cfg.diffusion.eval_estimator)
