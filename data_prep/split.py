"""Train/validation split by content: a salted 64-bit BLAKE2b hash of each example, compared with a threshold.

The split then depends on nothing but the example itself (not on file order, units or workers), and duplicates
always land in the same split. A fraction f gives the threshold f * 2**64; an exact count k takes the k-th
smallest hash of the whole input (one extra pass over it).
"""

from __future__ import annotations

import hashlib
import heapq
from typing import Iterable


def content_hash(data: bytes, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, salt=seed.to_bytes(8, "little")).digest(), "little")


def fraction_threshold(fraction: float) -> int:
    """Examples whose hash is below this go to validation: a fraction ``fraction`` of them in expectation."""
    return int(fraction * 2**64)


def count_threshold(hashes: Iterable[int], count: int) -> int:
    """The threshold that sends exactly the ``count`` smallest hashes to validation (more only if duplicates tie
    with the last one; all if there are fewer than ``count``)."""
    smallest = heapq.nsmallest(count, hashes)
    return smallest[-1] + 1 if smallest else 0
