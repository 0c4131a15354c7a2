"""Typed run configuration: dataclasses, YAML files in ``prime_scale/configs/`` and dotted command-line overrides."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


@dataclass
class DataConfig:
    source: str = "markov"  # markov (synthetic, exact entropy known) | digits (sklearn's 8x8) | shards (prepared)
    path: str = "data/demo"  # where data prep writes / training reads shards (any fsspec URL)
    vocab_size: int = 256  # C: number of token values
    seq_len: int = 128  # tokens per training sequence
    # Synthetic Markov-chain source (source=markov): its entropy rate is known exactly.
    markov_concentration: float = 0.05  # Dirichlet concentration of each transition row (small = low entropy)
    markov_seed: int = 1234
    train_sequences: int = 20000
    val_sequences: int = 512
    shard_size_mb: float = 64.0


@dataclass
class PrepConfig:
    """How ``data_prep`` turns raw text or images into the shards at ``data.path`` (docs/data_prep.md)."""

    input: str = ""  # files, folders or globs (comma-separated, any fsspec URL), hf:NAME or a local datasets dir, or a preset
    text_field: str = "text"  # the text column/key of .jsonl/.json/.parquet and datasets inputs
    txt_document: str = "file"  # what one document is in a .txt file: file | line | paragraph (blank-line separated)
    hf_split: str = "train"  # which split of a datasets input to read
    # an existing tokenizer (path or URL): a SentencePiece .model, a HuggingFace tokenizer.json, or a folder holding
    # one (e.g. a local copy of GPT-2's); empty = train one on a corpus sample
    tokenizer: str = ""
    # trained tokenizers (vocabulary = data.vocab_size): bpe | unigram (SentencePiece) | byte_bpe (GPT-2-style
    # byte-level BPE with HuggingFace tokenizers; one special token <|endoftext|> serving as BOS and EOS)
    tokenizer_type: str = "bpe"
    tokenizer_sentences: int = 1_000_000  # at most this many sample lines are fed to SentencePiece training
    tokenizer_threads: int = 4  # fixed, never taken from --workers: a trained tokenizer must not depend on it
    # concat: documents + EOS joined and cut into seq_len blocks | wrap: documents + EOS joined, cut into pieces
    # of seq_len - 2, each stored as [BOS] piece [EOS] (MDLM / MDM-Prime's OWT protocol). Every sample is a block of
    # exactly seq_len tokens (docs/data_prep.md says why there is no per-document padding)
    packing: str = "concat"
    val_select: str = "hash"  # which documents are validation: hash (content hash, below) | last (the last
    #                           prep.val_docs documents in input order, MDLM's OWT split with val_docs=100000)
    val_fraction: float = 0.0005  # hash: documents whose content hash falls below this go to the val split
    val_docs: int = 0  # hash: > 0 sends exactly this many documents (smallest hashes) to val instead, one extra
    #                    input pass; last: the number of validation documents (required)
    split_seed: int = 0  # salt of the document hash used for the train/val split
    min_doc_chars: int = 1  # shorter documents are skipped (reason: empty)
    max_doc_chars: int = 10_000_000  # longer documents are skipped (reason: giant)
    unit_mb: float = 256.0  # input bytes per work unit (files are split at line boundaries where they can be)
    unit_docs: int = 50_000  # rows per work unit for datasets inputs (OWT: 8M documents -> 161 units)
    image_size: int = 32  # images: side of the square output after center crop + box downsampling
    image_shuffle_seed: int = 0  # images: seeded order of the inputs, so shards are not sorted by class
    image_field: str = ""  # images: the image column of a datasets input ("" = its one Image feature)
    label_field: str = ""  # images: the label column of a datasets input ("" = its one ClassLabel, else "label")


@dataclass
class ModelConfig:
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    rope_base: float = 10000.0
    time_conditioning: bool = False  # adaLN on the masking rate; off = MD4's time-independent denoiser
    merge: str = "sum"  # how the l sub-token embeddings of a position become one vector: sum | mlp
    tokens_per_position: int = 1  # P consecutive tokens share a position (images: 3 = one RGB pixel); C logits each
    objective: str = "diffusion"  # diffusion (MDM / Prime / GenMD4) | ar (causal attention, next-token loss, l = 1)


@dataclass
class PrimeConfig:
    num_subtokens: int = 1  # l; 1 = plain MDM
    base: int = 0  # b; 0 = ceil(C ** (1 / l)), the smallest base with b ** l >= C
    shuffle_tokens: bool = False  # a fixed seeded permutation of token ids before sub-tokenisation (l > 1 only)
    shuffle_seed: int = 0  # the permutation's seed; the permutation itself is stored in the weights (codec.permutation)


@dataclass
class DiffusionConfig:
    schedule: str = "linear"  # linear | cosine | polynomial | loglinear | genmd4 (learned, state-dependent)
    schedule_power: float = 1.0  # exponent w of alpha(t) = 1 - t**w (polynomial); genmd4's initial exponents
    schedule_eps: float = 0.0  # loglinear's epsilon; must be 0 for an honest bound (see schedules.py)
    time_sampling: str = "antithetic"  # antithetic (stratified over the batch) | uniform
    eval_estimator: str = "count"  # count (bounded variance) | continuous (the training estimator)
    # what the model trains on (docs/method.md "Two objectives"): nelbo (the bound: every masked digit scored by
    # its carry-over marginal) | token_joint (the withdrawn MDM-Prime code's loss: every token scored by the joint
    # of its masked digits; a proper scoring rule but NOT a bound, logged as loss_token_joint_not_a_bound).
    # Evaluation always reports the NELBO.
    loss: str = "nelbo"


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3  # the peak learning rate, reached at the end of the warmup
    min_lr: float = 1e-4  # cosine: the rate at train.steps, <= train.lr (load_config refuses more); constant: unused
    lr_schedule: str = "cosine"  # cosine (train.lr after the warmup down to train.min_lr at train.steps) | constant
    warmup_steps: int = 100  # linear warmup to train.lr over these steps (0 = none)
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 (DeepSpeed's bf16: bf16 weights and activations, fp32 master weights)
    log_every: int = 50  # log training metrics every this many optimizer steps (0 = never by count)
    eval_every: int = 500  # evaluate on the validation split every this many optimizer steps (0 = never by count)
    num_threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default


@dataclass
class EngineConfig:
    """The DeepSpeed engine (prime_scale/engine.py): sharding, batching across ranks, EMA, data streaming."""

    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    micro_batch_size: int = 0  # sequences per rank per micro-step; 0 = train.batch_size / world size (no accumulation)
    ema_decay: float = 0.0  # exponential moving average of the weights (0 = off); evaluation and samples use it
    activation_checkpointing: bool = False  # recompute each block in the backward pass: less memory, ~1/3 more compute
    compile: bool = False  # torch.compile the model (DeepSpeed's engine.compile)
    nan_policy: str = "stop"  # a non-finite loss: stop (with a clear message) | drop_batch (zero its gradient, go on)
    max_dropped_batches: int = 10  # drop_batch: stop once more batches than this were dropped
    peak_tflops: float = 0.0  # dense peak of one device in the run's dtype, to report MFU (0 = do not report)
    num_workers: int = 0  # DataLoader worker processes per rank
    shuffle_shards: int = 4  # shards' worth of samples mixed together (memory: this many shards per worker)
    shard_chunks: int = 8  # each shard is read as this many contiguous chunks, and a mixing group draws its chunks
    #                        from shuffle_shards * shard_chunks shards (1 = whole shards, as before)
    loss_chunk_mb: float = 2048.0  # temporaries of the loss head and of the sampler's draws per row chunk, MB
    #                                (CPU: at most 64 MB, cache-friendly; the values do not depend on it)
    resampled: bool = False  # draw each epoch's shards with replacement instead of a permutation
    collective_timeout_minutes: float = 30.0  # a rank waits at most this long in one collective (a dead or stuck
    #                                           peer): longer than the slowest save, evaluation or universal conversion


@dataclass
class CheckpointConfig:
    dir: str = ""  # any fsspec URL; empty = {run.out_dir}/{run.name}/checkpoints
    every_steps: int = 1000  # save every this many optimizer steps (0 = never by count)
    every_minutes: float = 30.0  # and whenever this much wall time passed since the last save (0 = never)
    keep_last: int = 2  # keep the newest this many checkpoints ...
    keep_every: int = 0  # ... plus every checkpoint whose step is a multiple of this (0 = none)
    resume: str = "auto"  # auto (the latest complete checkpoint, if any) | never | a checkpoint URL
    lock_stale_minutes: float = 10.0  # object stores: a run's lease not renewed for this long is taken over


@dataclass
class LogConfig:
    wandb: str = "offline"  # offline (files in the run folder; `wandb sync` later) | online | disabled
    wandb_project: str = "prime_scale"
    wandb_entity: str = ""


@dataclass
class EvalConfig:
    batch_size: int = 0  # sequences per forward pass (evaluation and samples); 0 = the largest that fits memory_mb
    memory_mb: float = 8192.0  # activations, logits, loss-head and sampler temporaries of a batch (not the weights)
    max_sequences: int = 512  # validation sequences scored (0 = all)
    repeats: int = 4  # Monte Carlo draws of (time, mask) per sequence
    # FID / Inception Score of samples from the final weights, for image data (docs/image_metrics.md)
    fid_samples: int = 0  # samples to score (the literature uses 50,000); 0 = no FID
    fid_features: str = "inception"  # inception (published-comparable) | standin (CPU smoke runs; not comparable)
    inception_weights: str = ""  # local path of pt_inception-2015-12-05-6726825d.pth (never downloaded)
    fid_reference_split: str = "train"  # the split whose statistics FID compares against (cached beside the shards)


@dataclass
class SampleConfig:
    num_samples: int = 4
    steps: int = 256  # predictor steps from t = 1 to t = 0
    float64: bool = True  # categorical draws in float64 (float32 Gumbel draws lower the temperature)
    prompt_len: int = 0  # tokens of a validation sequence kept fixed as a prefix
    every_steps: int = 0  # during training, draw samples every this many steps: a PNG grid for pixel data,
    #                       logged to wandb too (0 = never)
    # Sampler options (docs/sampling.md). The defaults are plain ancestral sampling; published FIDs use others.
    time_schedule: str = "uniform"  # grid the steps walk: uniform | cosine (fine steps near t = 1) | power
    time_power: float = 2.0  # power grid t_i = (1 - i/steps)**p: p > 1 puts the steps near t = 0, p < 1 near t = 1
    temperature: float = 1.0  # tau dividing the log-probs of the allowed codes before a draw (at t = 1 if linear)
    temperature_schedule: str = "constant"  # constant | linear (temperature at t = 1 to temperature_end at t = 0)
    temperature_end: float = 1.0  # tau at t = 0 with temperature_schedule = linear
    top_p: float = 1.0  # nucleus sampling: draw from the smallest set of allowed codes holding this mass (1 = off)
    corrector_steps: int = 0  # re-mask and redraw moves after each predictor step (ReMDM-style); 0 = none
    remask_prob: float = 0.0  # chance a corrector move re-masks each unmasked generated digit, in [0, 1)


@dataclass
class RunConfig:
    name: str = "demo"
    out_dir: str = "runs"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    prep: PrepConfig = field(default_factory=PrepConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prime: PrimeConfig = field(default_factory=PrimeConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    run: RunConfig = field(default_factory=RunConfig)


# --------------------------------------------------------------------------------------------------
# Loading, checking and saving.

# The shipped configs (and sweeps/, the sweep specs) are package data: config=NAME finds them in a checkout, an
# editable install and an installed wheel alike, whatever the working directory.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

VALID_NAMES: dict[str, tuple[str, ...]] = {
    "data.source": ("markov", "digits", "shards"),
    "prep.txt_document": ("file", "line", "paragraph"),
    "prep.tokenizer_type": ("bpe", "unigram", "byte_bpe"),
    "prep.packing": ("concat", "wrap"),
    "prep.val_select": ("hash", "last"),
    "model.merge": ("sum", "mlp"),
    "model.objective": ("diffusion", "ar"),
    "diffusion.schedule": ("linear", "cosine", "polynomial", "loglinear", "genmd4"),
    "diffusion.time_sampling": ("antithetic", "uniform"),
    "diffusion.eval_estimator": ("count", "continuous"),
    "diffusion.loss": ("nelbo", "token_joint"),
    "train.lr_schedule": ("cosine", "constant"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.dtype": ("float32", "bfloat16"),
    "engine.nan_policy": ("stop", "drop_batch"),
    "log.wandb": ("offline", "online", "disabled"),
    "eval.fid_features": ("inception", "standin"),
    "sample.time_schedule": ("uniform", "cosine", "power"),
    "sample.temperature_schedule": ("constant", "linear"),
}

_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
# PyYAML follows YAML 1.1, which reads "1e-3" (no dot) as a string; float fields accept such literals.
_FLOAT_LITERAL = re.compile(r"[+-]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][+-]?\d+)?")


class ConfigError(ValueError):
    """A config file, override or value that cannot make a valid run."""


@functools.cache
def _section_types() -> dict[str, type]:
    return typing.get_type_hints(Config)


@functools.cache
def _field_types() -> dict[str, type]:
    """Every settable key, dotted ("train.steps"), mapped to its Python type."""
    out = {}
    for section, cls in _section_types().items():
        for name, tp in typing.get_type_hints(cls).items():
            out[f"{section}.{name}"] = tp
    return out


def _closest(word: str, options: typing.Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return matches[0] if matches else None


def _unknown_key(key: str, options: typing.Iterable[str]) -> ConfigError:
    best = _closest(key, options)
    hint = f"; did you mean '{best}'?" if best else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _convert(key: str, tp: type, value: Any, raw: str | None = None) -> Any:
    """Check `value` (already YAML-parsed) against `tp`; `raw` is the override text, if any."""
    shown = repr(raw) if raw is not None else repr(value)
    bad = ConfigError(f"{key} expects {tp.__name__}, got {shown}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if raw is not None and raw.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[raw.strip().lower()]
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            value = float(value.strip().replace("_", ""))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} expects a finite float, got {shown}")
            return float(value)
        raise bad
    if tp is str:
        if raw is not None:
            return raw
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} expects str, got {shown} (quote it in YAML to make it a string)")
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def _set(cfg: Config, key: str, value: Any, raw: str | None = None) -> None:
    types = _field_types()
    if key not in types:
        sections = _section_types()
        if key in sections:
            example = f"{key}.{dataclasses.fields(sections[key])[0].name}"
            raise ConfigError(f"'{key}' is a section, not a value; set one of its keys, e.g. '{example}'")
        raise _unknown_key(key, types)
    section, name = key.split(".", 1)
    setattr(getattr(cfg, section), name, _convert(key, types[key], value, raw))


def _apply_dict(cfg: Config, d: Any, where: str = "") -> None:
    """Apply a nested {section: {key: value}} mapping onto cfg, with type and key checks."""
    prefix = f"{where}: " if where else ""
    if d is None:
        return
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix}expected a mapping of sections, got {type(d).__name__}")
    sections = _section_types()
    try:
        for section, body in d.items():
            if section not in sections:
                raise _unknown_key(str(section), sections)
            if body is None:
                continue
            if not isinstance(body, dict):
                raise ConfigError(f"section '{section}' must be a mapping of keys to values, got {body!r}")
            for name, value in body.items():
                _set(cfg, f"{section}.{name}", value)
    except ConfigError as e:
        raise ConfigError(prefix + str(e)) from None


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def named_yaml(name: str, folder: Path, kind: str = "config", relative_to: Path | None = None,
               error: type[ConfigError] = ConfigError) -> Path:
    """``folder/NAME.yaml`` for a shipped NAME (with a did-you-mean), or a path to a .yaml file (relative paths
    against ``relative_to``). Configs and sweep specs are found the same way."""
    if name.endswith((".yaml", ".yml")) or "/" in name or "\\" in name:
        path = Path(name).expanduser()
        if not path.is_absolute() and relative_to is not None:
            path = relative_to / path
        if not path.is_file():
            raise error(f"{kind} file '{path}' does not exist")
        return path
    path = folder / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        best = _closest(name, names)
        hint = f" (did you mean '{best}'?)" if best else ""
        raise error(f"unknown {kind} '{name}'{hint}; available {kind}s: {', '.join(names) or '(none)'}")
    return path


def _config_path(name: str, relative_to: Path | None = None) -> Path:
    return named_yaml(name, CONFIG_DIR, "config", relative_to)


def _load_file(path: Path, chain: tuple[Path, ...] = ()) -> Config:
    """Config from a YAML file, following `base:` links (each file overrides its base)."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise ConfigError(f"config base cycle: {cycle}")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    d = {} if d is None else d
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(d).__name__}")
    d = dict(d)
    base = d.pop("base", None)
    if base is None:
        cfg = Config()
    elif isinstance(base, str) and base:
        try:
            base_path = _config_path(base, relative_to=path.parent)
        except ConfigError as e:
            raise ConfigError(f"{path}: base: {e}") from None
        cfg = _load_file(base_path, (*chain, path))
    else:
        raise ConfigError(f"{path}: base must be a config name or path, got {base!r}")
    _apply_dict(cfg, d, str(path))
    return cfg


