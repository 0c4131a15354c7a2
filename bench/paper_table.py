"""The families compared at CPU scale over several training seeds, every one scored by the same valid NELBO.

    python bench/paper_table.py [--seeds 3] [--steps 600] [--families mdm,prime2,...] [--out runs/paper_table]
                                [--threads 1] [--json PATH] [--train-only | --score-only]

Families (``--families``, default all, in this order: the comparisons with MDM that matter most first, so that a
run cut short has them; GenMD4 last, its config and evaluation being the newest):

    mdm           text_mdm                                   MDM, l = 1
    prime2        text_prime2                                MDM-Prime, l = 2 (b = 32), trained on the NELBO
    prime2_joint  text_prime2 + diffusion.loss=token_joint   l = 2 trained on the withdrawn code's token joint
    prime4        text_prime4                                MDM-Prime, l = 4 (b = 6), trained on the NELBO
    prime2_mlp    text_prime2 + model.merge=mlp              l = 2, sub-token embeddings merged by an MLP
    ar            text_ar                                    the autoregressive baseline (exact NLL)
    genmd4        text_genmd4                                GenMD4, l = 1, learned masking exponents

All use prime_scale/configs/text_demo.yaml's data (Debian's Python docs, vocabulary 1024), network (4 layers x 128), batch
(32 x 128 tokens), learning rate and ``--steps``; the shards are prepared first if missing. Run K of a family
trains with ``train.seed=K`` (K = 0 .. S-1), which sets three things at once (prime_scale.engine): the initial
weights (``torch.manual_seed``), the order of the training batches (prime_scale.data.loader) and the masking
noise of every step (``engine.noise_generator``). Seed K is the same for every family, so the families see the
same batches in the same order, and "paired with MDM" means "same seed index": same data order, same seed of the
initial draw (the weights themselves differ where the shapes do).

Each run has its own folder ``OUT/text_FAMILY_seedK`` and is resumable: a run whose export is of step ``--steps``
is not trained again, one whose final checkpoint exists is only exported, and an interrupted one continues from
its last checkpoint (rerun the same command). Each run is scored as soon as it is trained, and its scores are
kept in its folder (bench_score.json) with the evaluation settings and a hash of the code that made them, so a
rerun scores again only what changed. A run that fails is reported and left out of the table; the others go on.
``--train-only`` stops after training and exporting (score later with the same command); ``--score-only``
trains nothing and makes the table of the runs that are finished (the others are listed as missing), e.g. while
the rest are still training in another process.

Scoring: ``evaluate_nelbo`` on the same validation sequences (the first ``--max-sequences``), with the same
number of draws and the same evaluation seed for every run. That NELBO scores every masked digit by its
carry-over marginal: a valid upper bound on -log p(x) per token for every diffusion family, and for the AR model
its exact NLL. For the diffusion families with l > 1 the same draws also give ``token_joint``, the score of the
MDM-Prime paper's code (each token by the joint of its masked digits), which is NOT a bound (at the exact
posterior, for l = 2, it is H - I(digit 1; digit 2) / 2): its column is there to show by how much it reads below
the bound, never as a model's quality. The MDM-Prime authors withdrew the paper's perplexities (May 2026) for
this reason; nothing here is expected to reproduce them.

Printed: per family the mean ± sd over seeds of the NELBO (nats/token) and of the PPL, the paired difference to
MDM with its standard error (sd of the per-seed differences / sqrt(S)), token_joint and the inflation NELBO -
token_joint; then a ``summary:`` line saying which differences the seeds resolve. The JSON (``--json``, default
OUT/paper_table.json) holds every run's full evaluation, the aggregates, the date and the wall time.
Not a timed test: 2-5 min per training on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import fresh_process_env  # noqa: E402
from prime_scale.cli import text_table  # noqa: E402


@dataclass(frozen=True)
class Family:
    """A row of the table: a shipped config plus the overrides that make it this family."""

    label: str
    config: str
    overrides: tuple[str, ...] = ()


FAMILIES = {
    "mdm": Family("MDM (l=1)", "text_mdm", ("diffusion.loss=nelbo",)),
    "prime2": Family("Prime (l=2)", "text_prime2", ("diffusion.loss=nelbo",)),
    "prime2_joint": Family("Prime (l=2) tj", "text_prime2", ("diffusion.loss=token_joint",)),
    "prime4": Family("Prime (l=4)", "text_prime4", ("diffusion.loss=nelbo",)),
    "prime2_mlp": Family("Prime (l=2) mlp", "text_prime2", ("diffusion.loss=nelbo", "model.merge=mlp")),
    "ar": Family("AR", "text_ar"),
    "genmd4": Family("GenMD4 (l=1)", "text_genmd4", ("diffusion.loss=nelbo",)),
}
BASELINE = "mdm"


# ---------------------------------------------------------------------------------------------------- training

class TrainingFailed(RuntimeError):
    pass


def exported_step(run_dir: Path) -> Optional[int]:
    """The training step of the run's export, or None when it has none."""
    info = run_dir / "export" / "export.json"
    return json.loads(info.read_text()).get("step") if info.is_file() else None


