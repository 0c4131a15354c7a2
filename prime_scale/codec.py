"""Sub-token codec: a token value x in {0..C-1} written as l base-b digits (most significant first).

With b = ceil(C ** (1/l)) there are b**l >= C codes; codes >= C name no token and are *invalid*: the model
must give them probability zero. l = 1 is the identity (b = C). The sub-token value ``b`` is the MASK symbol.

Index shuffling (prime.shuffle_tokens): token x is first renamed to code perm[x] by a fixed seeded permutation,
so that tokens sharing a leading digit are not merely neighbours in the tokenizer's id order. The model's C
logits are over *codes*; ``decode`` maps codes back to token ids with the inverse permutation. The permutation is
a persistent buffer (``codec.permutation``): it travels in every checkpoint and export with the weights it was
trained with, so decoding stays exact even if the generator behind the seed changed.

``prime_scale.radix.resolve_base`` picks b with integer arithmetic; the config rules check ``prime.base`` with it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from prime_scale.radix import resolve_base


class SubtokenCodec(nn.Module):
    """Table-based, vectorised token <-> digits conversion. A module so its tables follow ``.to(device)``."""

    def __init__(self, vocab_size: int, num_subtokens: int, base: int = 0, shuffle_seed: int | None = None):
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
        self.register_buffer("permutation", None)  # None: not shuffled, and nothing in the state_dict
        if shuffle_seed is not None:
            perm = torch.from_numpy(np.random.default_rng(shuffle_seed).permutation(vocab_size).astype(np.int64))
            self.register_buffer("permutation", perm)
            self.register_buffer("inverse_permutation", torch.argsort(perm), persistent=False)
            self._register_load_state_dict_pre_hook(self._load_permutation)

    def _load_permutation(self, state_dict, prefix, *args) -> None:
        # the loaded permutation is authoritative; its inverse is derived, never stored
        perm = state_dict.get(prefix + "permutation")
        if perm is not None:
            self.inverse_permutation = torch.argsort(perm.to(self.permutation.device))

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Raise unless ``tokens`` is an integer tensor of ids in [0, C)."""
        if tokens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]")

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(...,) token ids -> (..., l) digits. The id range is checked on CPU tensors only: on an accelerator the
        check would make the host wait for the device at every call (the training loop checks its batches on the
        host before copying them)."""
        if tokens.device.type == "cpu":
            self.check_tokens(tokens)
        elif tokens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
        codes = tokens.long() if self.permutation is None else self.permutation[tokens.long()]
        return self.digit_table[codes]

    def decode(self, digits: torch.Tensor) -> torch.Tensor:
        """(..., l) digits (no MASK) -> (...,) token ids. Codes >= C name no token and are returned as they are
        (>= C): check with ``is_valid``."""
        if digits.shape[-1] != self.num_subtokens:
            raise ValueError(f"expected {self.num_subtokens} digits in the last dim, got shape {tuple(digits.shape)}")
        if digits.numel() and (int(digits.min()) < 0 or int(digits.max()) >= self.base):
            raise ValueError(f"digits must lie in [0, {self.base}) (MASK={self.mask_id} cannot be decoded)")
        codes = (digits.long() * self.powers).sum(-1)
        if self.permutation is None:
            return codes
        valid = codes < self.vocab_size
        return torch.where(valid, self.inverse_permutation[codes.clamp_max(self.vocab_size - 1)], codes)

    def token_to_code(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> the codes the model's logits are indexed by (the identity without shuffling)."""
        return tokens.long() if self.permutation is None else self.permutation[tokens.long()]

    def is_valid(self, codes: torch.Tensor) -> torch.Tensor:
        return codes < self.vocab_size

    def extra_repr(self) -> str:
        shuffled = ", shuffled" if self.permutation is not None else ""
        return f"C={self.vocab_size}, l={self.num_subtokens}, b={self.base}, codes={self.num_codes}{shuffled}"