def _parse_override(arg: str) -> tuple[str, str]:
    key, sep, raw = arg.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"malformed override '{arg}': expected key=value, e.g. train.steps=10 or config=demo")
    return key, raw


def _read_text(tp: Optional[type], raw: str) -> Any:
    """The text after ``key=`` as YAML reads it (``1e-3``, ``true``, ``[1, 2]``), except for a str field: as given."""
    if tp is str:
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def parse_value(key: str, tp: type, raw: str) -> Any:
    """One command-line value of type ``tp`` (str, int, float or bool) by the rules of every config override: the
    text read as YAML, then checked against the type (``true``/``yes``/``1`` for a bool, ``1e-3`` for a float; a
    ConfigError naming ``key`` otherwise). The tools' own keys (prime_scale.cli.Key) are read by it too."""
    return _convert(key, tp, _read_text(tp, raw), raw)


def load_config(argv: list[str], check_schedule: bool = True) -> Config:
    """Config from `config=NAME` (or a .yaml path) plus dotted `section.key=value` overrides, in order.
    ``check_schedule=False`` skips schedule_problems, for a caller that fixes the schedule up itself afterwards
    (the sweep, which clamps each point's warmup to its steps)."""
    overrides = [_parse_override(arg) for arg in argv]
    names = [raw for key, raw in overrides if key == "config"]
    if len(names) > 1:
        raise ConfigError(f"config= given {len(names)} times ({', '.join(names)}); give it once")
    if names:
        if not names[0].strip():
            raise ConfigError(f"config= needs a name; available configs: {', '.join(available_configs())}")
        cfg = _load_file(_config_path(names[0].strip()))
    else:
        cfg = Config()
    types = _field_types()
    for key, raw in overrides:
        if key == "config":
            continue
        _set(cfg, key, _read_text(types.get(key), raw), raw)
    validate(cfg)
    problems = schedule_problems(cfg.train) if check_schedule else []
    if problems:
        _raise(problems)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> Config:
    """Config from a nested {section: {key: value}} dict; missing keys keep their defaults."""
    cfg = Config()
    _apply_dict(cfg, d)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    path.write_text(f"# Resolved config of run '{cfg.run.name}' (load with config={path}).\n{text}")


