"""The Prime transformer: sub-token embedding -> bidirectional DiT-style blocks -> logits over C token values.

Input: noisy digits (B, N, l), each in {0..b-1, MASK=b}, and optionally the masking rate (B,) for adaLN time
conditioning. Output: logits (B, N, C). A position holds ``model.tokens_per_position`` consecutive tokens (P = 1
for text; for images e.g. the 3 channels of a pixel), so the transformer runs over N / P positions. The
carry-over (what those logits are allowed to say) lives in ``prime_scale.diffusion`` (the sampler's joint and the
loss's digit cross-entropies) because the loss and the sampler both need it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from prime_scale.codec import SubtokenCodec
from prime_scale.config import Config, ModelConfig
from prime_scale.schedules import GenMD4Schedule


def rotary_cos_sin(seq_len: int, head_dim: int, base: float, device, dtype=torch.float32):
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # (N, hd/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, N, hd); rotates consecutive halves (GPT-NeoX layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class SubtokenEmbedding(nn.Module):
    """Embeds each of the l digits with a table of its own (digit j's value means something different for each
    j) and merges them into one vector per position: a sum, optionally refined by a residual MLP. A position may
    hold P tokens (pixel-channels of a patch); each of the P x l digits of a position has its own table."""

    def __init__(self, num_subtokens: int, base: int, d_model: int, merge: str, tokens_per_position: int = 1):
        super().__init__()
        self.vocab_per_digit = base + 1  # b values + MASK
        self.tokens_per_position = tokens_per_position
        slots = tokens_per_position * num_subtokens
        self.table = nn.Embedding(slots * self.vocab_per_digit, d_model)
        offsets = torch.arange(slots, dtype=torch.long).view(tokens_per_position, num_subtokens)
        self.register_buffer("offsets", offsets * self.vocab_per_digit, persistent=False)
        self.merge_mlp = None
        if merge == "mlp":
            self.merge_mlp = nn.Sequential(
                nn.LayerNorm(d_model), nn.Linear(d_model, 4 * d_model), nn.GELU(approximate="tanh"),
                nn.Linear(4 * d_model, d_model),
            )

    def forward(self, digits: torch.Tensor) -> torch.Tensor:
        """(B, N, l) digits of N tokens -> (B, N / P, d), one vector per position."""
        B, N, l = digits.shape
        grouped = digits.view(B, N // self.tokens_per_position, self.tokens_per_position, l)
        x = self.table(grouped + self.offsets).sum(dim=(-3, -2))
        if self.merge_mlp is not None:
            x = x + self.merge_mlp(x)
        return x


class TimeEmbedding(nn.Module):
    """Sinusoidal features of the masking rate m in [0, 1] -> MLP (DiT's timestep embedder)."""

    def __init__(self, d_model: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, mask_rate: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=mask_rate.device) / half)
        args = 1000.0 * mask_rate.float()[:, None] * freqs[None]
        # the features are computed in float32 (1000 * m needs it), then meet the MLP in its own dtype (bf16
        # under DeepSpeed's bf16 mode, which casts the weights and never autocasts)
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, attn_mask: Optional[torch.Tensor], causal: bool):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal
        )
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, hidden, bias=False)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block; with time conditioning the norms are adaLN-Zero modulated (DiT)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        affine = not cfg.time_conditioning
        self.norm1 = nn.LayerNorm(cfg.d_model, elementwise_affine=affine)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model, elementwise_affine=affine)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.ada = nn.Linear(cfg.d_model, 6 * cfg.d_model) if cfg.time_conditioning else None

    def forward(self, x, cond, cos, sin, attn_mask, causal: bool = False):
        if self.ada is None:
            x = x + self.drop(self.attn(self.norm1(x), cos, sin, attn_mask, causal))
            return x + self.drop(self.mlp(self.norm2(x)))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(cond)).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.drop(self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin, attn_mask, causal))
        return x + gate2[:, None] * self.drop(self.mlp(modulate(self.norm2(x), shift2, scale2)))


