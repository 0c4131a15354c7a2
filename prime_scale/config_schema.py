"""The run configuration's schema: the typed section dataclasses and ``Config``, whose field comments are the keys'
documentation (``key_help``, which every command's ``--help`` prints), ``ConfigError``, the key tables
(``section_types``, ``field_types``) and ``closest``, the did-you-mean rule of every misspelled key or name.

It imports nothing of the project, so the numerical core (codec, schedules, sampler, diffusion) imports its
sections and ConfigError from here: the config package (prime_scale.config: loading, rules) imports the core for
its checks, so the core cannot import the package. Everything else imports these names from prime_scale.config."""

from __future__ import annotations

import difflib
import functools
import re
import typing
from dataclasses import dataclass, field

# The names the numerical core implements, declared with the fields that choose among them (diffusion.schedule,
# sample.time_schedule, sample.temperature_schedule): prime_scale/schedules.py and sampler.py dispatch on them and
# the config rules accept only them.
SCHEDULES = ("linear", "cosine", "polynomial", "loglinear", "genmd4")
TIME_SCHEDULES = ("uniform", "cosine", "power")
TEMPERATURE_SCHEDULES = ("constant", "linear")

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


class ConfigError(ValueError):
    """A config file, override or value that cannot make a valid run."""


@functools.cache
def section_types() -> dict[str, type]:
    """Every section name ("train") mapped to its dataclass."""
    return typing.get_type_hints(Config)


@functools.cache
def field_types() -> dict[str, type]:
    """Every settable key, dotted ("train.steps"), mapped to its Python type."""
    out = {}
    for section, cls in section_types().items():
        for name, tp in typing.get_type_hints(cls).items():
            out[f"{section}.{name}"] = tp
    return out


def closest(word: str, options: typing.Iterable[str]) -> str | None:
    """The option a misspelled ``word`` most likely meant, or None when none is close: the did-you-mean of config
    keys and names, and of the tools' keys and choices (prime_scale.cli)."""
    matches = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return matches[0] if matches else None


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
    for section, cls in section_types().items():
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
