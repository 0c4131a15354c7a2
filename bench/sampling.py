"""Sampling of MDM-Prime (l > 1) against MDM (l = 1), side by side in one run: cost, idle steps, sample quality.

    python bench/sampling.py [--steps 256,1024] [--num 8] [--config demo] [--subtokens 2]
        [--idle-subtokens 1,2,4,6] [--idle-num 256]
        [--train-steps K] [--train-config demo] [--train-out runs/bench_sampling] [--train-threads 1]
        [--quality-num 32] [--quality-steps 0]

Cost. For each number of --steps: the network evaluations per sequence (NFE; the sampler reuses a sequence's
output while its digits do not change), the wall time and tokens/s of prime_scale.sampler.sample on the model of
--config with l = 1 and l = --subtokens. The models are untrained (seeded initial weights): NFE depends on which
digits get revealed when, i.e. on the masking schedule and the number of sub-tokens, not on the weights, and the
wall time depends on the shapes.

Idle steps. For each l of --idle-subtokens, at steps = N (the config's data.seq_len), the linear schedule, the
uniform time grid and no prompt: the measured idle-step ratio (``SampleResult.idle_ratio``, the fraction of the
steps at which a sequence did not change) over --idle-num sequences with its standard error (the per-sequence
fractions are the i.i.d. units), next to its exact value (1 - 1/N)**(l N) and the limit e**(-l) (the MDM-Prime
paper's 36.8%, 13.5%, 1.8%, 0.25% for l = 1, 2, 4, 6). The sampler draws which digits are revealed when from its
generator in the same order whatever the network outputs (tests/test_sampler.py::
test_idle_steps_do_not_depend_on_the_network), so this part drives the codec of the config's seeded model with a
stand-in network of uniform logits: its idle steps are those of any time-independent network at the same seed,
for the cost of the draws alone.

Quality (--train-steps K > 0). --train-config (demo: the synthetic Markov source, whose exact log-probability is
known) is trained for K optimizer steps with prime.num_subtokens=l, once per l of --idle-subtokens, by the
engine in a subprocess, as bench/paper_table.py trains (``train_run``: --train-threads threads, seed 0; the
warm-up is shortened to K/10 when the config's is longer; the run's final validation NELBO on 128 sequences x 2
draws is reported). A run folder --train-out/CONFIG_l{l}_k{K} that already holds the export of step K is reused,
one with an earlier checkpoint (an interrupted run) is resumed. The checkpoint of step K is exported
(prime_scale.export) and --quality-num samples are drawn by plain ancestral sampling (the schedule as trained, uniform grid, float64
draws, seed 0) and scored by the chain: the sample NLL per token under the true source, mean ± SE over the
samples, next to the chain's entropy per token (what a perfect model's samples score on average) and the NLL of
as many validation sequences (the spread a perfect sampler would show). Two comparisons, each l against MDM:

* equal steps: every l at --quality-steps (0 = N) steps;
* matched NFE: each l > 1 at the number of steps whose NFE is closest to MDM's at those equal steps. NFE is
  measured, not predicted: at a given seed and batch the sampler's reveals, hence its NFE, do not depend on the
  network, so the stand-in's NFE at S steps is the trained model's. A bisection over S, from MDM's NFE (plain
  sampling costs at most one evaluation per step) up to the equal steps, finds the fewest steps whose stand-in
  NFE reaches MDM's; of S and S - 1 the one whose NFE is closer is taken (the fewer steps on a tie). The trained
  model's own run then reports its NFE, which the bench checks equals the stand-in's (and its idle steps
  likewise; GenMD4's learned schedule, whose reveals depend on the drawn values, would fail that check).

A sample NLL below the entropy is no better: samples collapsed onto the likeliest paths score below it. Compare
each l with the entropy, and the l with each other within their standard errors (a difference's SE treats the
two sets of samples as independent). One line per case with its ratio to MDM, then a summary line. On a busy
machine give --threads 1: two threads on two shared cores ran the sampler several times slower. Not a timed
test.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/sampling.py`: the repo root leads sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import REPO, Figure, bench_config, machine_line, parser, set_threads, write_json  # noqa: E402
from prime_scale.run_paths import RunPaths  # noqa: E402

def main(argv=None) -> list[Figure]:
    p = parser(__doc__)
    p.add_argument("--config", default="demo")
    p.add_argument("--steps", default="256,1024", help="comma-separated numbers of sampling steps (cost part)")
    p.add_argument("--num", type=int, default=8, help="sequences sampled together in the cost part (one batch)")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (0 = the config's data.seq_len)")
    p.add_argument("--subtokens", type=int, default=2, help="Prime's l in the cost part (compared with l = 1)")
    p.add_argument("--idle-subtokens", default="1,2,4,6", help="the l of the idle-step and quality parts")
    p.add_argument("--idle-num", type=int, default=256, help="sequences of the idle-step measurement")
    p.add_argument("--train-steps", type=int, default=0, help="K: train each l for K steps (0 = no quality part)")
    p.add_argument("--train-config", default="demo", help="the config trained for the quality part (Markov data)")
    p.add_argument("--train-out", default="runs/bench_sampling", help="parent of the quality part's run folders")
    p.add_argument("--train-threads", type=int, default=1, help="torch threads of each training process")
    p.add_argument("--quality-num", type=int, default=32, help="samples scored per case of the quality part")
    p.add_argument("--quality-steps", type=int, default=0, help="the equal steps of the quality part (0 = N)")
    args = p.parse_args(argv)
    levels = sorted({int(x) for x in args.idle_subtokens.split(",") if x.strip()})
    if 1 not in levels or any(l < 1 for l in levels):
        p.error(f"--idle-subtokens must hold l = 1 (MDM, the reference) and positive l only, got {levels}")
    set_threads(args.threads)

    print(machine_line())
    figures, cost_summary = cost_part(args)
    idle_figures, idle_summary = idle_part(args, levels)
    figures += idle_figures
    summary = [f"idle steps at steps = N: {idle_summary}", cost_summary]
    if args.train_steps:
        quality_figures, quality_summary = quality_part(args, levels)
        figures += quality_figures
        summary.append(quality_summary)
    print("summary: " + " | ".join(summary))
    write_json(figures, args.json)
    return figures


# ---------------------------------------------------------------------------------------------------- cost

def seeded_model(config: str, l: int):
    """The config's network with l sub-tokens and the initial weights of seed 0, in eval mode."""
    import torch

    from prime_scale.model import PrimeTransformer

    torch.manual_seed(0)
    return PrimeTransformer.from_config(bench_config(config, (f"prime.num_subtokens={l}",))).eval()