class PrimeTransformer(nn.Module):
    """The denoiser (model.objective=diffusion) or, with ``causal=True`` in forward, the AR baseline: the same
    network either way. ``shuffle_seed`` turns on index shuffling in the codec; ``schedule_power`` adds GenMD4's
    learned per-value exponents as ``self.schedule`` (initialised to that power)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, num_subtokens: int = 1, base: int = 0,
                 shuffle_seed: Optional[int] = None, schedule_power: Optional[float] = None):
        super().__init__()
        self.cfg = cfg
        self.codec = SubtokenCodec(vocab_size, num_subtokens, base, shuffle_seed)
        self.head_dim = cfg.d_model // cfg.n_head
        self.tokens_per_position = cfg.tokens_per_position
        self.embed = SubtokenEmbedding(num_subtokens, self.codec.base, cfg.d_model, cfg.merge, cfg.tokens_per_position)
        self.time_embed = TimeEmbedding(cfg.d_model) if cfg.time_conditioning else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_out = nn.LayerNorm(cfg.d_model, elementwise_affine=not cfg.time_conditioning)
        self.ada_out = nn.Linear(cfg.d_model, 2 * cfg.d_model) if cfg.time_conditioning else None
        self.head = nn.Linear(cfg.d_model, cfg.tokens_per_position * vocab_size, bias=False)  # C logits per token
        # recompute each block's activations in the backward pass (memory for compute); the engine turns it on
        self.activation_checkpointing = False
        self._init_weights()
        # after _init_weights, which would overwrite the (l, b) exponents as if they were a weight matrix
        self.schedule = GenMD4Schedule(num_subtokens, self.codec.base, schedule_power) if schedule_power else None

    @classmethod
    def from_config(cls, cfg: Config) -> "PrimeTransformer":
        learned = cfg.diffusion.schedule == "genmd4" and cfg.model.objective == "diffusion"
        return cls(cfg.model, cfg.data.vocab_size, cfg.prime.num_subtokens, cfg.prime.base,
                   shuffle_seed=cfg.prime.shuffle_seed if cfg.prime.shuffle_tokens else None,
                   schedule_power=cfg.diffusion.schedule_power if learned else None)

    def _init_weights(self):
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            std = 0.02
            if name.endswith("proj.weight"):  # residual branches: GPT-2's 1/sqrt(2 * depth) scaling
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
            nn.init.normal_(p, mean=0.0, std=std)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            if block.ada is not None:
                nn.init.zeros_(block.ada.weight)
                nn.init.zeros_(block.ada.bias)
        if self.ada_out is not None:
            nn.init.zeros_(self.ada_out.weight)
            nn.init.zeros_(self.ada_out.bias)

    def num_params(self, include_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if include_embedding else n - self.embed.table.weight.numel()

    def forward(
        self,
        noisy_digits: torch.Tensor,
        mask_rate: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """noisy_digits (B, N, l) of N tokens -> logits (B, N, C). The transformer runs over N / P positions
        (P = model.tokens_per_position); ``attn_mask`` is an SDPA mask over positions, e.g. (B, 1, 1, N / P)."""
        B, N, l = noisy_digits.shape
        if l != self.codec.num_subtokens:
            raise ValueError(f"model expects {self.codec.num_subtokens} sub-tokens per token, got {l}")
        P = self.tokens_per_position
        if N % P:
            raise ValueError(f"{N} tokens do not fill positions of model.tokens_per_position={P} tokens")
        x = self.embed(noisy_digits)
        cond = None
        if self.time_embed is not None:
            if mask_rate is None:
                raise ValueError("this model is time-conditioned: pass the masking rate")
            cond = self.time_embed(mask_rate)
        cos, sin = rotary_cos_sin(N // P, self.head_dim, self.cfg.rope_base, x.device)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cond, cos, sin, attn_mask, causal, use_reentrant=False)
            else:
                x = block(x, cond, cos, sin, attn_mask, causal)
        x = self.norm_out(x)
        if self.ada_out is not None:
            shift, scale = self.ada_out(F.silu(cond)).chunk(2, dim=-1)
            x = modulate(x, shift, scale)
        return self.head(x).view(B, N, self.codec.vocab_size)