def checkpoint_step(run_dir: Path) -> Optional[int]:
    """The step of the run's latest complete checkpoint, or None."""
    from prime_scale.checkpoint import CheckpointStore

    store = CheckpointStore(str(run_dir / "checkpoints"))
    tag = store.latest() if (run_dir / "checkpoints").is_dir() else None
    return store.manifest(tag)["step"] if tag else None


# the engine's own validation at a run's last step, kept small where the table's scores are computed apart
QUICK_CHECK = ("eval.max_sequences=64", "eval.repeats=1")


def train_run(config: str, overrides: tuple[str, ...], out: Path, name: str, steps: int, seed: int,
              threads: int, train: bool = True, evaluation: tuple[str, ...] = QUICK_CHECK) -> dict:
    """Make sure ``out/name`` holds an export of step ``steps`` of ``config`` + ``overrides`` trained with
    ``train.seed=seed``: skip what is done, train (resuming) what is not, in a fresh process each (DeepSpeed
    initialises once per process), the engine validating once, at the last step, with the ``evaluation``
    overrides. Returns {"run_dir", "did": "trained" | "exported" | "nothing", "train_s"}, the training's wall
    seconds kept in the run folder (bench_train.json) so that a resumed table still has them; TrainingFailed with
    the log's tail when the engine fails, or (``train=False``) when the run is not finished."""
    from prime_scale.export import export

    run_dir = out / name
    record = run_dir / "bench_train.json"
    did = "nothing"
    if exported_step(run_dir) != steps:
        did = "exported"
        if checkpoint_step(run_dir) != steps:
            if not train:
                raise TrainingFailed(f"{name}: not finished (no export or checkpoint of step {steps}); not trained "
                                     "here (--score-only)")
            did = "trained"
            from prime_scale.config import load_config

            warmup = load_config([f"config={config}", *overrides]).train.warmup_steps
            short = (f"train.warmup_steps={steps}",) if warmup > steps else ()  # smoke runs of a few steps
            args = [f"config={config}", *overrides, *short, f"train.seed={seed}", f"train.steps={steps}",
                    f"train.eval_every={steps}", f"ckpt.every_steps={steps}", f"run.out_dir={out}",
                    f"run.name={name}", "log.wandb=disabled", f"train.num_threads={threads}", "sample.every_steps=0",
                    *evaluation]
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "prime_scale.engine", *args], cwd=REPO,
                                  env=fresh_process_env(), capture_output=True, text=True)
            wall = time.perf_counter() - start
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "bench_train.log").write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                raise TrainingFailed(f"{name}: the engine exited {proc.returncode}:\n{proc.stderr[-1500:]}")
            record.write_text(json.dumps({"train_s": wall, "threads": threads, "finished": stamp()}))
        export(str(run_dir / "checkpoints"), str(run_dir / "export"))
    train_s = json.loads(record.read_text())["train_s"] if record.is_file() else None
    return {"run_dir": str(run_dir), "did": did, "train_s": train_s}


def run_all(runs: list[tuple[str, int, Callable[[], dict]]], say=print) -> tuple[dict, dict]:
    """Call each (key, seed, make) in turn (train, export, score); a failed training is reported and the others
    go on. Returns the results and the failures, both keyed by (key, seed)."""
    done, failed = {}, {}
    for key, seed, make in runs:
        try:
            done[key, seed] = make()
        except TrainingFailed as e:
            failed[key, seed] = str(e)
            say(f"LEFT OUT {key} seed {seed}: {e}")
    return done, failed


def trained_line(key: str, seed: int, r: dict) -> str:
    took = f" in {r['train_s'] / 60:.1f} min" if r["train_s"] is not None else ""
    return f"  {key} seed {seed}: {'already done' if r['did'] == 'nothing' else r['did']}{took} ({r['run_dir']})"


def code_hash(*modules: str) -> str:
    """SHA-256 (first 16 hex digits) of these repository files: a stored score is reused only while the code that
    computed it is unchanged."""
    import hashlib

    h = hashlib.sha256()
    for name in modules:
        h.update((REPO / name).read_bytes())
    return h.hexdigest()[:16]