def _power_reaches(b: int, l: int, c: int) -> bool:
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
        if not _power_reaches(base, l, c):
            raise ConfigError(
                f"prime.base {base} with num_subtokens {l} covers only {base ** l} values, "
                f"fewer than vocab_size {c}; use base >= {resolve_base(c, l)} or base=0"
            )
        return base
    # The float root is only a starting guess (1000 ** (1/3) == 9.999999999999998); integers decide.
    b = max(2, round(math.exp(math.log(c) / l)))
    while b > 2 and _power_reaches(b - 1, l, c):
        b -= 1
    while not _power_reaches(b, l, c):
        b += 1
    return b


def _check_field_types(cfg: Config) -> list[str]:
    problems = []
    for key, tp in _field_types().items():
        section, name = key.split(".", 1)
        value = getattr(getattr(cfg, section), name)
        ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
        if tp is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            problems.append(f"{key} expects {tp.__name__}, got {value!r}")
    return problems


def validate(cfg: Config) -> None:
    """Raise ConfigError listing every setting that cannot make a sound run."""
    problems = _check_field_types(cfg)
    if problems:
        _raise(problems)
    d, m, p, diff, t, e, s = cfg.data, cfg.model, cfg.prime, cfg.diffusion, cfg.train, cfg.eval, cfg.sample

    for key, valid in VALID_NAMES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in valid:
            best = _closest(value, valid)
            hint = f" (did you mean '{best}'?)" if best else ""
            problems.append(f"{key} must be one of {', '.join(valid)}; got '{value}'{hint}")

    if d.vocab_size < 2:
        problems.append(f"data.vocab_size must be at least 2, got {d.vocab_size}")
    if p.num_subtokens < 1:
        problems.append(f"prime.num_subtokens must be at least 1, got {p.num_subtokens}")
    elif d.vocab_size >= 2 and p.base != 0:
        try:
            resolve_base(d.vocab_size, p.num_subtokens, p.base)
        except ConfigError as err:
            problems.append(str(err))
    if d.seq_len < 1:
        problems.append(f"data.seq_len must be at least 1, got {d.seq_len}")

    pr = cfg.prep
    if not 0.0 <= pr.val_fraction < 1.0:
        problems.append(f"prep.val_fraction must be in [0, 1), got {pr.val_fraction}")
    if pr.unit_mb <= 0:
        problems.append(f"prep.unit_mb must be positive, got {pr.unit_mb}")
    if pr.val_docs < 0:
        problems.append(f"prep.val_docs must be non-negative, got {pr.val_docs}")
    elif pr.val_select == "last" and pr.val_docs == 0:
        problems.append("prep.val_select=last needs prep.val_docs=K > 0, the number of validation documents taken "
                        "from the end of the input (MDLM's OpenWebText split: prep.val_docs=100000)")
    if pr.packing == "wrap" and d.seq_len < 3:
        problems.append(f"prep.packing=wrap stores [BOS] piece [EOS] blocks: data.seq_len must be at least 3, "
                        f"got {d.seq_len}")
    if pr.tokenizer_type == "byte_bpe" and not pr.tokenizer and 2 <= d.vocab_size < 257:
        problems.append(f"prep.tokenizer_type=byte_bpe holds 256 byte symbols + <|endoftext|>: data.vocab_size "
                        f"must be at least 257, got {d.vocab_size}")
    for key, value in (("prep.unit_docs", pr.unit_docs), ("prep.tokenizer_sentences", pr.tokenizer_sentences),
                       ("prep.tokenizer_threads", pr.tokenizer_threads), ("prep.image_size", pr.image_size)):
        if value < 1:
            problems.append(f"{key} must be at least 1, got {value}")
    if not 0 <= pr.min_doc_chars <= pr.max_doc_chars:
        problems.append(f"prep.min_doc_chars ({pr.min_doc_chars}) must be in [0, prep.max_doc_chars = {pr.max_doc_chars}]")
    if d.shard_size_mb <= 0:
        problems.append(f"data.shard_size_mb must be positive, got {d.shard_size_mb}")

    if m.tokens_per_position < 1:
        problems.append(f"model.tokens_per_position must be at least 1, got {m.tokens_per_position}")
    elif d.seq_len % m.tokens_per_position:
        problems.append(f"data.seq_len={d.seq_len} is not a multiple of model.tokens_per_position="
                        f"{m.tokens_per_position}: every position must hold whole tokens")
    if m.n_layer < 1:
        problems.append(f"model.n_layer must be at least 1, got {m.n_layer}")
    if m.n_head < 1:
        problems.append(f"model.n_head must be at least 1, got {m.n_head}")
    elif m.d_model < 1 or m.d_model % m.n_head != 0:
        problems.append(f"model.d_model ({m.d_model}) must be a positive multiple of model.n_head ({m.n_head})")
    elif (m.d_model // m.n_head) % 2 != 0:
        problems.append(
            f"model head dim d_model / n_head = {m.d_model // m.n_head} is odd; "
            "RoPE rotates pairs of channels, so it must be even"
        )

    if m.objective == "ar":
        if p.num_subtokens != 1:
            problems.append(f"model.objective=ar predicts whole tokens left to right: it needs prime.num_subtokens=1, "
                            f"got {p.num_subtokens}")
        if m.tokens_per_position != 1:
            problems.append("model.objective=ar needs model.tokens_per_position=1: with several tokens per position "
                            "a causal model would see the later channels of a pixel before predicting them")
        if m.time_conditioning:
            problems.append("model.objective=ar has no masking rate to condition on: set model.time_conditioning=false")
    if p.shuffle_tokens and p.num_subtokens == 1:
        problems.append("prime.shuffle_tokens needs prime.num_subtokens > 1: with l = 1 a permutation of token ids "
                        "only renames the logits and changes nothing")
    if diff.schedule == "genmd4" and diff.eval_estimator == "count" and m.objective == "diffusion":
        problems.append("diffusion.schedule=genmd4 masks each sub-token at a rate of its own value, but "
                        "diffusion.eval_estimator=count assumes one rate for all: set diffusion.eval_estimator=continuous")
    if diff.loss == "token_joint" and m.objective == "ar":
        problems.append("diffusion.loss=token_joint is a masked-diffusion loss; model.objective=ar trains on its exact "
                        "NLL: set diffusion.loss=nelbo")
    elif diff.loss == "token_joint" and diff.schedule == "genmd4":
        problems.append("diffusion.loss=token_joint is defined for one masking rate per token (the MDM-Prime code's "
                        "loss); the genmd4 schedule masks each digit at a rate of its own: set diffusion.loss=nelbo")
    if diff.schedule_power <= 0:
        problems.append(f"diffusion.schedule_power must be positive, got {diff.schedule_power}")
    if diff.schedule_eps != 0:
        problems.append(
            f"diffusion.schedule_eps must be 0, got {diff.schedule_eps}: with eps > 0 the loglinear schedule "
            "leaves alpha(1) = eps > 0, so some sub-tokens are never masked and the NELBO misses the cost of "
            "generating them (MDLM's eps only guards sigma(t) numerically, which this implementation does not need)"
        )

    for key, value in (
        ("train.batch_size", t.batch_size),
        ("train.steps", t.steps),
        ("sample.steps", s.steps),
        ("eval.repeats", e.repeats),
    ):
        if value < 1:
            problems.append(f"{key} must be at least 1, got {value}")
    en, ck = cfg.engine, cfg.ckpt
    if en.zero_stage not in (0, 1, 2, 3):
        problems.append(f"engine.zero_stage must be 0, 1, 2 or 3, got {en.zero_stage}")
    for key, value in (("engine.micro_batch_size", en.micro_batch_size), ("engine.num_workers", en.num_workers),
                       ("engine.max_dropped_batches", en.max_dropped_batches), ("engine.peak_tflops", en.peak_tflops),
                       ("train.warmup_steps", t.warmup_steps), ("eval.fid_samples", e.fid_samples),
                       ("eval.batch_size", e.batch_size),
                       ("sample.corrector_steps", s.corrector_steps)):
        if value < 0:
            problems.append(f"{key} must be non-negative, got {value}")
    for key in _every_fields():  # train.log_every, ckpt.every_steps, ...: one meaning for all of them
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value < 0:
            problems.append(f"{key} must be non-negative (0 = never), got {value}")
    for key, value in (("engine.loss_chunk_mb", en.loss_chunk_mb), ("eval.memory_mb", e.memory_mb),
                       ("engine.collective_timeout_minutes", en.collective_timeout_minutes),
                       ("ckpt.lock_stale_minutes", ck.lock_stale_minutes)):
        if not value > 0:
            problems.append(f"{key} must be positive, got {value}")
    if not 0.0 <= en.ema_decay < 1.0:
        problems.append(f"engine.ema_decay must be in [0, 1), got {en.ema_decay}")
    if en.nan_policy == "drop_batch" and en.zero_stage == 3:
        problems.append("engine.nan_policy=drop_batch needs ZeRO stage 0-2 (under ZeRO-3 a rank holds no whole "
                        "parameter to build the zero gradient from); use nan_policy=stop")
    if en.shuffle_shards < 1:
        problems.append(f"engine.shuffle_shards must be at least 1, got {en.shuffle_shards}")
    if en.shard_chunks < 1:
        problems.append(f"engine.shard_chunks must be at least 1 (1 = whole shards), got {en.shard_chunks}")
    if ck.keep_last < 1:
        problems.append(f"ckpt.keep_last must be at least 1 (the checkpoint to resume from), got {ck.keep_last}")
    if t.lr <= 0:
        problems.append(f"train.lr must be positive, got {t.lr}")
    if t.min_lr < 0:
        problems.append(f"train.min_lr must be non-negative, got {t.min_lr}")
    if not 0 <= s.prompt_len < d.seq_len:
        problems.append(
            f"sample.prompt_len must be in [0, data.seq_len) = [0, {d.seq_len}) so something is left to generate, "
            f"got {s.prompt_len}"
        )
    for key, value in (("sample.temperature", s.temperature), ("sample.temperature_end", s.temperature_end),
                       ("sample.time_power", s.time_power)):
        if value <= 0:
            problems.append(f"{key} must be positive, got {value}")
    if not 0.0 < s.top_p <= 1.0:
        problems.append(f"sample.top_p must be in (0, 1], got {s.top_p}")
    if not 0.0 <= s.remask_prob < 1.0:
        problems.append(f"sample.remask_prob must be in [0, 1), got {s.remask_prob}")
    elif s.corrector_steps > 0 and s.remask_prob == 0.0:
        problems.append("sample.corrector_steps > 0 needs sample.remask_prob > 0, else every corrector move is a no-op")
    if problems:
        _raise(problems)


def _every_fields() -> list[str]:
    """The dotted keys of every "do this every N" setting (``*_every*`` / ``every_*``): 0 means never."""
    return [key for key in _field_types() if "every" in key.split(".", 1)[1]]


def schedule_problems(t: TrainConfig) -> list[str]:
    """Learning-rate schedules that contradict themselves (optim.learning_rate: linear warmup over
    train.warmup_steps to train.lr, then cosine to train.min_lr at train.steps, or constant). load_config refuses
    them, for the run about to start; ``validate`` does not, so that the saved config of a run already trained
    (checkpoints, exports) still loads. Checked only where train.lr is valid on its own (one wrong value, one
    message)."""
    problems = []
    if t.lr_schedule == "cosine" and t.lr > 0 and t.min_lr > t.lr:
        problems.append(f"train.min_lr={t.min_lr:g} is above train.lr={t.lr:g}: the cosine schedule would climb from "
                        f"train.lr after the warmup up to train.min_lr at the last step instead of decaying; set "
                        f"train.min_lr <= {t.lr:g} (e.g. train.min_lr={t.lr / 10:g}), or train.lr_schedule=constant")
    if t.steps >= 1 and t.warmup_steps > t.steps:
        problems.append(f"train.warmup_steps={t.warmup_steps} is more than train.steps={t.steps}: the run would end "
                        f"before the learning rate reaches train.lr; set train.warmup_steps <= {t.steps} (e.g. "
                        f"train.warmup_steps={max(1, t.steps // 10)})")
    return problems


def _raise(problems: list[str]) -> typing.NoReturn:
    if len(problems) == 1:
        raise ConfigError(problems[0])
    raise ConfigError(f"{len(problems)} config problems:\n" + "\n".join(f"- {x}" for x in problems))


# --------------------------------------------------------------------------------------------------
# Help text: the schema's own comments.

@functools.cache
def key_help() -> dict[str, str]:
    """Every settable key ("train.steps") mapped to the comment that documents it in this file, read from the
    section classes' source: a comment on the lines just above a field, or after it on its line, continued on the
    following comment-only lines whose text is indented past the ``#`` (as ``prep.val_select``'s is). The command
    lines' ``--help`` lists these, so the schema is documented in one place."""
    import inspect

    out: dict[str, str] = {}
    for section, cls in _section_types().items():
        fields = typing.get_type_hints(cls)
        above: list[str] = []
        last = None
        for line in inspect.getsource(cls).splitlines()[1:]:
            text = line.strip()
            if text.startswith("#"):
                body = text[1:]
                if last is not None and body.startswith("  "):  # the continuation of the field's own comment
                    out[last] = f"{out[last]} {body.strip()}".strip()
                else:
                    above.append(body.strip())
                    last = None
                continue
            match = re.match(r"(\w+)\s*:[^=]*=[^#]*?(?:#\s*(.*))?$", text)
            if not match or match.group(1) not in fields:
                above, last = ([] if text and not text.startswith(('"""', "'''")) else above), None
                continue
            last = f"{section}.{match.group(1)}"
            out[last] = " ".join([*above, match.group(2) or ""]).strip()
            above = []
    return out
