"""The autoregressive baseline: the Prime transformer with causal attention and l = 1, trained on next-token
cross-entropy. Its NLL is exact (no bound): -log p(x) = sum_i -log p(x_i | x_<i).

Position i reads token i - 1 and predicts token i. Position 0 reads the MASK symbol (the codec's value C, which
the embedding table already has for l = 1) as a begin-of-sequence marker, so the first token is scored too and the
NLL covers all N tokens, exactly like the diffusion models' NELBO it is compared with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prime_scale.codec import SubtokenCodec
from prime_scale.diffusion import NelboEstimate
from prime_scale.sampler import SampleResult, draw_categorical


def shifted_inputs(tokens: torch.Tensor, codec: SubtokenCodec) -> torch.Tensor:
    """(B, N) tokens -> (B, N, 1) network inputs: [BOS, x_0, ..., x_{N-2}] with BOS = the MASK symbol."""
    if codec.num_subtokens != 1:
        raise ValueError(f"the AR model reads whole tokens (l = 1), this codec has l = {codec.num_subtokens}")
    digits = codec.encode(tokens)
    bos = torch.full_like(digits[:, :1], codec.mask_id)
    return torch.cat([bos, digits[:, :-1]], dim=1)


def autoregressive_nll(model, tokens: torch.Tensor, codec: SubtokenCodec,
                       token_mask: torch.Tensor | None = None) -> NelboEstimate:
    """Exact -log p of each sequence (B, N) under the causal model, summed over its real tokens (padding, which
    only ever follows the real tokens, is neither scored nor seen by them)."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (batch, seq_len), got shape {tuple(tokens.shape)}")
    if tokens.shape[1] < 1:
        raise ValueError("sequences must hold at least one token")
    logits = model(shifted_inputs(tokens, codec), None, causal=True)
    ce = F.cross_entropy(logits.float().transpose(1, 2), codec.token_to_code(tokens), reduction="none")  # (B, N)
    valid = torch.ones_like(tokens, dtype=torch.bool) if token_mask is None else token_mask.bool()
    if token_mask is not None and bool((valid.sum(1) == 0).any()):  # no sync without padding
        raise ValueError("a sequence has no real tokens to score (empty or fully padded)")
    return NelboEstimate(per_sequence=torch.where(valid, ce, torch.zeros_like(ce)).sum(1), tokens=valid.sum(1))


@torch.no_grad()
def autoregressive_sample(model, codec: SubtokenCodec, num_samples: int, seq_len: int, generator: torch.Generator,
                          device: torch.device | str = "cpu", prompt: torch.Tensor | None = None,
                          float64: bool = True, temperature: float = 1.0, top_p: float = 1.0) -> SampleResult:
    """Left-to-right ancestral sampling, one network call per generated token (no KV cache: the models this
    baseline is compared with at demo scale are small, and the call count is the NFE either way). Every step
    generates the next token, so no step is idle (``SampleResult.idle_steps`` is 0 for every sequence)."""
    tokens = torch.zeros(num_samples, seq_len, dtype=torch.long, device=device)
    start = 0
    if prompt is not None:
        prompt = prompt.to(device).expand(num_samples, -1) if prompt.dim() == 1 else prompt.to(device)
        if prompt.shape[0] != num_samples or prompt.shape[1] >= seq_len:
            raise ValueError(f"prompt of shape {tuple(prompt.shape)} must be shorter than seq_len={seq_len} and "
                             f"match {num_samples} samples")
        start = prompt.shape[1]
        tokens[:, :start] = prompt
    for i in range(start, seq_len):
        logits = model(shifted_inputs(tokens[:, : i + 1], codec), None, causal=True)[:, i]
        code = draw_categorical(torch.log_softmax(logits.double(), -1), generator, float64, temperature, top_p)
        tokens[:, i] = codec.decode(code.unsqueeze(-1))
    steps = seq_len - start
    return SampleResult(tokens=tokens, nfe=float(steps), calls=steps, steps=steps,
                        idle_steps=torch.zeros(num_samples, dtype=torch.long, device=device))
