"""Validation NELBO per token (nats), its Monte Carlo standard error, and perplexity = exp(NELBO per token)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from prime_scale.config import Config
from prime_scale.diffusion import nelbo
from prime_scale.model import PrimeTransformer
from prime_scale.schedules import make_schedule


@dataclass
class EvalResult:
    nelbo_per_token: float  # nats per token (never per sub-token)
    stderr: float  # Monte Carlo standard error of nelbo_per_token
    ppl: float  # exp(nelbo_per_token)
    sequences: int
    tokens: int
    estimator: str

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_nelbo(model: PrimeTransformer, sequences: torch.Tensor, cfg: Config, seed: int = 0) -> EvalResult:
    """Average ``cfg.eval.repeats`` independent NELBO draws per sequence, then total nats / total tokens.

    The standard error treats sequences as the independent units (the per-sequence estimates include both
    the data's and the estimator's randomness)."""
    if cfg.eval.max_sequences:
        sequences = sequences[: cfg.eval.max_sequences]
    if len(sequences) < 2:
        raise ValueError("need at least 2 validation sequences to estimate a standard error")
    device = next(model.parameters()).device
    schedule = make_schedule(cfg.diffusion)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    per_seq, tokens = [], []
    for start in range(0, len(sequences), cfg.eval.batch_size):
        batch = sequences[start : start + cfg.eval.batch_size].to(device)
        draws = [
            nelbo(model, batch, model.codec, schedule, generator, estimator=cfg.diffusion.eval_estimator)
            for _ in range(cfg.eval.repeats)
        ]
        per_seq.append(torch.stack([d.per_sequence for d in draws]).double().mean(0).cpu())
        tokens.append(draws[0].tokens.cpu())
    model.train(was_training)
    per_seq_t, tokens_t = torch.cat(per_seq), torch.cat(tokens).double()
    value = (per_seq_t.sum() / tokens_t.sum()).item()
    # ratio estimator's standard error (delta method); reduces to std/sqrt(n)/N for equal lengths
    residual = per_seq_t - value * tokens_t
    stderr = (residual.std() / math.sqrt(len(residual)) / tokens_t.mean()).item()
    return EvalResult(value, stderr, math.exp(value), len(per_seq_t), int(tokens_t.sum()), cfg.diffusion.eval_estimator)
