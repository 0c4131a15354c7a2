"""The rules a config must follow to make a sound run: each field's type, the names a key accepts, ranges, and
the combinations that contradict themselves (``validate``), plus the learning-rate schedule's own consistency
(``schedule_problems``), which only the run about to start is held to. The numerical core's names are declared in
the schema with their fields; the codec's base arithmetic is prime_scale.radix's."""

from __future__ import annotations

import typing

from prime_scale.config_schema import (
    SCHEDULES, TEMPERATURE_SCHEDULES, TIME_SCHEDULES, Config, ConfigError, TrainConfig, closest, field_types,
)
from prime_scale.radix import resolve_base

# The names each key accepts (the numerical core's, declared in the schema with their fields).
VALID_NAMES: dict[str, tuple[str, ...]] = {
    "data.source": ("markov", "digits", "shards"),
    "prep.txt_document": ("file", "line", "paragraph"),
    "prep.tokenizer_type": ("bpe", "unigram", "byte_bpe"),
    "prep.packing": ("concat", "wrap"),
    "prep.val_select": ("hash", "last"),
    "model.merge": ("sum", "mlp"),
    "model.objective": ("diffusion", "ar"),
    "diffusion.schedule": SCHEDULES,
    "diffusion.time_sampling": ("antithetic", "uniform"),
    "diffusion.eval_estimator": ("count", "continuous"),
    "diffusion.loss": ("nelbo", "token_joint"),
    "train.lr_schedule": ("cosine", "constant"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.dtype": ("float32", "bfloat16"),
    "engine.nan_policy": ("stop", "drop_batch"),
    "log.wandb": ("offline", "online", "disabled"),
    "eval.fid_features": ("inception", "standin"),
    "sample.time_schedule": TIME_SCHEDULES,
    "sample.temperature_schedule": TEMPERATURE_SCHEDULES,
}


def _check_field_types(cfg: Config) -> list[str]:
    problems = []
    for key, tp in field_types().items():
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
        raise_problems(problems)
    d, m, p, diff, t, e, s = cfg.data, cfg.model, cfg.prime, cfg.diffusion, cfg.train, cfg.eval, cfg.sample

    for key, valid in VALID_NAMES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in valid:
            best = closest(value, valid)
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
    for key in every_fields():  # train.log_every, ckpt.every_steps, ...: one meaning for all of them
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
        raise_problems(problems)


def every_fields() -> list[str]:
    """The dotted keys of every "do this every N" setting (``*_every*`` / ``every_*``): 0 means never."""
    return [key for key in field_types() if "every" in key.split(".", 1)[1]]


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


def raise_problems(problems: list[str]) -> typing.NoReturn:
    """One ConfigError for every problem found: the problem itself, or a numbered count and a bulleted list."""
    if len(problems) == 1:
        raise ConfigError(problems[0])
    raise ConfigError(f"{len(problems)} config problems:\n" + "\n".join(f"- {x}" for x in problems))

