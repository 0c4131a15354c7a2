"""Validation NELBO per token (nats), its Monte Carlo standard error, perplexity = exp(NELBO per token), and
bits per dimension = NELBO per token / ln 2 (the image literature's unit: a token is one pixel channel).
For the AR baseline the same numbers are its exact NLL (estimator 'exact'; the error is then the data's only)."""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist

from prime_scale.cli import EXIT_OK, Key, UsageError, guarded, keys_help, parse_keys, text_table, wants_help
from prime_scale.config import Config
from prime_scale.objective import has_token_joint, schedule_of, sequence_loss, unwrap
from prime_scale.schedules import robust_time_power


def draws_per_sequence(cfg: Config) -> int:
    """NELBO draws averaged per validation sequence: cfg.eval.repeats, or 1 for the AR model (its NLL is exact)."""
    return 1 if cfg.model.objective == "ar" else cfg.eval.repeats


def eval_batch(model, cfg: Config) -> int:
    """Sequences per forward pass: cfg.eval.batch_size, or (0) the largest batch whose activations, logits and
    loss-head temporaries fit cfg.eval.memory_mb on the model's device, in its weights' dtype
    (``memory.eval_batch_size``). The same on every rank."""
    from prime_scale.memory import eval_batch_size, placement

    return eval_batch_size(cfg, *placement(model))


@dataclass
class EvalResult:
    nelbo_per_token: float  # nats per token (never per sub-token)
    stderr: float  # Monte Carlo standard error of nelbo_per_token
    ppl: float  # exp(nelbo_per_token)
    bits_per_dim: float  # nelbo_per_token / ln 2: for images every token (a pixel channel) is one dimension
    sequences: int
    tokens: int
    estimator: str
    # The withdrawn MDM-Prime objective on the same draws (objective.has_token_joint; None for AR and GenMD4): the
    # joint of each token's masked digits instead of their marginals. NOT a bound on -log p(x): never a PPL.
    token_joint_not_a_bound: Optional[float] = None
    token_joint_stderr: Optional[float] = None
    # GenMD4 only (None for the other families): the smallest learned exponent of a digit value a valid code has,
    # and the time power p of the draws t = u ** p it decided (schedules.robust_time_power; 1 = plain draws)
    min_exponent: Optional[float] = None
    time_power: Optional[float] = None

    def as_dict(self) -> dict:
        return asdict(self)


def _ratio(sx: float, sxx: float, sxt: float, st: float, stt: float, count: float) -> tuple[float, float]:
    """Total x / total t over sequences, and the ratio estimator's standard error (delta method: the residual
    r = x - value * t has mean 0 by construction), from the sums of x, x^2, x t, t, t^2 and the count."""
    value = sx / st
    residual_ss = sxx - 2 * value * sxt + value * value * stt
    return value, math.sqrt(max(residual_ss, 0.0) / (count - 1)) / math.sqrt(count) / (st / count)


