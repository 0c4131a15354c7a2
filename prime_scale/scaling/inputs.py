"""The input checks every fit shares: ``ScalingError``, the one exception bad input raises, and the checks that turn
columns into positive float64 arrays of one length."""

from __future__ import annotations

import numpy as np


class ScalingError(ValueError):
    """Input that cannot be fitted as asked: a missing column, too few points, non-positive or non-finite values."""


def positive(name: str, values) -> np.ndarray:
    """``values`` as a float64 1-d array; every entry must be finite and > 0."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ScalingError(f"{name} must be finite and > 0: {int(bad.sum())} of {arr.size} values are not "
                           f"(first at position {i}: {arr[i]!r}); remove failed or diverged runs first")
    return arr


def same_length(**arrays: np.ndarray) -> int:
    """The arrays' common length; named in the error when they differ."""
    lengths = {k: v.size for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ScalingError(f"inputs differ in length: {lengths}")
    return next(iter(lengths.values()))