def cached(run_dir: str, key: dict, compute: Callable[[], dict]) -> dict:
    """``compute()``, or the result stored in run_dir/bench_score.json under the same ``key`` (evaluation
    settings, export step, code hash); a new result replaces the stored one."""
    path = Path(run_dir) / "bench_score.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["result"]
    result = compute()
    path.write_text(json.dumps({"key": key, "result": result}, indent=1, default=str))
    return result


# ---------------------------------------------------------------------------------------------------- statistics

def mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; nan for one value)."""
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan)


def paired(xs: dict[int, float], ys: dict[int, float]) -> dict:
    """The paired difference x - y over the seeds both have: mean, its standard error (sd of the differences /
    sqrt(n)), the ratio t = mean / se and n. With n seeds t has n - 1 degrees of freedom (3 seeds: |t| > 4.30 for
    a two-sided 95% level), so 2-3 SE is weaker evidence than with a normal reference."""
    seeds = sorted(set(xs) & set(ys))
    diffs = [xs[s] - ys[s] for s in seeds]
    m, sd = mean_sd(diffs)
    se = sd / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    t = m / se if se and math.isfinite(se) and se > 0 else math.nan
    return {"mean": m, "se": se, "t": t, "n": len(diffs), "seeds": seeds, "diffs": diffs}


def fmt(m: float, sd: float, digits: int = 4) -> str:
    if not math.isfinite(m):
        return "-"
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if math.isfinite(sd) else f"{m:.{digits}f}"


def fmt_paired(d: Optional[dict], digits: int = 4) -> str:
    if not d or not math.isfinite(d["mean"]):
        return "-"
    if not math.isfinite(d["se"]):
        return f"{d['mean']:+.{digits}f}"
    return f"{d['mean']:+.{digits}f} ± {d['se']:.{digits}f} ({d['t']:+.1f} SE)"


def resolution(named: dict[str, dict], unit: str = "nats", digits: int = 3) -> str:
    """'resolved (|t| > 3): ...; 2-3 SE: ...; not resolved (< 2 SE): ...' for paired differences by name."""
    groups: dict[str, list[str]] = {"> 3 SE": [], "2-3 SE": [], "< 2 SE": []}
    for name, d in named.items():
        if d["n"] < 2 or not math.isfinite(d["t"]):
            continue
        key = "> 3 SE" if abs(d["t"]) > 3 else "2-3 SE" if abs(d["t"]) > 2 else "< 2 SE"
        groups[key].append(f"{name} {d['mean']:+.{digits}f} ± {d['se']:.{digits}f}{' ' + unit if unit else ''}")
    return "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items() if v) or "no paired differences"


# ---------------------------------------------------------------------------------------------------- scoring

def score(run_dir: str, val, max_sequences: int, repeats: int, eval_seed: int) -> dict:
    """The run's export scored by evaluate_nelbo on ``val`` (every field of its EvalResult), with its size."""
    from dataclasses import replace

    from prime_scale.evaluate import evaluate_nelbo
    from prime_scale.export import from_pretrained
    from prime_scale.metrics import flops_per_token

    pre = from_pretrained(str(Path(run_dir) / "export"))
    cfg = replace(pre.config, eval=replace(pre.config.eval, max_sequences=max_sequences, repeats=repeats))
    start = time.perf_counter()
    result = evaluate_nelbo(pre.model, val, cfg, seed=eval_seed)
    return {**result.as_dict(), "eval_s": time.perf_counter() - start, "l": cfg.prime.num_subtokens,
            "objective": cfg.model.objective, "loss": cfg.diffusion.loss, "merge": cfg.model.merge,
            "step": pre.info.get("step"), "parameters": pre.model.num_params(),
            "flops_per_token": flops_per_token(pre.model, cfg.data.seq_len)}


def has_token_joint(run: dict) -> bool:
    """token_joint differs from the NELBO only for a diffusion model with l > 1 (for l = 1 a token is one digit,
    whose joint is its marginal); evaluate_nelbo leaves it None for the AR model and GenMD4."""
    return run["objective"] == "diffusion" and run["l"] > 1 and run.get("token_joint_not_a_bound") is not None