def cost_part(args) -> tuple[list[Figure], str]:
    """NFE, wall time and tokens/s of MDM and Prime l = --subtokens at each of --steps."""
    import torch

    from prime_scale.sampler import sample
    from prime_scale.schedules import make_schedule

    models = {l: seeded_model(args.config, l) for l in (1, args.subtokens)}
    cfg = bench_config(args.config)
    seq_len = args.seq_len or cfg.data.seq_len
    schedule = make_schedule(cfg.diffusion)
    print(f"model {args.config}: d={cfg.model.d_model} L={cfg.model.n_layer} C={cfg.data.vocab_size}, {args.num} "
          f"sequences x {seq_len} tokens, float64 draws, output caching (time-independent network)")

    def run(l: int, steps: int):
        g = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        out = sample(models[l], models[l].codec, schedule, args.num, seq_len, steps, g)
        return out, time.perf_counter() - start

    run(1, 8)  # warm-up: first calls allocate
    figures, summary = [], []
    for steps in (int(s) for s in args.steps.split(",")):
        results = {l: run(l, steps) for l in models}
        base_out, base_s = results[1]
        for l, (out, seconds) in results.items():
            name = "MDM  " if l == 1 else "Prime"
            print(f"{steps:5d} steps  {name} l={l} (b={models[l].codec.base:<3d}): NFE {out.nfe:7.1f} per sequence "
                  f"(of at most {min(steps, seq_len * l)}), {out.calls:5d} calls, {seconds:7.2f} s, "
                  f"{args.num * seq_len / seconds:9,.0f} tokens/s  (NFE {out.nfe / base_out.nfe:.2f}x, "
                  f"time {seconds / base_s:.2f}x MDM)")
            figures += [Figure(f"sampling_{steps}_l{l}_nfe", out.nfe),
                        Figure(f"sampling_{steps}_l{l}_tokens_per_s", args.num * seq_len / seconds, "tokens/s")]
        out, seconds = results[args.subtokens]
        figures.append(Figure(f"sampling_{steps}_time_ratio", seconds / base_s, "x MDM"))
        summary.append(f"{steps} steps: NFE {out.nfe:.1f} vs {base_out.nfe:.1f} ({out.nfe / base_out.nfe:.2f}x), "
                       f"time {seconds / base_s:.2f}x")
    return figures, f"cost, Prime l={args.subtokens} vs MDM: " + "; ".join(summary)


