"""Ancestral sampling over sub-tokens, with the network output reused while a sequence's input is unchanged.

From time t to s < t every masked sub-token is revealed independently with probability (m_t - m_s) / m_t.
For each position a token value x is drawn from the carry-over distribution p(x | y_t) (so it agrees with every
observed digit and is a valid code), and the digits that are revealed take x's digits. That is the exact reverse
transition of the factorised model. A time-independent denoiser's output depends only on y_t, so a sequence whose
digits did not change keeps its cached output: NFE (network evaluations per sequence) is then below the number of
steps whenever steps exceed the number of sub-tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from prime_scale.codec import SubtokenCodec
from prime_scale.diffusion import Denoiser, carry_over_log_probs
from prime_scale.schedules import Schedule


@dataclass
class SampleResult:
    tokens: torch.Tensor  # (B, N) token ids, every one < C
    nfe: float  # mean network evaluations per sequence
    calls: int  # batched denoiser calls
    steps: int


def draw_categorical(log_probs: torch.Tensor, generator: torch.Generator, float64: bool = True) -> torch.Tensor:
    """Inverse-CDF draw over the last dim. In float64 by default: float32 draws (Gumbel-max or CDF) truncate the
    tail of the distribution, which acts like a lower temperature (Zheng et al. 2024). Zero-probability entries
    are never returned: the first index whose CDF exceeds u cannot sit on a flat step of the CDF."""
    dtype = torch.float64 if float64 else torch.float32
    probs = torch.softmax(log_probs.to(dtype), dim=-1)
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device, dtype=dtype) * cdf[..., -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(cdf.shape[-1] - 1)


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    codec: SubtokenCodec,
    schedule: Schedule,
    num_samples: int,
    seq_len: int,
    steps: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    prompt: Optional[torch.Tensor] = None,
    float64: bool = True,
    time_conditioned: bool = False,
) -> SampleResult:
    """Draw ``num_samples`` sequences of ``seq_len`` tokens. ``prompt`` (P,) or (B, P) token ids stay fixed."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    B, N, l = num_samples, seq_len, codec.num_subtokens
    digits = torch.full((B, N, l), codec.mask_id, dtype=torch.long, device=device)
    if prompt is not None:
        prompt = prompt.to(device).expand(B, -1) if prompt.dim() == 1 else prompt.to(device)
        if prompt.shape[0] != B or prompt.shape[1] >= N:
            raise ValueError(f"prompt of shape {tuple(prompt.shape)} must be shorter than seq_len={N} and match {B} samples")
        digits[:, : prompt.shape[1]] = codec.encode(prompt)

    times = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    joint = None  # cached (B, N, b**l) log-probs
    stale = torch.ones(B, dtype=torch.bool, device=device)
    evaluations = torch.zeros(B, dtype=torch.long, device=device)
    calls = 0
    for i in range(steps):
        masked = digits == codec.mask_id
        if not bool(masked.any()):
            break
        m_t, m_s = schedule.mask_prob(times[i]), schedule.mask_prob(times[i + 1])
        if time_conditioned:
            stale[:] = True
        if bool(stale.any()):
            rows = stale.nonzero().squeeze(1)
            logits = denoiser(digits[rows], torch.full((len(rows),), float(m_t), device=device))
            fresh = carry_over_log_probs(logits, digits[rows], codec).reshape(len(rows), N, codec.num_codes)
            joint = fresh if joint is None else joint.index_copy(0, rows, fresh)
            evaluations[rows] += 1
            calls += 1
        x = draw_categorical(joint, generator, float64)  # (B, N) codes, consistent with observed digits
        reveal_prob = float((m_t - m_s) / m_t)
        reveal = masked & (torch.rand(masked.shape, generator=generator, device=device) < reveal_prob)
        digits = torch.where(reveal, codec.digit_table[x], digits)
        # re-evaluate a sequence only if it changed and still has something to reveal
        stale = reveal.flatten(1).any(dim=1) & (digits == codec.mask_id).flatten(1).any(dim=1)

    tokens = codec.decode(digits)
    if not bool(codec.is_valid(tokens).all()):  # cannot happen with carry-over; guard the invariant anyway
        raise RuntimeError("sampler produced an invalid code; the carry-over restriction is broken")
    return SampleResult(tokens=tokens, nfe=evaluations.double().mean().item(), calls=calls, steps=steps)
