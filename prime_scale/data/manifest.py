"""The dataset manifest: what every data-prep job writes last (``manifest.json``, the commit point of a dataset) and
what training, evaluation and export check before they read a byte of the shards.

One schema for every kind of data:

=============  ===========================================================================================
kind           text | image | digits | markov
vocab_size     C, the number of token values (images: 256 channel values; digits: the grey levels)
seq_len        tokens per sample (text: the block length; images: image_size**2 * channels)
dtype          the stored dtype of the token members: uint8 | uint16 | uint32
packing        text: concat | wrap (how documents became blocks); other kinds: null (a sample is one sequence)
tokenizer      text: {library, file, sha256, vocab_size, bos_id, eos_id, pad_id, unk_id, ...}; else null
image_size     image and digits: the side of the square image; else null
channels       image and digits: values per pixel (3 or 1); else null
splits         {split: {"shards": [{name, samples, bytes, sha256}, ...], counts ...}}
=============  ===========================================================================================

Kind-specific facts (a Markov chain's entropies, image classes, skip counts, the prep config) sit beside these
keys in the same JSON object. ``check_dataset`` compares a manifest with a run's config and names every
disagreement with both values and the fix, so a run never trains on data that means something else (64 px images
read as 32 px ones, another tokenizer's ids, blocks of another length).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from prime_scale.config import Config, ConfigError

FORMAT_VERSION = 3
KINDS = ("text", "image", "digits", "markov")
DTYPES = ("uint8", "uint16", "uint32")
# data.source of a config -> the dataset kinds it can read (markov and digits are prepared by the pipeline itself;
# shards reads whatever a data-prep job made)
SOURCE_KINDS = {"markov": ("markov",), "digits": ("digits",), "shards": KINDS}
_TYPED = ("format_version", "kind", "vocab_size", "seq_len", "dtype", "packing", "tokenizer", "image_size",
          "channels", "splits")


class ManifestError(ValueError):
    """A manifest.json that is not a dataset of this format (an older prime_scale, or a damaged file)."""


@dataclass(frozen=True)
class DatasetManifest:
    kind: str
    vocab_size: int
    seq_len: int
    dtype: str
    splits: dict[str, dict[str, Any]]
    packing: Optional[str] = None
    tokenizer: Optional[dict[str, Any]] = None
    image_size: Optional[int] = None
    channels: Optional[int] = None
    facts: dict[str, Any] = field(default_factory=dict)  # everything else the job recorded
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        problems = []
        if self.kind not in KINDS:
            problems.append(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("vocab_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if (self.kind == "text") != (self.packing is not None):
            problems.append(f"packing {self.packing!r}: text datasets say how documents were packed, others say null")
        if self.kind == "text" and not self.tokenizer:
            problems.append("a text dataset records its tokenizer")
        if self.kind in ("image", "digits") and not (self.image_size and self.channels):
            problems.append(f"an {self.kind} dataset records image_size and channels")
        if not isinstance(self.splits, dict) or not self.splits:
            problems.append("splits must map split names to their shards")
        else:
            for name, split in self.splits.items():
                shards = split.get("shards") if isinstance(split, dict) else None
                if not isinstance(shards, list) or not all(
                        isinstance(s, dict) and {"name", "samples", "bytes", "sha256"} <= s.keys() for s in shards):
                    problems.append(f"split {name!r} must list its shards as {{name, samples, bytes, sha256}}")
        if problems:
            raise ManifestError("not a valid dataset manifest: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        """The JSON object of manifest.json: the typed keys first, then the job's own facts."""
        typed = {k: getattr(self, k) for k in _TYPED}
        clash = sorted(set(typed) & set(self.facts))
        if clash:
            raise ValueError(f"facts must not repeat the typed keys {clash}")
        return {**typed, **self.facts}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "manifest.json") -> "DatasetManifest":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"{where} is a dataset manifest of format {version!r}, this prime_scale reads format {FORMAT_VERSION}: "
                "prepare the data again (the data-prep command with --overwrite; the synthetic and digits sources "
                "are prepared again by themselves)")
        missing = [k for k in ("kind", "vocab_size", "seq_len", "dtype", "splits") if k not in data]
        if missing:
            raise ManifestError(f"{where} lacks {', '.join(missing)}")
        try:
            return cls(**{k: data.get(k) for k in _TYPED}, facts={k: v for k, v in data.items() if k not in _TYPED})
        except ManifestError as e:
            raise ManifestError(f"{where}: {e}") from None

    def shards(self, split: str) -> list[dict[str, Any]]:
        if split not in self.splits:
            raise ValueError(f"the dataset has no split {split!r} (it has {', '.join(self.splits)})")
        return self.splits[split]["shards"]

    def samples(self, split: str) -> int:
        return sum(int(s["samples"]) for s in self.shards(split))

    def replace(self, **changes) -> "DatasetManifest":
        return dataclasses.replace(self, **changes)


