"""One tokenizer over SentencePiece models (``tokenizer.model``) and HuggingFace ``tokenizers`` (``tokenizer.json``).

A text dataset stores its tokenizer file beside the shards and records it in the manifest's ``tokenizer`` entry
(``describe()``: library, file, sha256, vocab_size and the special ids), so shards, exports and the tokenizer that
made them never drift apart. Everything that encodes or decodes text goes through ``Tokenizer``:

    tok = Tokenizer.load("/shared/gpt2")                       # a .model, a tokenizer.json, or a folder holding one
    tok = Tokenizer.from_dataset(url, manifest["tokenizer"])   # the file a dataset or an export names
    ids = tok.encode(["some text", "more"])                    # list[list[int]], no special tokens added
    tok.decode(ids[0]) == "some text"

Special ids are None where a tokenizer has none. For a tokenizer.json they are found among its special added tokens
(GPT-2's ``<|endoftext|>`` serves as both BOS and EOS; ``<s>``/``</s>``, ``<pad>``, ``<unk>`` and a few other common
names); only the file itself decides, not the other files of a HuggingFace folder, so a tokenizer means the same
wherever its file is copied. Text is always encoded as text: a literal ``<|endoftext|>`` inside a document becomes
ordinary pieces, never the special token (document boundaries are the packer's alone), and ``decode`` leaves the
special tokens out, as SentencePiece does with its control symbols.
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import Iterable, Optional, Sequence, Union

import fsspec

# library -> the file name a dataset stores it under
FILES = {"sentencepiece": "tokenizer.model", "tokenizers": "tokenizer.json"}
LIBRARIES = {file: library for library, file in FILES.items()}
SPECIAL_KEYS = ("bos_id", "eos_id", "pad_id", "unk_id")

# Special-token names of a tokenizer.json, in order of preference. <|endoftext|> is GPT-2's only special token: its
# EOS, and its BOS when nothing else is (GPT-2 and MDLM use it for both).
_NAMES = {
    "bos_id": ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "[BOS]", "<|endoftext|>"),
    "eos_id": ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[EOS]"),
    "pad_id": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
    "unk_id": ("<unk>", "[UNK]", "<|unk|>"),
}


class TokenizerError(ValueError):
    """A file that is not a usable tokenizer (missing, unreadable, of neither library, ids that do not fit)."""


class Tokenizer:
    """A SentencePiece model or a HuggingFace tokenizer, from the bytes of its file."""

    def __init__(self, data: bytes, library: str, special: Optional[dict] = None):
        if library not in FILES:
            raise TokenizerError(f"unknown tokenizer library {library!r} (expected {' or '.join(FILES)})")
        self.data, self.library = bytes(data), library
        if library == "sentencepiece":
            self._sp = _sentencepiece(self.data)
            self.vocab_size = self._sp.get_piece_size()
            ids = {k: getattr(self._sp, k)() for k in SPECIAL_KEYS}
            found = {k: (v if v >= 0 else None) for k, v in ids.items()}
        else:
            self._hf = _hf_tokenizer(self.data)
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            found = _hf_special_ids(self._hf)
        self.special = {**found, **(special or {})}

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def load(cls, url: str) -> "Tokenizer":
        """From a path or fsspec URL: a SentencePiece ``.model``, a ``tokenizer.json``, or a folder holding one
        (tokenizer.json first when it holds both, as HuggingFace loads it)."""
        fs, path = fsspec.core.url_to_fs(url)
        if fs.isdir(path):
            names = [n for n in (FILES["tokenizers"], FILES["sentencepiece"]) if fs.isfile(posixpath.join(path, n))]
            if not names:
                held = sorted(posixpath.basename(p) for p in fs.ls(path, detail=False))
                hint = ""
                if {"vocab.json", "merges.txt"} <= set(held):
                    hint = (" It holds vocab.json and merges.txt (an older HuggingFace layout): write its "
                            "tokenizer.json with python -c \"from transformers import AutoTokenizer; "
                            f"AutoTokenizer.from_pretrained('{path}').backend_tokenizer.save('{path}/tokenizer.json')\"")
                raise TokenizerError(f"{url} holds no tokenizer.json or tokenizer.model (it holds: "
                                     f"{', '.join(held[:10]) or 'nothing'}).{hint}")
            path = posixpath.join(path, names[0])
        try:
            with fs.open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise TokenizerError(f"no tokenizer at {url} (expected a SentencePiece .model, a HuggingFace "
                                 "tokenizer.json, or a folder holding one; nothing is downloaded)") from None
        name = posixpath.basename(path)
        if name.endswith(".json"):
            library = "tokenizers"
        elif name.endswith(".model"):
            library = "sentencepiece"
        else:  # another name: a tokenizer.json is a JSON object, a SentencePiece model a protobuf
            library = "tokenizers" if data.lstrip()[:1] == b"{" else "sentencepiece"
        try:
            return cls(data, library)
        except TokenizerError as e:
            raise TokenizerError(f"{url}: {e}") from None

    @classmethod
    def from_dataset(cls, folder: str, entry: dict) -> "Tokenizer":
        """The tokenizer a dataset (or an export) stores in ``folder`` under the name its manifest ``entry`` gives,
        checked against the recorded sha256; the recorded special ids are the ones its shards were packed with."""
        file = entry_file(entry)
        library = entry.get("library") or LIBRARIES.get(file)
        if library is None:
            raise TokenizerError(f"the manifest's tokenizer entry names {file!r} without its library")
        url = posixpath.join(folder.rstrip("/"), file)
        try:
            with fsspec.open(url, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise TokenizerError(f"{url} is missing: the manifest says the data were tokenized with it") from None
        sha = hashlib.sha256(data).hexdigest()
        if entry.get("sha256") and sha != entry["sha256"]:
            raise TokenizerError(f"{url} has sha256 {sha}, but the manifest records {entry['sha256']}: it is not "
                                 "the tokenizer these shards were made with")
        recorded = {k: entry[k] for k in SPECIAL_KEYS if k in entry}  # older manifests wrote -1 for none
        return cls(data, library, {k: None if v is None or v < 0 else v for k, v in recorded.items()})

    # ------------------------------------------------------------------------------------------------ facts

    @property
    def file(self) -> str:
        """The name a dataset stores this tokenizer under."""
        return FILES[self.library]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    bos_id = property(lambda self: self.special["bos_id"])
    eos_id = property(lambda self: self.special["eos_id"])
    pad_id = property(lambda self: self.special["pad_id"])
    unk_id = property(lambda self: self.special["unk_id"])

    def special_tokens(self) -> list[str]:
        """The names of its special tokens (for messages)."""
        if self.library == "sentencepiece":
            return [self._sp.id_to_piece(i) for i in range(self.vocab_size)
                    if self._sp.is_control(i) or self._sp.is_unknown(i)]
        return [t.content for t in self._hf.get_added_tokens_decoder().values() if t.special]

    def describe(self) -> dict:
        """The facts a dataset manifest records about its tokenizer."""
        return {"library": self.library, "file": self.file, "sha256": self.sha256, "vocab_size": self.vocab_size,
                **self.special}

    def __repr__(self) -> str:
        ids = ", ".join(f"{k[:-3]}={v}" for k, v in self.special.items())
        return f"Tokenizer({self.library}, vocab_size={self.vocab_size}, {ids}, sha256={self.sha256[:12]})"

    # ------------------------------------------------------------------------------------------------ text

    def encode(self, texts: Union[str, Sequence[str]], parallel: bool = True) -> Union[list[int], list[list[int]]]:
        """Token ids of each text (one list for one string), no special tokens added. ``parallel=False`` keeps
        to the calling thread (a data-prep worker is one core); the ids are the same either way."""
        if isinstance(texts, str):
            return self.encode([texts], parallel)[0]
        texts = list(texts)
        if self.library == "sentencepiece":
            return self._sp.encode(texts, out_type=int, num_threads=-1 if parallel else 1)
        if parallel:
            return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        return [self._hf.encode(t, add_special_tokens=False).ids for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids (special tokens left out)."""
        ids = [int(t) for t in ids]
        if self.library == "sentencepiece":
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=True)