@torch.no_grad()
def evaluate_nelbo(model, sequences: torch.Tensor, cfg: Config, seed: int = 0, rank: int = 0,
                   world_size: int = 1) -> EvalResult:
    """Average ``cfg.eval.repeats`` independent NELBO draws per sequence, then total nats / total tokens.

    ``model`` is the network or a DeepSpeed engine (called the same way). With several ranks each scores every
    world_size-th sequence and the sums are all-reduced; every rank runs the same number of forward passes (the
    short ones score a padding sequence with weight 0), which ZeRO-3's collective parameter gathering needs.
    The standard error treats sequences as the independent units (the per-sequence estimates include both the
    data's and the estimator's randomness). Where ``objective.has_token_joint``, the same draws are also scored
    with the withdrawn token_joint objective (``EvalResult.token_joint_not_a_bound``), at no extra forward pass.
    GenMD4 draws t = u ** p with p = ``robust_time_power`` of the model's smallest exponent, reweighted so the
    NELBO is the same but its variance finite (the plain draws' is infinite once an exponent is <= 1); both
    numbers are in the result (``min_exponent``, ``time_power``)."""
    if cfg.eval.max_sequences:
        sequences = sequences[: cfg.eval.max_sequences]
    n = len(sequences)
    if n < 2:
        raise ValueError("need at least 2 validation sequences to estimate a standard error")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + rank)
    was_training = model.training
    model.eval()
    per_rank = -(-n // world_size)
    index = torch.arange(per_rank) * world_size + rank
    weight = (index < n).double()
    index = torch.where(index < n, index, torch.zeros_like(index))
    # sums of x (NELBO), t (tokens), x^2, x t, t^2, the count of sequences, y (token_joint), y^2, y t
    stats = torch.zeros(9, dtype=torch.float64)
    repeats = draws_per_sequence(cfg)
    estimator = "exact" if cfg.model.objective == "ar" else cfg.diffusion.eval_estimator
    joint = has_token_joint(cfg)
    batch_size = eval_batch(model, cfg)
    min_exponent = time_power = None
    if cfg.model.objective == "diffusion" and cfg.diffusion.schedule == "genmd4":  # the same on every rank
        min_exponent = schedule_of(model, cfg).smallest_exponent(unwrap(model).codec)
        time_power = robust_time_power(min_exponent)
    for start in range(0, per_rank, batch_size):
        rows = index[start : start + batch_size]
        w = weight[start : start + batch_size]
        batch = sequences[rows].to(device)
        draws = [sequence_loss(model, batch, cfg, generator, cfg.diffusion.eval_estimator, token_joint=joint,
                               time_power=time_power or 1.0) for _ in range(repeats)]
        x = torch.stack([d.per_sequence for d in draws]).double().mean(0).cpu()
        t = draws[0].tokens.double().cpu()
        y = torch.stack([d.token_joint for d in draws]).double().mean(0).cpu() if joint else torch.zeros_like(x)
        stats += torch.stack([(w * x).sum(), (w * t).sum(), (w * x * x).sum(), (w * x * t).sum(),
                              (w * t * t).sum(), w.sum(), (w * y).sum(), (w * y * y).sum(), (w * y * t).sum()])
    model.train(was_training)
    if world_size > 1:
        stats = stats.to(device)
        dist.all_reduce(stats)
        stats = stats.cpu()
    sx, st, sxx, sxt, stt, count, sy, syy, syt = stats.tolist()
    value, stderr = _ratio(sx, sxx, sxt, st, stt, count)
    token_joint, token_joint_stderr = _ratio(sy, syy, syt, st, stt, count) if joint else (None, None)
    return EvalResult(value, stderr, math.exp(value), value / math.log(2), int(count), int(st), estimator,
                      token_joint, token_joint_stderr, min_exponent=min_exponent, time_power=time_power)


# ================================================================================================================
# The evaluation CLI (docs/evaluation.md)

SYNOPSIS = """\
python -m prime_scale.evaluate models=DIR[,DIR...] [data=URL] [split=val] [max_sequences=N] [repeats=R]
    [batch_size=B] [zero_shot=mdlm|SET,...|PATH_OR_GLOB] [text_field=text] [gen_samples=N] [gen_steps=S]
    [scorer=EXPORT_DIR | scorer=hf:LOCAL_PATH] [seed=K] [device=auto|cpu|cuda] [out=FILE.json]"""
KEYS = (
    Key("models", "export folders (python -m prime_scale.export), run folders holding export/, or checkpoint URLs "
        "(exported to a temporary folder), comma-separated; NAME=DIR labels a row", required=True),
    Key("data", "prepared shards to score (default: each model's own data.path)"),
    Key("split", "the split of data scored", "val"),
    Key("max_sequences", "sequences scored (0 = all; otherwise at least 2, for a standard error)", 512, int,
        minimum=0),
    Key("repeats", "NELBO draws per sequence (AR: exact, 1)", 4, int, minimum=1),
    Key("batch_size", "sequences per forward pass and per sampling batch (default: each model's eval.batch_size; "
        "0 = the largest batch that fits its eval.memory_mb, prime_scale.memory)", type=int, minimum=0),
    Key("zero_shot", "named test sets: mdlm (MDLM's seven: ptb, wikitext2, lm1b, lambada, ag_news, pubmed, arxiv) "
        "or a comma list of them, each read offline from a datasets.save_to_disk copy (SET=DIR, mdlm=ROOT holding "
        "ROOT/SET, $PRIME_ZERO_SHOT_DIR/SET) or the HF cache, one result per set; any other item is local text "
        "(files, folders, globs of .txt/.jsonl/.json/.parquet[.gz|.zst]; ./NAME for a file named like a set), one "
        "result. Through each model's tokenizer, packed like its training data (concat or wrap; MDLM's numbers: "
        "wrap)", ""),
    Key("text_field", "the text key of local .jsonl/.json/.parquet zero-shot files", "text"),
    Key("gen_samples", "samples per model, drawn twice: float64 and float32 categorical draws (0 = none; otherwise "
        "at least 2)", 0, int, minimum=0),
    Key("gen_steps", "sampling steps (0: each model's sample.steps)", 0, int, minimum=0),
    Key("scorer", "the judge of generative PPL: an AR export of this pipeline, or hf:PATH, a local HuggingFace "
        "causal LM", ""),
    Key("seed", "seed of the NELBO draws and of the samples", 0, int, minimum=0),
    Key("device", "where the models run", "auto", choices=("auto", "cpu", "cuda")),
    Key("out", "write every number to this JSON file", ""),
)
PROG = "python -m prime_scale.evaluate"


def parse_args(argv: list[str]) -> dict:
    """The command line as {key: value}, every key checked (prime_scale.cli)."""
    args = parse_keys(argv, KEYS)
    if not args["models"].strip(", "):
        raise UsageError("models= is required: one or more export folders, comma-separated")
    if args["gen_samples"] == 1:
        raise UsageError("gen_samples must be 0 (no samples) or at least 2")
    if args["max_sequences"] == 1:
        raise UsageError("max_sequences must be 0 (all) or at least 2: a standard error needs 2 sequences")
    return {k: v.strip() if isinstance(v, str) else v for k, v in args.items()}


def _model_specs(value: str) -> list[tuple[str, str]]:
    """models=a,b or models=name=DIR,...: (label, location) pairs, labels unique."""
    specs = []
    for item in [x.strip() for x in value.split(",") if x.strip()]:
        label, sep, where = item.partition("=")
        if not sep or "/" in label or ":" in label:
            label, where = _default_label(item), item
        specs.append((label.strip(), where.strip()))
    labels = [s[0] for s in specs]
    for i, label in enumerate(labels):  # two runs named alike: keep both, distinguished
        if labels.count(label) > 1:
            labels[i] = f"{label}#{labels[: i + 1].count(label)}"
    return list(zip(labels, (s[1] for s in specs)))


def _default_label(location: str) -> str:
    """The run's name: runs/NAME/export, runs/NAME/checkpoints[/step_...] -> NAME; else the last path part."""
    import posixpath

    parts = [p for p in location.rstrip("/").split("/") if p]
    while len(parts) > 1 and (parts[-1] in ("export", "checkpoints") or parts[-1].startswith("step_")):
        parts.pop()
    return posixpath.basename(parts[-1]) if parts else location


def _load_export(location: str, device: str, tmp_root: str):
    """An export folder, a run folder (holding export/ or checkpoints/), or a checkpoint URL (exported into a
    folder under ``tmp_root``), loaded as a Pretrained."""
    import tempfile

    from prime_scale.checkpoint import CheckpointError
    from prime_scale.export import export_folder, from_pretrained
    from prime_scale.text_metrics import EvalError

    try:
        folder = export_folder(location, tempfile.mkdtemp(dir=tmp_root))
    except CheckpointError as e:
        raise EvalError(f"{location!r} is neither an export folder (model.safetensors + config.yaml), a run folder "
                        f"with export/ or checkpoints/, nor a checkpoint: {e}") from None
    return from_pretrained(str(folder), device)


def family(cfg: Config) -> str:
    if cfg.model.objective == "ar":
        return "AR"
    if cfg.diffusion.schedule == "genmd4":
        return "GenMD4" + ("-Prime" if cfg.prime.num_subtokens > 1 else "")
    return "MDM-Prime" if cfg.prime.num_subtokens > 1 else "MDM"


def check_data(pretrained, manifest: dict, url: str, split: str) -> None:
    """Refuse shards whose samples do not mean what the model's training data meant: another kind, vocabulary,
    block length, packing or tokenizer (prime_scale.data.manifest.dataset_problems, with the export's dataset.json
    as the reference). Nothing is cut or joined to make a split fit a model."""
    from prime_scale.data.manifest import DatasetManifest, ManifestError, dataset_problems
    from prime_scale.text_metrics import EvalError

    try:
        data = DatasetManifest.from_json(manifest, f"{url}/manifest.json")
    except ManifestError as e:
        raise EvalError(str(e)) from None
    own = pretrained.dataset or None
    if own is None:
        print(f"[evaluate] note: the export has no dataset.json; its tokenizer cannot be compared with {url}'s",
              file=sys.stderr)
    problems = dataset_problems(data, pretrained.config, url, (split,), own)
    if problems:
        raise EvalError("\n  ".join(["the data cannot be scored by this model:", *problems]))


def load_sequences(url: str, split: str, seq_len: int, vocab_size: int, limit: int = 0) -> torch.Tensor:
    """The first ``limit`` sequences of a split (0 = all; only those are read) as int64 blocks of ``seq_len``
    tokens; another length or a token id >= ``vocab_size`` is an EvalError."""
    from prime_scale.data.shards import read_blocks
    from prime_scale.text_metrics import EvalError

    try:
        return torch.from_numpy(read_blocks(url, split, seq_len, vocab_size, limit)).long()
    except ValueError as e:
        raise EvalError(str(e)) from None


def _eval_cfg(cfg: Config, args: dict) -> Config:
    from dataclasses import replace

    batch = cfg.eval.batch_size if args["batch_size"] is None else args["batch_size"]
    return replace(cfg, eval=replace(cfg.eval, max_sequences=args["max_sequences"], repeats=args["repeats"],
                                     batch_size=batch))


def _scored(model, sequences: torch.Tensor, cfg: Config, seed: int, desc: str, progress: bool) -> EvalResult:
    """evaluate_nelbo with a progress bar that ticks on every forward pass of the network."""
    from tqdm.auto import tqdm

    n = min(len(sequences), cfg.eval.max_sequences or len(sequences))
    bar = tqdm(total=-(-n // eval_batch(model, cfg)) * draws_per_sequence(cfg), desc=desc, unit="batch", disable=not progress,
               leave=False)
    handle = model.register_forward_hook(lambda *_: bar.update(1))
    try:
        return evaluate_nelbo(model, sequences, cfg, seed=seed)
    finally:
        handle.remove()
        bar.close()


def _fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}" if abs(x) < 1e5 else f"{x:.3g}"


def format_zero_shot_table(rows: list[dict]) -> str:
    """The named zero-shot sets (zero_shot=mdlm, ...): one line per model and set, in the order asked, with the
    NELBO per token ± se and its PPL, the withdrawn objective's token_joint_not_a_bound (nats, never a PPL), the
    set's documents, text tokens, whole blocks and the blocks scored; a set too short for the model's seq_len is
    shown as empty, with the reason. '' when no set was asked for."""
    header = ["model", "set", "split", "docs", "tokens", "blocks", "scored", "packing", "NELBO ± se", "PPL",
              "token_joint_not_a_bound", "note"]
    lines = []
    for r in rows:
        for name, z in (r.get("zero_shot_sets") or {}).items():
            scored = z["status"] == "scored"
            lines.append([
                r["name"], name, z["split"], str(z["documents"]), str(z["text_tokens"]), str(z["blocks"]),
                str(z["sequences"]), z["packing"],
                f"{z['nelbo_per_token']:.4f} ± {z['stderr']:.4f}" if scored else "-",
                _fmt(z["ppl"]) if scored else "-", _fmt(z.get("token_joint_not_a_bound"), 4),
                ("" if z["packing"] == "wrap" else "concat: not MDLM's protocol") if scored
                else f"empty: {z['reason']}",
            ])
    return text_table(header, lines, set(range(3, 7)) | {8, 9, 10}) if lines else ""


def format_table(rows: list[dict]) -> str:
    """The report as a fixed-width table, one row per model, followed by the named zero-shot sets' table when
    there are any (``format_zero_shot_table``)."""
    header = ["model", "family", "l", "schedule", "val NELBO ± se", "PPL", "bits/dim", "token_joint_not_a_bound",
              "0-shot PPL", "genPPL f64", "H f64", "genPPL f32", "H f32", "H val", "NFE", "idle %"]
    lines = []
    for r in rows:
        v, z, g = r["val"], r.get("zero_shot") or {}, r.get("gen") or {}
        f64, f32 = g.get("float64") or {}, g.get("float32") or {}
        lines.append([
            r["name"], r["family"], str(r["l"]), r["schedule"],
            f"{v['nelbo_per_token']:.4f} ± {v['stderr']:.4f}", _fmt(v["ppl"]), _fmt(v["bits_per_dim"], 4),
            _fmt(v.get("token_joint_not_a_bound"), 4), _fmt(z.get("ppl")), _fmt(f64.get("gen_ppl")),
            _fmt(f64.get("entropy"), 3), _fmt(f32.get("gen_ppl")), _fmt(f32.get("entropy"), 3), _fmt(g.get("val_entropy"), 3), _fmt(f64.get("nfe"), 1),
            _fmt(100 * f64["idle_ratio"] if f64.get("idle_ratio") is not None else None, 1),
        ])
    table = text_table(header, lines, set(range(4, len(header))) | {2})
    sets = format_zero_shot_table(rows)
    return f"{table}\n\nzero-shot sets:\n{sets}" if sets else table


LEGEND = """\
val NELBO: nats/token on the shards (AR: exact NLL), ± its standard error; PPL = exp(NELBO); bits/dim = NELBO/ln 2.
token_joint_not_a_bound: the same draws scored with the withdrawn MDM-Prime objective (each token's masked digits
jointly); NOT an upper bound on -log p(x), below the NELBO for l > 1 by the digits' dependence: never a perplexity.
0-shot PPL: the same on the zero_shot local text, through each model's tokenizer. Named sets (zero_shot=mdlm): the
NELBO ± se and PPL of each set, packed like the model's data; MDLM's zero-shot protocol is wrap packing (GPT-2
tokens, seq_len 1024), and only such rows compare with its table; "scored" is capped by max_sequences (0 = all,
as MDLM). genPPL: exp(mean NLL per scorer token) of the samples under the scorer, with float64 and float32
categorical draws; H: mean unigram entropy of a sample (nats), H val: the same of real sequences of the same length.
NFE: network evaluations per sample (float64); idle %: the mean share of the sampler's steps at which a sample did
not change (float64; AR: 0), docs/sampling.md."""


def run_evaluation(args: dict) -> dict:
    """Everything the command line asks for, checked before any model is run; returns the report."""
    import shutil
    import tempfile

    from prime_scale.data.shards import read_manifest
    from prime_scale.memory import placement, sample_batch_size
    from prime_scale.text_metrics import (ARScorer, EvalError, HFScorer, mean_unigram_entropy, read_documents,
                                          zero_shot_blocks)
    from prime_scale.zero_shot import load_sets, parse_zero_shot, set_blocks

    device = args["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise EvalError("device=cuda but no CUDA device is available")
    progress = sys.stderr.isatty()
    say = lambda msg: print(f"[evaluate] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    # named zero-shot sets first: a missing one is reported before any model is loaded (nothing is downloaded)
    request = parse_zero_shot(args["zero_shot"]) if args["zero_shot"] else None
    named_sets = load_sets(request) if request is not None and request.sets else []
    tmp_root = tempfile.mkdtemp(prefix="prime_eval_")
    try:
        # ---- load and check everything first
        models = []
        for label, where in _model_specs(args["models"]):
            models.append((label, where, _load_export(where, device, tmp_root)))
        scorer = None
        if args["scorer"]:
            if args["scorer"].startswith("hf:"):
                scorer = HFScorer(args["scorer"][3:], device, **({"batch_size": max(1, args["batch_size"] // 8)}
                                                                 if args["batch_size"] else {}))
            else:
                judge = _load_export(args["scorer"], device, tmp_root)
                scorer = ARScorer(judge, _default_label(args["scorer"]),
                                  batch_size=eval_batch(judge.model, _eval_cfg(judge.config, args)))
        if args["gen_samples"] and scorer is not None:
            for label, _, pretrained in models:
                try:
                    scorer.check(pretrained)
                except EvalError as e:
                    raise EvalError(f"{label}: {e}") from None
        data = {}
        for label, _, pretrained in models:
            url = args["data"] or pretrained.config.data.path
            try:
                manifest = read_manifest(url)
            except FileNotFoundError:
                raise EvalError(f"{label}: no prepared shards at {url!r} (manifest.json missing); pass data=URL"
                                ) from None
            try:
                check_data(pretrained, manifest, url, args["split"])
            except EvalError as e:
                raise EvalError(f"{label}: {e}") from None
            cfg = pretrained.config
            key = (url, cfg.data.seq_len, cfg.data.vocab_size)
            if key not in data:
                try:
                    data[key] = load_sequences(url, args["split"], cfg.data.seq_len, cfg.data.vocab_size,
                                               args["max_sequences"])
                except (FileNotFoundError, ValueError) as e:
                    raise EvalError(f"{label}: {e}") from None
        if args["gen_samples"] and scorer is None:
            say("note: no scorer= given: the samples get their unigram entropy and NFE, no generative PPL")
        zero_shot, zero_shot_sets, streams = {}, {}, {}
        if request is not None and request.local:
            docs = read_documents(request.local, text_field=args["text_field"])
            for label, _, pretrained in models:
                try:
                    zero_shot[label] = zero_shot_blocks(pretrained, docs)
                except EvalError as e:
                    raise EvalError(f"{label}: {e}") from None
        for label, _, pretrained in models:  # each named set through each model's tokenizer and packing
            try:
                zero_shot_sets[label] = [set_blocks(pretrained, loaded, streams, args["max_sequences"])
                                         for loaded in named_sets]
            except EvalError as e:
                raise EvalError(f"{label}: {e}") from None

        # ---- measure
        rows = []
        for label, where, pretrained in models:
            cfg = _eval_cfg(pretrained.config, args)
            url = args["data"] or cfg.data.path
            seqs = data[(url, cfg.data.seq_len, cfg.data.vocab_size)]
            say(f"{label}: validation {'NLL' if cfg.model.objective == 'ar' else 'NELBO'} on {url} ({args['split']})")
            val = _scored(pretrained.model, seqs, cfg, args["seed"], f"{label} val", progress)
            row = {"name": label, "path": where, "family": family(cfg), "objective": cfg.model.objective,
                   "l": cfg.prime.num_subtokens, "schedule": "-" if cfg.model.objective == "ar" else
                   cfg.diffusion.schedule, "parameters": pretrained.model.num_params(),
                   "step": pretrained.info.get("step"), "weights": pretrained.info.get("weights"),
                   "seq_len": cfg.data.seq_len, "vocab_size": cfg.data.vocab_size,
                   "val": {**val.as_dict(), "data": url, "split": args["split"],
                           "repeats": draws_per_sequence(cfg)}}
            if label in zero_shot:
                blocks, facts = zero_shot[label]
                say(f"{label}: zero-shot on {facts['blocks']} blocks of {cfg.data.seq_len} tokens "
                    f"({facts['documents']} documents)")
                zs = _scored(pretrained.model, blocks, cfg, args["seed"], f"{label} zero-shot", progress)
                row["zero_shot"] = {**zs.as_dict(), **facts, "input": request.local}
            if zero_shot_sets.get(label):
                row["zero_shot_sets"] = {}
                for blocks, facts in zero_shot_sets[label]:
                    name = facts["set"]
                    if blocks is None:
                        say(f"{label}: zero-shot {name}: too short, not scored: {facts['reason']}")
                        row["zero_shot_sets"][name] = {"nelbo_per_token": None, "stderr": None, "ppl": None,
                                                       "sequences": 0, "tokens": 0, **facts}
                        continue
                    say(f"{label}: zero-shot {name} ({facts['source']}): {facts['blocks']} blocks of "
                        f"{cfg.data.seq_len} tokens, {facts['packing']} ({facts['documents']} documents)")
                    zs = _scored(pretrained.model, blocks, cfg, args["seed"], f"{label} {name}", progress)
                    row["zero_shot_sets"][name] = {**zs.as_dict(), **facts}
            if args["gen_samples"]:
                from prime_scale.text_metrics import draw

                n_ref = len(seqs) if not cfg.eval.max_sequences else min(len(seqs), cfg.eval.max_sequences)
                gen = {"samples": args["gen_samples"], "val_entropy": mean_unigram_entropy(seqs[:n_ref]),
                       "val_entropy_sequences": n_ref}
                for precision in ("float64", "float32"):
                    say(f"{label}: {args['gen_samples']} samples, {precision} draws")
                    stats = draw(pretrained, args["gen_samples"], args["seed"], precision == "float64",
                                 args["gen_steps"] or None,
                                 batch_size=sample_batch_size(cfg, *placement(pretrained.model)),
                                 progress=progress)
                    if scorer is not None:
                        stats.gen = scorer.score(pretrained, stats.tokens, progress=progress)
                    if pretrained.tokenizer is not None:
                        stats.examples = [t[:300] for t in pretrained.detokenize(stats.tokens[:2])]
                    gen[precision] = stats.as_dict()
                row["gen"] = gen
            rows.append(row)
        return {"models": rows, "scorer": scorer.describe() if scorer is not None else None,
                "args": dict(args), "device": device, "legend": LEGEND}
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Exit status 0: the table printed; 2: a usage error, or a model, data set or scorer that cannot be evaluated
    as asked (found before any model runs)."""
    import json
    from pathlib import Path

    from prime_scale.checkpoint import CheckpointError
    from prime_scale.data.errors import DataPrepError
    from prime_scale.text_metrics import EvalError

    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(f"{__doc__}\n{SYNOPSIS}\n\nKeys:\n{keys_help(KEYS)}")
        return EXIT_OK

    def evaluate() -> int:
        args = parse_args(argv)
        report = run_evaluation(args)
        print(format_table(report["models"]))
        print(LEGEND)
        if args["out"]:
            out = Path(args["out"])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2, default=float) + "\n")
            print(f"[evaluate] wrote {out}", file=sys.stderr)
        return EXIT_OK

    # a bad path, or a model, data set or scorer that cannot be evaluated as asked (TokenizerError is a
    # DataPrepError); anything else is a bug and keeps its traceback
    return guarded(evaluate, PROG, usage=(EvalError, DataPrepError, CheckpointError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