# ---------------------------------------------------------------------------------------------------- idle steps

def uniform_logits(vocab_size: int):
    """A stand-in time-independent network: uniform logits, at no cost. The reveals, NFE and idle steps it gives
    at a seed are those of any time-independent network at that seed."""
    import torch

    return lambda noisy, mask_rate: torch.zeros(len(noisy), noisy.shape[1], vocab_size)


def stand_in_run(codec, schedule, num: int, seq_len: int, steps: int, seed: int = 0, time_conditioned=False):
    import torch

    from prime_scale.sampler import sample

    return sample(uniform_logits(codec.vocab_size), codec, schedule, num, seq_len, steps,
                  torch.Generator().manual_seed(seed), time_conditioned=time_conditioned)


def mean_and_se(values) -> tuple[float, float]:
    """The mean of i.i.d. values and its standard error (sample standard deviation / sqrt(n))."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def idle_part(args, levels: list[int]) -> tuple[list[Figure], str]:
    """Measured idle-step ratio at steps = N against (1 - 1/N)**(l N) and e**(-l), for each l."""
    from prime_scale.config import DiffusionConfig
    from prime_scale.schedules import make_schedule

    linear = make_schedule(DiffusionConfig(schedule="linear"))
    seq_len = args.seq_len or bench_config(args.config).data.seq_len
    print(f"idle steps: {args.idle_num} sequences x {seq_len} tokens at steps = N = {seq_len}, linear schedule, "
          f"uniform grid, no prompt; mean ± SE over the sequences; exact (1 - 1/N)^(lN), limit e^-l")
    figures, parts, measured = [], [], {}
    for l in levels:
        codec = seeded_model(args.config, l).codec
        start = time.perf_counter()
        out = stand_in_run(codec, linear, args.idle_num, seq_len, seq_len)
        seconds = time.perf_counter() - start
        mean, se = mean_and_se(out.idle_fractions.numpy())
        exact, limit = (1 - 1 / seq_len) ** (l * seq_len), math.exp(-l)
        measured[l] = mean
        off = f"{(mean - exact) / se:+.1f} SE from exact" if se > 0 else "no spread"
        ratio = f"{mean / measured[1]:.3f}x MDM's" if measured[1] > 0 else "MDM idles never"
        print(f"  l={l} (b={codec.base:<2d}): idle {100 * mean:6.2f} ± {100 * se:.2f}% of the steps, exact "
              f"{100 * exact:6.2f}%, limit {100 * limit:6.2f}%  ({off}; {ratio}), NFE {out.nfe:6.1f} of {seq_len} "
              f"steps, {seconds:.1f} s")
        figures += [Figure(f"idle_l{l}_ratio", mean, note=f"steps = N = {seq_len}, {args.idle_num} sequences"),
                    Figure(f"idle_l{l}_stderr", se), Figure(f"idle_l{l}_exact", exact),
                    Figure(f"idle_l{l}_limit", limit)]
        parts.append(f"l={l} {100 * mean:.2f} ± {100 * se:.2f}% (exact {100 * exact:.2f}%, e^-{l} "
                     f"{100 * limit:.2f}%)")
    return figures, "; ".join(parts)


# ---------------------------------------------------------------------------------------------------- quality

def train(config: str, l: int, steps: int, out: Path, threads: int) -> tuple[Path, float | None]:
    """CONFIG with l sub-tokens trained for ``steps`` and exported (bench/paper_table.train_run: a fresh process,
    resumed when interrupted, reused when done); (run folder, wall seconds of the training done now, or None)."""
    from bench.paper_table import TrainingFailed, train_run

    warmup = min(bench_config(config).train.warmup_steps, max(1, steps // 10))
    name = f"{config}_l{l}_k{steps}"  # K in the name: a folder is resumed only by a run of the same K
    try:
        run = train_run(config, (f"prime.num_subtokens={l}", f"train.warmup_steps={warmup}"), out, name, steps,
                        seed=0, threads=threads, evaluation=("eval.max_sequences=128", "eval.repeats=2"))
    except TrainingFailed as e:
        raise SystemExit(f"training {config} with l={l} failed: {e}") from None
    return Path(run["run_dir"]), run["train_s"] if run["did"] == "trained" else None


def final_nelbo(run_dir: Path, steps: int) -> tuple[float, float]:
    """(NELBO per token, its standard error) of the run's validation at ``steps``, from its metrics.jsonl."""
    finals = RunPaths(run_dir).validation_records(steps)
    if not finals:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no validation at step {steps}")
    return finals[-1]["val/nelbo_per_token"], finals[-1]["val/stderr"]


