"""Sub-token codec: a token value x in {0..C-1} written as l base-b digits (most significant first).

With b = ceil(C ** (1/l)) there are b**l >= C codes; codes >= C name no token and are *invalid*: the model
must give them probability zero. l = 1 is the identity (b = C). The sub-token value ``b`` is the MASK symbol.
"""

from __future__ import annotations

import torch
from torch import nn

from prime_scale.config import resolve_base


class SubtokenCodec(nn.Module):
    """Table-based, vectorised token <-> digits conversion. A module so its tables follow ``.to(device)``."""

    def __init__(self, vocab_size: int, num_subtokens: int, base: int = 0):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size (C) must be >= 2, got {vocab_size}")
        if num_subtokens < 1:
            raise ValueError(f"num_subtokens (l) must be >= 1, got {num_subtokens}")
        self.vocab_size = vocab_size
        self.num_subtokens = num_subtokens
        self.base = resolve_base(vocab_size, num_subtokens, base)
        self.num_codes = self.base**num_subtokens
        self.mask_id = self.base
        powers = self.base ** torch.arange(num_subtokens - 1, -1, -1, dtype=torch.long)
        codes = torch.arange(self.num_codes, dtype=torch.long)
        # digit_table[code, j]: digit j of every code, valid or not (the carry-over needs the invalid ones too).
        self.register_buffer("powers", powers, persistent=False)
        self.register_buffer("digit_table", (codes[:, None] // powers) % self.base, persistent=False)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(...,) token ids -> (..., l) digits."""
        if tokens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]")
        return self.digit_table[tokens.long()]

    def decode(self, digits: torch.Tensor) -> torch.Tensor:
        """(..., l) digits (no MASK) -> (...,) codes. Codes >= C are invalid: check with ``is_valid``."""
        if digits.shape[-1] != self.num_subtokens:
            raise ValueError(f"expected {self.num_subtokens} digits in the last dim, got shape {tuple(digits.shape)}")
        if digits.numel() and (int(digits.min()) < 0 or int(digits.max()) >= self.base):
            raise ValueError(f"digits must lie in [0, {self.base}) (MASK={self.mask_id} cannot be decoded)")
        return (digits.long() * self.powers).sum(-1)

    def is_valid(self, codes: torch.Tensor) -> torch.Tensor:
        return codes < self.vocab_size

    def extra_repr(self) -> str:
        return f"C={self.vocab_size}, l={self.num_subtokens}, b={self.base}, codes={self.num_codes}"