def entry_file(entry: dict) -> str:
    """The tokenizer file a manifest's ``tokenizer`` entry names (datasets of before tokenizer.json: tokenizer.model)."""
    return entry.get("file") or FILES["sentencepiece"]


def _sentencepiece(data: bytes):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except (RuntimeError, OSError, TypeError) as e:
        raise TokenizerError(f"not a SentencePiece model: {e}") from None
    return sp


def _hf_tokenizer(data: bytes):
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise TokenizerError(f"not a HuggingFace tokenizer.json: {e}") from None
    tok.no_truncation()  # a file may carry a truncation/padding setting: ids must be the text's, whole
    tok.no_padding()
    tok.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is text, not a document boundary
    size = tok.get_vocab_size(with_added_tokens=True)
    missing = next((i for i in range(size) if tok.id_to_token(i) is None), None)
    if missing is not None:
        top = max(tok.get_vocab(with_added_tokens=True).values())
        raise TokenizerError(f"its token ids run up to {top}, but its vocabulary holds {size} tokens (no id "
                             f"{missing}): the ids are not 0..C-1")
    return tok


def _hf_special_ids(tok) -> dict:
    special = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    ids = {key: next((special[n] for n in names if n in special), None) for key, names in _NAMES.items()}
    unk = getattr(tok.model, "unk_token", None)  # the model's own unknown token (BPE, WordLevel, WordPiece)
    if ids["unk_id"] is None and isinstance(unk, str):
        ids["unk_id"] = tok.token_to_id(unk)
    return ids