def matched_steps(codec, schedule, num: int, seq_len: int, target_nfe: float, max_steps: int,
                  time_conditioned: bool) -> int:
    """The number of steps in [1, max_steps] whose measured (stand-in) NFE at seed 0 is closest to target_nfe:
    bisection for the fewest steps reaching it, then the closer of those and one step fewer. Plain ancestral
    sampling evaluates a sequence at most once per step (NFE <= steps), so the search starts at target_nfe."""
    measured: dict[int, float] = {}

    def nfe(steps: int) -> float:
        if steps not in measured:
            measured[steps] = stand_in_run(codec, schedule, num, seq_len, steps, 0, time_conditioned).nfe
        return measured[steps]

    lo, hi = max(1, min(max_steps, math.floor(target_nfe))), max_steps
    while lo < hi:
        mid = (lo + hi) // 2
        if nfe(mid) >= target_nfe:
            hi = mid
        else:
            lo = mid + 1
    if lo > 1 and abs(nfe(lo - 1) - target_nfe) <= abs(nfe(lo) - target_nfe):
        return lo - 1
    return lo


def quality_part(args, levels: list[int]) -> tuple[list[Figure], str]:
    """Train each l, then sample NLL under the true chain at equal steps and at matched NFE."""
    import torch

    from prime_scale.data.markov import load_markov_chain
    from prime_scale.export import from_pretrained
    from prime_scale.objective import schedule_of
    from prime_scale.pipeline import load_split, prepare_data
    from prime_scale.sampler import sample

    base = bench_config(args.train_config)
    if base.data.source != "markov":
        raise SystemExit(f"--train-config {args.train_config} is not trained on the Markov source: its samples "
                         "cannot be scored by the true log-probability")
    manifest = prepare_data(base)  # idempotent: the engine reads the prepared shards
    chain = load_markov_chain(base.data.path)
    N, K, num = base.data.seq_len, args.train_steps, args.quality_num
    entropy = chain.sequence_entropy_per_token(N)
    val = load_split(base, manifest, "val", num).numpy()
    val_nll, val_se = mean_and_se(-chain.log_prob(val) / N)
    print(f"quality: {args.train_config} (C={base.data.vocab_size}, N={N}) trained {K} steps per l; {num} samples "
          f"per case, ancestral, uniform grid, float64, seed 0; sample NLL under the true chain in nats/token, mean "
          f"± SE; data: entropy {entropy:.4f}, {len(val)} validation sequences {val_nll:.4f} ± {val_se:.4f}")

    out_root = Path(args.train_out)
    if not out_root.is_absolute():
        out_root = REPO / out_root
    models, figures = {}, [Figure("quality_entropy", entropy, "nats/token")]
    for l in levels:
        run_dir, wall = train(args.train_config, l, K, out_root, args.train_threads)
        pre = from_pretrained(str(run_dir / "export"))
        nelbo, nelbo_se = final_nelbo(run_dir, K)
        models[l] = pre
        how = f"trained in {wall:.0f} s" if wall is not None else "reused"
        print(f"  l={l} (b={pre.model.codec.base:<2d}): {run_dir} {how}, {pre.info['weights']} weights of step "
              f"{pre.info['step']}, val NELBO {nelbo:.4f} ± {nelbo_se:.4f} nats/token")
        figures.append(Figure(f"quality_l{l}_val_nelbo", nelbo, "nats/token"))

    def draw(l: int, steps: int) -> dict:
        pre = models[l]
        cfg, model = pre.config, pre.model
        schedule, conditioned = schedule_of(model, cfg), cfg.model.time_conditioning
        start = time.perf_counter()
        out = sample(model, model.codec, schedule, num, N, steps, torch.Generator().manual_seed(0),
                     time_conditioned=conditioned)
        seconds = time.perf_counter() - start
        stand_in = stand_in_run(model.codec, schedule, num, N, steps, 0, conditioned)
        if not (torch.equal(stand_in.idle_steps, out.idle_steps) and stand_in.nfe == out.nfe):
            raise RuntimeError(f"l={l}, {steps} steps: the trained model's reveals differ from the stand-in's at the "
                               "same seed; the matched-NFE search assumes they do not")
        nll, se = mean_and_se(-chain.log_prob(out.tokens.numpy()) / N)
        return {"steps": steps, "nfe": out.nfe, "idle": out.idle_ratio, "nll": nll, "se": se, "seconds": seconds}

    def line(label: str, l: int, r: dict, ref: dict) -> str:
        diff = r["nll"] - ref["nll"]
        diff_se = math.sqrt(r["se"] ** 2 + ref["se"] ** 2)
        versus = "" if r is ref else (f"  ({r['nll'] / ref['nll']:.3f}x MDM's NLL, {diff:+.4f} ± {diff_se:.4f}; "
                                      f"NFE {r['nfe'] / ref['nfe']:.2f}x)")
        return (f"  {label} l={l}: {r['steps']:4d} steps, NFE {r['nfe']:6.1f}, idle {100 * r['idle']:5.1f}%, sample "
                f"NLL {r['nll']:.4f} ± {r['se']:.4f} ({r['nll'] - entropy:+.4f} over the entropy), "
                f"{r['seconds']:.0f} s{versus}")

    reference_steps = args.quality_steps or N
    equal = {l: draw(l, reference_steps) for l in levels}
    mdm = equal[1]
    for l, r in equal.items():
        print(line("equal steps", l, r, mdm))
        figures += [Figure(f"quality_equal_l{l}_nll", r["nll"], "nats/token"),
                    Figure(f"quality_equal_l{l}_nll_stderr", r["se"], "nats/token"),
                    Figure(f"quality_equal_l{l}_nfe", r["nfe"])]
    matched = {}
    for l in levels:
        if l == 1:
            continue
        codec, cfg = models[l].model.codec, models[l].config
        steps = matched_steps(codec, schedule_of(models[l].model, cfg), num, N, mdm["nfe"], reference_steps,
                              cfg.model.time_conditioning)
        matched[l] = draw(l, steps)
        print(line(f"NFE ~ {mdm['nfe']:.1f}", l, matched[l], mdm))
        figures += [Figure(f"quality_matched_l{l}_steps", steps),
                    Figure(f"quality_matched_l{l}_nfe", matched[l]["nfe"]),
                    Figure(f"quality_matched_l{l}_nll", matched[l]["nll"], "nats/token"),
                    Figure(f"quality_matched_l{l}_nll_stderr", matched[l]["se"], "nats/token")]
    fmt = lambda r: f"{r['nll']:.3f} ± {r['se']:.3f}"  # noqa: E731
    equal_text = ", ".join(f"l={l} {fmt(r)}" for l, r in equal.items())
    matched_text = ", ".join(f"l={l} {fmt(r)} ({r['steps']} steps, NFE {r['nfe']:.1f})" for l, r in matched.items())
    return figures, (f"sample NLL after {K} training steps (entropy {entropy:.3f}): {reference_steps} steps "
                     f"{equal_text}; at MDM's NFE {mdm['nfe']:.1f}: {matched_text}")


if __name__ == "__main__":
    main()
