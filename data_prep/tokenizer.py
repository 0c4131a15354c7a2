"""SentencePiece tokenizers for text data prep: train one on a bounded corpus sample, or take an existing model.

The model is stored with the dataset (``tokenizer.model``) and identified by its sha256, so shards and the
tokenizer that made them never drift apart. Special ids are fixed for trained models: unk 0, bos 1, eos 2, pad 3.
"""

from __future__ import annotations

import hashlib
import io
from typing import Iterable

import fsspec
import sentencepiece as spm

from data_prep.batch import DataPrepError

SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


class TokenizerError(DataPrepError):
    """A tokenizer that cannot serve this dataset (wrong vocabulary size, no EOS, unreadable file)."""


def train_sentencepiece(
    lines: Iterable[str], vocab_size: int, model_type: str = "bpe", num_threads: int = 4
) -> bytes:
    """Train on ``lines`` (already bounded by the caller) and return the serialized model.

    Lossless settings for language modelling: identity normalisation, whitespace kept, byte fallback so every
    string encodes without <unk>, digits split. Training is deterministic for a given input and thread count.
    """
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            input_sentence_size=0,  # the caller bounds the sample; spm must not subsample it again
            shuffle_input_sentence=False,
            max_sentence_length=1 << 16,
            num_threads=num_threads,
            minloglevel=2,
            **SPECIAL_IDS,
        )
    except RuntimeError as e:  # spm reports a vocabulary too small for bytes + characters this way
        raise TokenizerError(
            f"SentencePiece training failed with data.vocab_size={vocab_size}: {e}. Byte fallback needs at least "
            "256 byte pieces + 4 special ids + the corpus's frequent characters: raise data.vocab_size."
        ) from None
    return model.getvalue()


def load_model_bytes(url: str) -> bytes:
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise TokenizerError(f"prep.tokenizer: no SentencePiece model at {url!r}") from None
    processor(data)  # fails early on a file that is not a model
    return data


def processor(model: bytes) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model)
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"not a SentencePiece model: {e}") from None
    return sp


def describe(model: bytes, vocab_size: int) -> dict:
    """Facts the manifest records; checks that the model fits the config's vocabulary and has an EOS."""
    sp = processor(model)
    if sp.get_piece_size() != vocab_size:
        raise TokenizerError(
            f"the tokenizer has {sp.get_piece_size()} pieces but data.vocab_size={vocab_size}; "
            f"set data.vocab_size={sp.get_piece_size()}"
        )
    if sp.eos_id() < 0:
        raise TokenizerError("the tokenizer has no EOS id; documents could not be separated when packing")
    return {
        "sha256": hashlib.sha256(model).hexdigest(),
        "vocab_size": sp.get_piece_size(),
        "eos_id": sp.eos_id(),
        "bos_id": sp.bos_id(),
        "pad_id": sp.pad_id(),
        "unk_id": sp.unk_id(),
    }