def aggregate(key: str, label: str, runs: dict[int, dict], baseline: dict[int, dict]) -> dict:
    """One family's row: mean ± sd over its seeds, and paired differences to the baseline's runs."""
    nelbo = {s: r["nelbo_per_token"] for s, r in runs.items()}
    row = {"family": key, "name": label, "seeds": sorted(runs), "l": next(iter(runs.values()))["l"],
           "nelbo": mean_sd(list(nelbo.values())), "ppl": mean_sd([r["ppl"] for r in runs.values()]),
           "mc_stderr": mean_sd([r["stderr"] for r in runs.values()])[0],
           "flops_per_token": next(iter(runs.values()))["flops_per_token"],
           "parameters": next(iter(runs.values()))["parameters"],
           "train_min": mean_sd([r["train_s"] / 60 for r in runs.values() if r.get("train_s")]),
           "vs_baseline": None, "token_joint": None, "inflation": None}
    if baseline and key != BASELINE:
        row["vs_baseline"] = paired(nelbo, {s: r["nelbo_per_token"] for s, r in baseline.items()})
    joint = {s: r for s, r in runs.items() if has_token_joint(r)}
    if joint:
        row["token_joint"] = mean_sd([r["token_joint_not_a_bound"] for r in joint.values()])
        row["inflation"] = mean_sd([r["nelbo_per_token"] - r["token_joint_not_a_bound"] for r in joint.values()])
    return row


def format_table(rows: list[dict]) -> str:
    header = ["family", "seeds", "val NELBO (nats/token)", "PPL", "vs MDM: ΔNELBO ± SE", "PPL ratio",
              "token_joint (not a bound)", "NELBO - token_joint", "MFLOP/token"]
    lines = []
    for r in rows:
        d = r["vs_baseline"]
        lines.append([r["name"], str(len(r["seeds"])), fmt(*r["nelbo"]), fmt(*r["ppl"], digits=2),
                      fmt_paired(d) if d else ("(baseline)" if r["family"] == BASELINE else "-"),
                      f"{math.exp(d['mean']):.3f}x" if d and math.isfinite(d["mean"]) else "-",
                      fmt(*r["token_joint"]) if r["token_joint"] else "-",
                      fmt(*r["inflation"]) if r["inflation"] else "-", f"{r['flops_per_token'] / 1e6:.2f}"])
    return text_table(header, lines, range(1, len(header)))


LEGEND = """\
val NELBO: the valid bound (every masked digit scored by its carry-over marginal; AR: its exact NLL), mean ± sd
over seeds; PPL = exp(NELBO) per seed, mean ± sd. vs MDM: paired by seed index, ± sd of the differences /
sqrt(seeds), (t in SE; t has seeds - 1 degrees of freedom). token_joint: the withdrawn MDM-Prime code's score from
the same draws, NOT an upper bound on -log p(x), shown only to measure how far below the bound it reads; '-' for
l = 1 (a token is one digit: its joint is its marginal, token_joint = NELBO), the AR model and GenMD4."""


def summary_line(rows: list[dict], seeds: int, steps: int) -> str:
    by = {r["family"]: r for r in rows}
    named = {r["name"]: r["vs_baseline"] for r in rows if r["vs_baseline"]}
    if BASELINE not in by or not named:
        return f"summary: {seeds} seeds x {steps} steps; no paired comparison with MDM (it or the others missing)"
    parts = [f"{seeds} seeds x {steps} steps, paired differences of the valid NELBO to MDM ({by[BASELINE]['nelbo'][0]:.4f})"
             f" by size in SE: {resolution(named)}"]
    inflated = [f"{r['name']} {r['inflation'][0]:+.3f}" for r in rows if r["inflation"]]
    if inflated:
        parts.append(f"token_joint reads below the NELBO by (nats) {', '.join(inflated)}: a score, not a bound, "
                     "and not a measure of model quality")
    parts.append(f"with {seeds} seeds t has {seeds - 1} degrees of freedom (95%: |t| > "
                 f"{T975.get(seeds - 1, 2.0):.2f}); these are {by[BASELINE]['parameters'] / 1e6:.1f}M-parameter "
                 f"models after {steps} steps on one small corpus, and say nothing about other scales")
    return "summary: " + "; ".join(parts)