def describe(m: DatasetManifest) -> str:
    """One line: what the shards hold."""
    what = {"text": f"text blocks of {m.seq_len} tokens, {m.packing} packing, "
                    f"{(m.tokenizer or {}).get('library', '?')} tokenizer",
            "image": f"{m.image_size} x {m.image_size} images with {m.channels} channels = {m.seq_len} tokens",
            "digits": f"{m.image_size} x {m.image_size} digit images = {m.seq_len} tokens",
            "markov": f"Markov sequences of {m.seq_len} tokens"}[m.kind]
    return f"{what}, vocabulary {m.vocab_size}"


def dataset_problems(m: DatasetManifest, cfg: Config, url: str, splits: tuple[str, ...] = ("train", "val"),
                     trained_on: Optional[dict] = None) -> list[str]:
    """Every way the dataset at ``url`` disagrees with ``cfg`` (empty when it can be read as the config says),
    needing the ``splits`` to hold samples.

    ``trained_on``: the manifest of the data a trained model saw (an export's dataset.json). Its tokenizer and kind
    then decide, not the config's prep settings: the token ids must mean what they meant in training."""
    d, problems = cfg.data, []
    here = f"the data at {url} ({describe(m)})"
    kinds = SOURCE_KINDS[d.source]
    if m.kind not in kinds:
        problems.append(f"data.source={d.source} reads {' or '.join(kinds)} data, but {here} is {m.kind} data: "
                        f"set data.source=shards (or {m.kind}), or data.path to the dataset you meant")
    if m.vocab_size != d.vocab_size:
        problems.append(f"data.vocab_size={d.vocab_size}, but {here} has vocabulary {m.vocab_size}: set "
                        f"data.vocab_size={m.vocab_size}, or prepare the data again with this vocabulary")
    if m.seq_len != d.seq_len:
        if m.kind == "image":
            fix = (f"set data.seq_len={m.seq_len} and prep.image_size={m.image_size} (the data's), or prepare the "
                   f"data again with prep.image_size matching data.seq_len={d.seq_len}")
        else:
            fix = f"set data.seq_len={m.seq_len}, or prepare the data again with data.seq_len={d.seq_len}"
        problems.append(f"data.seq_len={d.seq_len}, but {here} holds samples of {m.seq_len} tokens "
                        f"(nothing is cut or joined to fit): {fix}")
    if m.kind == "image" and m.image_size != cfg.prep.image_size:
        problems.append(f"prep.image_size={cfg.prep.image_size}, but {here} holds {m.image_size} px images: set "
                        f"prep.image_size={m.image_size}, or prepare the data again at {cfg.prep.image_size} px")
    P = cfg.model.tokens_per_position
    if m.channels and P not in (1, m.channels):
        problems.append(f"model.tokens_per_position={P}, but the pixels of {here} have {m.channels} channel(s): a "
                        f"position holds one channel (1) or one whole pixel ({m.channels})")
    if trained_on and trained_on.get("kind") not in (None, m.kind):
        problems.append(f"the model was trained on {trained_on['kind']} data, but {here} is {m.kind} data")
    if m.kind == "text":
        problems += _text_problems(m, cfg, here, trained_on)
    for split in splits:
        if split not in m.splits:
            problems.append(f"{here} has no {split!r} split (it has {', '.join(m.splits)})")
        elif m.samples(split) == 0:
            problems.append(f"the {split!r} split of {here} holds no samples")
    return problems


