"""How tokenized documents become fixed-length blocks; data prep and zero-shot evaluation both pack through here.

Both trainable packings start from the EOS stream: every document's tokens followed by EOS, the documents joined.

* ``concat``: the stream is cut into blocks of ``seq_len`` tokens.
* ``wrap`` (MDLM, MDM-Prime on OpenWebText): the stream is cut into pieces of ``seq_len - 2`` tokens, each stored
  as ``[BOS] piece [EOS]``. With GPT-2's tokenizer BOS and EOS are the same token (``<|endoftext|>``).

In both, the stream's last partial block (``remainder``) is what a caller carries on or drops. A block boundary
may cut a document: its two pieces then sit in different blocks, as in MDLM's and nanoGPT's data.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

import numpy as np

PACKINGS = ("concat", "wrap")


def eos_stream(docs: Sequence[Sequence[int]], eos: int) -> np.ndarray:
    """Tokenized documents, each followed by EOS, as one int64 stream."""
    n = sum(len(d) for d in docs) + len(docs)
    return np.fromiter(itertools.chain.from_iterable(itertools.chain(d, (eos,)) for d in docs), dtype=np.int64,
                       count=n)


def piece_length(packing: str, seq_len: int) -> int:
    """Stream tokens per block: seq_len (concat), or seq_len - 2 (wrap: BOS and EOS frame each piece)."""
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {', '.join(PACKINGS)}, got {packing!r}")
    if packing == "wrap" and seq_len < 3:
        raise ValueError(f"wrap packing frames each piece with BOS and EOS: seq_len must be at least 3, got {seq_len}")
    return seq_len - 2 if packing == "wrap" else seq_len


def pack(stream: np.ndarray, packing: str, seq_len: int, bos: Optional[int] = None,
         eos: Optional[int] = None) -> tuple[np.ndarray, int]:
    """(blocks (n, seq_len) of the stream's dtype, used): every whole block of ``stream`` and how many stream
    tokens they hold; ``stream[used:]`` is the remainder (fewer than one block's worth)."""
    piece = piece_length(packing, seq_len)
    full = len(stream) // piece
    body = np.asarray(stream[: full * piece]).reshape(full, piece)
    if packing == "concat":
        return body, full * piece
    if bos is None or eos is None:
        raise ValueError(f"wrap packing needs a BOS and an EOS id, got bos={bos}, eos={eos}")
    frame = np.empty((full, seq_len), dtype=body.dtype)
    frame[:, 0], frame[:, -1], frame[:, 1:-1] = bos, eos, body
    return frame, full * piece


def pack_documents(docs: Sequence[Sequence[int]], packing: str, seq_len: int, bos: Optional[int] = None,
                   eos: Optional[int] = None) -> tuple[np.ndarray, int]:
    """(blocks, dropped tokens): tokenized documents packed as data prep packs one split, the remainder dropped."""
    if eos is None:
        raise ValueError("packing documents needs an EOS id to separate them")
    stream = eos_stream(docs, eos)
    blocks, used = pack(stream, packing, seq_len, bos, eos)
    return blocks, len(stream) - used
