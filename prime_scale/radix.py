"""How many base-b digits write C token values: the arithmetic behind the sub-token codec (prime_scale.codec) and
the config rules' check of ``prime.base``. Integers only, and no torch: reading a config imports this."""

from __future__ import annotations

import math

from prime_scale.config_schema import ConfigError


def power_reaches(b: int, l: int, c: int) -> bool:
    """b ** l >= c, stopping early so a huge l never builds a huge integer."""
    acc = 1
    for _ in range(l):
        acc *= b
        if acc >= c:
            return True
    return acc >= c


def resolve_base(vocab_size: int, num_subtokens: int, base: int = 0) -> int:
    """Sub-token base b: `base` if given (checked), else the smallest b >= 2 with b ** l >= C."""
    c, l = vocab_size, num_subtokens
    if c < 2:
        raise ConfigError(f"data.vocab_size must be at least 2, got {c}")
    if l < 1:
        raise ConfigError(f"prime.num_subtokens must be at least 1, got {l}")
    if base != 0:
        if base < 2:
            raise ConfigError(f"prime.base must be at least 2 (or 0 to pick the smallest), got {base}")
        if not power_reaches(base, l, c):
            raise ConfigError(
                f"prime.base {base} with num_subtokens {l} covers only {base ** l} values, "
                f"fewer than vocab_size {c}; use base >= {resolve_base(c, l)} or base=0"
            )
        return base
    # The float root is only a starting guess (1000 ** (1/3) == 9.999999999999998); integers decide.
    b = max(2, round(math.exp(math.log(c) / l)))
    while b > 2 and power_reaches(b - 1, l, c):
        b -= 1
    while not power_reaches(b, l, c):
        b += 1
    return b