def _text_problems(m: DatasetManifest, cfg: Config, here: str, trained_on: Optional[dict]) -> list[str]:
    p, problems = cfg.prep, []
    if m.packing != p.packing:
        problems.append(f"prep.packing={p.packing}, but {here} was packed with {m.packing}: set "
                        f"prep.packing={m.packing}, or prepare the data again with prep.packing={p.packing}")
    tok = m.tokenizer or {}
    if trained_on is not None:
        mine = (trained_on.get("tokenizer") or {})
        if mine.get("sha256") != tok.get("sha256"):
            problems.append(f"{here} was tokenized with tokenizer sha256 {tok.get('sha256') or '(none)'}, but the "
                            f"model's data used {mine.get('sha256') or '(none)'}: prepare the data with "
                            f"prep.tokenizer=<the model's {mine.get('file') or 'tokenizer'}>, or score it as "
                            "zero_shot= text instead")
    elif p.tokenizer:
        theirs = _file_sha256(p.tokenizer)
        if theirs is not None and theirs != tok.get("sha256"):
            problems.append(f"prep.tokenizer={p.tokenizer} (sha256 {theirs[:12]}...), but {here} was tokenized with "
                            f"{tok.get('file')} (sha256 {str(tok.get('sha256'))[:12]}..., {tok.get('source')}): "
                            "prepare the data again with this tokenizer, or set prep.tokenizer to the data's")
    elif (tok.get("trained") or {}).get("type") not in (None, p.tokenizer_type):
        problems.append(f"prep.tokenizer_type={p.tokenizer_type}, but {here} was tokenized with a trained "
                        f"{tok['trained']['type']} tokenizer: set prep.tokenizer_type={tok['trained']['type']}")
    elif not tok.get("trained") and tok.get("source"):
        problems.append(f"prep.tokenizer is empty (train one), but {here} was tokenized with the given tokenizer "
                        f"{tok['source']}: set prep.tokenizer={tok['source']}")
    return problems


def _file_sha256(url: str) -> Optional[str]:
    """sha256 of the tokenizer behind ``url`` (as data prep would load it); None when it cannot be read from here
    (e.g. it lives on the machine that prepared the data)."""
    from prime_scale.data.tokenizer import Tokenizer, TokenizerError

    try:
        return Tokenizer.load(url).sha256
    except (TokenizerError, OSError):
        return None


def check_dataset(m: DatasetManifest, cfg: Config, url: str, splits: tuple[str, ...] = ("train", "val"),
                  trained_on: Optional[dict] = None) -> None:
    """ConfigError naming every disagreement between the dataset and the config (see ``dataset_problems``)."""
    problems = dataset_problems(m, cfg, url, splits, trained_on)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"the data does not fit the config ({len(problems)} problems):\n"
                          + "\n".join(f"- {x}" for x in problems))


def read_dataset(url: str) -> DatasetManifest:
    """The manifest of the dataset at ``url``, as ConfigError when there is none or it cannot be read."""
    from prime_scale.data.shards import read_manifest

    try:
        data = read_manifest(url)
    except FileNotFoundError:
        raise ConfigError(f"no prepared data at data.path={url} (manifest.json missing): run data prep first "
                          "(python -m data_prep.text / images / digits / synthetic), or python launchers/local.py, "
                          "which prepares the synthetic and digits sources itself") from None
    try:
        return DatasetManifest.from_json(data, f"{url}/manifest.json")
    except ManifestError as e:
        raise ConfigError(str(e)) from None


def checked_dataset(cfg: Config, url: Optional[str] = None) -> DatasetManifest:
    """``read_dataset`` of ``url`` (default data.path), checked for training with ``cfg`` (``check_dataset``)."""
    url = url or cfg.data.path
    manifest = read_dataset(url)
    check_dataset(manifest, cfg, url)
    return manifest