T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ---------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="training seeds 0..S-1 per family (default 3)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of every run (default 600)")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    p.add_argument("--out", default="runs/paper_table", help="run folder parent (default runs/paper_table)")
    p.add_argument("--json", default="", help="write every run and row here (default OUT/paper_table.json)")
    p.add_argument("--max-sequences", type=int, default=512, help="validation sequences scored (default 512)")
    p.add_argument("--repeats", type=int, default=4, help="NELBO draws per sequence (default 4; AR is exact)")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the NELBO draws, the same for all (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of training and scoring (default 1)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--train-only", action="store_true", help="train and export, score nothing")
    mode.add_argument("--score-only", action="store_true", help="train nothing: the table of the finished runs")
    args = p.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families or args.seeds < 1:
        p.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)} (and --seeds >= 1)")

    import torch

    from prime_scale.config import load_config
    from prime_scale.pipeline import load_split, prepare_data

    started, wall0 = stamp(), time.perf_counter()
    torch.set_num_threads(args.threads)
    base = load_config(["config=text_demo"])
    try:
        manifest = prepare_data(base)
    except FileNotFoundError:
        subprocess.run([sys.executable, "-m", "data_prep.text", "config=text_demo", "--no-progress"], cwd=REPO,
                       check=True)
        manifest = prepare_data(base)
    out = Path(args.out)
    print(f"{len(families)} families x {args.seeds} seeds x {args.steps} steps into {out}/ ({started})", flush=True)
    report = {"command": "python bench/paper_table.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "started": started, "steps": args.steps, "seeds": args.seeds, "families": families,
              "eval": {"max_sequences": args.max_sequences, "repeats": args.repeats, "seed": args.eval_seed,
                       "split": "val", "data": base.data.path}}
    val = None if args.train_only else load_split(base, manifest, "val")
    code = code_hash("prime_scale/evaluate.py", "prime_scale/objective.py", "prime_scale/diffusion.py",
                     "prime_scale/schedules.py", "prime_scale/model.py")

    def make(key: str, seed: int) -> dict:
        f = FAMILIES[key]
        t = train_run(f.config, f.overrides, out, f"text_{key}_seed{seed}", args.steps, seed, args.threads,
                      train=not args.score_only)
        print(trained_line(key, seed, t), flush=True)
        if args.train_only:
            return t
        settings = {**report["eval"], "step": exported_step(Path(t["run_dir"])), "code": code}
        r = {**cached(t["run_dir"], settings, lambda: score(t["run_dir"], val, args.max_sequences, args.repeats,
                                                               args.eval_seed)),
             "family": key, "seed": seed, "run_dir": t["run_dir"], "train_s": t["train_s"]}
        joint = f"  token_joint {r['token_joint_not_a_bound']:.4f}" if has_token_joint(r) else ""
        print(f"{f.label:<16} seed {seed}: NELBO {r['nelbo_per_token']:.4f} ± {r['stderr']:.4f} (MC)  "
              f"PPL {r['ppl']:8.2f}{joint}  ({r['estimator']}, scored in {r['eval_s']:.0f} s)", flush=True)
        return r

    plan = [(key, seed, lambda k=key, s=seed: make(k, s)) for key in families for seed in range(args.seeds)]
    done, failed = run_all(plan, say=lambda m: print(m, flush=True))
    report["failed"] = {f"{k}/seed{s}": msg for (k, s), msg in failed.items()}
    if args.train_only:
        print(f"trained {len(done)} of {len(plan)} runs ({len(failed)} failed); scoring skipped (--train-only)")
        return report
    runs: dict[str, dict[int, dict]] = {k: {} for k in families}
    for (key, seed), r in done.items():
        runs[key][seed] = r

    rows = [aggregate(k, FAMILIES[k].label, runs[k], runs.get(BASELINE, {})) for k in families if runs[k]]
    print()
    print(text_table(["family", "l", "parameters", "MFLOP/token", "MC stderr (mean)", "train min/run"],
                     [[r["name"], str(r["l"]), f"{r['parameters']:,}", f"{r['flops_per_token'] / 1e6:.3f}",
                      f"{r['mc_stderr']:.4f}", fmt(*r["train_min"], digits=1)] for r in rows], range(1, 6)))
    print()
    print(format_table(rows))
    print(LEGEND)
    summary = summary_line(rows, args.seeds, args.steps)
    wall = time.perf_counter() - wall0
    if failed:
        summary += (f"; {len(failed)} of {len(plan)} runs are left out ("
                    f"{'not finished' if args.score_only else 'failed'}): {', '.join(report['failed'])}")
    print(summary)
    train_total = sum(r["train_s"] or 0 for k in families for r in runs[k].values())
    print(f"wall time {wall / 60:.1f} min, {started} - {stamp()} (training of the runs in the table, all "
          f"invocations: {train_total / 60:.1f} min)")
    report.update({"finished": stamp(), "wall_s": wall, "rows": rows, "summary": summary,
                   "train_s_total": sum(r["train_s"] or 0 for k in families for r in runs[k].values()),
                   "runs": [r for k in families for r in runs[k].values()]})
    path = Path(args.json or out / "paper_table.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"json: {path}")
    if failed and not args.score_only:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
