"""Tokenizers for text data prep: train one on a bounded corpus sample, or take an existing one (``prep.tokenizer``).

Trained (vocabulary ``data.vocab_size``):

* ``bpe`` / ``unigram``: SentencePiece, lossless settings, special ids unk 0, bos 1, eos 2, pad 3;
* ``byte_bpe``: a GPT-2-style byte-level BPE with HuggingFace ``tokenizers``: ByteLevel pre-tokenizer and decoder
  (``decode(encode(text)) == text`` for any text, no unknown token), one special token ``<|endoftext|>`` (id 0)
  serving as BOS and EOS, like GPT-2's.

The result is a ``prime_scale.data.tokenizer.Tokenizer``; the dataset stores its file beside the shards
(``tokenizer.model`` or ``tokenizer.json``) and records ``describe()`` in the manifest.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from typing import Iterable

import sentencepiece as spm

from prime_scale.data import tokenizer as library
from prime_scale.data.errors import DataPrepError
from prime_scale.data.tokenizer import Tokenizer

SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}
END_OF_TEXT = "<|endoftext|>"
BYTE_SYMBOLS = 256  # the ByteLevel alphabet: every byte is a symbol, so nothing is ever unknown
# Where a given tokenizer may come from when prep.tokenizer names none that exists (the OWT configs use GPT-2's).
GPT2_HINT = ("GPT-2's (the OWT configs' prep.tokenizer): fetch it once where the hub is reachable, e.g. python -c "
             "\"from huggingface_hub import hf_hub_download; hf_hub_download('openai-community/gpt2', "
             "'tokenizer.json', local_dir='gpt2')\", and pass prep.tokenizer=<that folder>")


class TokenizerError(DataPrepError, library.TokenizerError):
    """A tokenizer that cannot serve this dataset (wrong vocabulary size, no EOS, unreadable file)."""


def train_sentencepiece(
    lines: Iterable[str], vocab_size: int, model_type: str = "bpe", num_threads: int = 4
) -> Tokenizer:
    """Train on ``lines`` (already bounded by the caller).

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
    return Tokenizer(model.getvalue(), "sentencepiece")


def train_byte_bpe(documents: list[str], vocab_size: int, num_threads: int = 4) -> Tokenizer:
    """A GPT-2-style byte-level BPE of ``vocab_size`` tokens (``<|endoftext|>`` included) trained on whole
    ``documents`` (so merges see newlines and indentation as they occur).

    ``tokenizers`` trains on a Rayon thread pool whose size only the environment sets (RAYON_NUM_THREADS, read
    once per process), so training runs in a child process with ``num_threads`` threads: nothing is set in this
    process. The result does not depend on the thread count (tested), only on the documents."""
    if vocab_size < BYTE_SYMBOLS + 1:
        raise TokenizerError(f"a byte-level BPE holds {BYTE_SYMBOLS} byte symbols + {END_OF_TEXT}, at least "
                             f"{BYTE_SYMBOLS + 1} tokens, but data.vocab_size={vocab_size}: raise data.vocab_size")
    env = {**os.environ, "RAYON_NUM_THREADS": str(num_threads)}  # the child imports the installed data_prep
    done = subprocess.run([sys.executable, "-c", "from data_prep.tokenizer import _byte_bpe_child; _byte_bpe_child()",
                           str(vocab_size)], input=json.dumps(documents).encode(), env=env, capture_output=True)
    if done.returncode != 0:
        raise TokenizerError(f"byte-level BPE training failed: {done.stderr.decode(errors='replace')[-2000:]}")
    tok = Tokenizer(done.stdout, "tokenizers")
    if tok.vocab_size < vocab_size:
        chars = sum(len(d) for d in documents)
        raise TokenizerError(
            f"the byte-level BPE reached only {tok.vocab_size} of data.vocab_size={vocab_size} tokens: its sample "
            f"({len(documents):,} documents, {chars:,} characters) has no more pairs to merge. Give it more text "
            f"(raise prep.tokenizer_sentences, or more input), or set data.vocab_size={tok.vocab_size}")
    return tok


def byte_bpe_json(documents: Iterable[str], vocab_size: int) -> str:
    """Train the byte-level BPE in this process and return its tokenizer.json (``train_byte_bpe`` runs this in a
    child process)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split, no space added
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents, trainer)
    return tok.to_str()


def _byte_bpe_child() -> None:
    """The child process of ``train_byte_bpe``: documents as JSON on stdin, tokenizer.json on stdout."""
    documents = json.loads(sys.stdin.buffer.read())
    sys.stdout.buffer.write(byte_bpe_json(documents, int(sys.argv[1])).encode())


def load(url: str) -> Tokenizer:
    """``prep.tokenizer``: a SentencePiece .model, a tokenizer.json, or a folder holding one, on any fsspec URL."""
    try:
        return Tokenizer.load(url)
    except library.TokenizerError as e:
        hint = f". {GPT2_HINT}" if str(e).startswith("no tokenizer at") else ""
        raise TokenizerError(f"prep.tokenizer={url}: {e}{hint}") from None


def dataset_facts(tok: Tokenizer, vocab_size: int, packing: str) -> dict:
    """The manifest's facts of ``tok`` (``describe()``), once it is known to serve this dataset: exactly
    ``data.vocab_size`` tokens, an EOS to end documents with, and a BOS for wrap packing."""
    if tok.vocab_size != vocab_size:
        raise TokenizerError(f"the tokenizer has {tok.vocab_size} tokens but data.vocab_size={vocab_size}; "
                             f"set data.vocab_size={tok.vocab_size}")
    named = ", ".join(tok.special_tokens()) or "none"
    if tok.eos_id is None:
        raise TokenizerError(f"the tokenizer ({tok.file}) has no EOS token (its special tokens: {named}); "
                             "documents could not be separated when packing")
    if packing == "wrap" and tok.bos_id is None:
        raise TokenizerError(f"prep.packing=wrap starts every block with BOS, but the tokenizer ({tok.file}) has "
                             f"none (its special tokens: {named}); use prep.packing=concat")
    return tok.describe()
