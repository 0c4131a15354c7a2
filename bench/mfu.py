"""Training throughput and model FLOP utilisation (MFU) of one training step, against the machine's measured dense
matmul peak in the same run and the same dtype (target: >= 35% for the demo model on CPU in float32).

    python bench/mfu.py [--config demo] [--batch 32] [--threads 0] [--engine deepspeed] [--variants eager,compile]
    python bench/mfu.py --device cuda --dtype bfloat16 --config owt_small --batch 16     # GPU: bf16, flash SDPA,
                                                                                         # torch.compile, fused AdamW

MFU = flops_per_token(model, seq_len) x tokens per step / step time / peak, where flops_per_token is
prime_scale.metrics' formula (docs/performance.md) and the peak is the best of several torch.matmul calls of two
--peak-size square matrices (2048 and 4096 by default: the larger rate counts) with the same intra-op threads.
One line per variant (eager, compile, fused = fused AdamW, compile+fused) with its ratio to the first (the target is
judged on the first: by default the engine as it runs, i.e. ``prime_scale.trainer.Trainer.step`` itself), then the
profile of the first variant (torch.profiler: the matmuls' share of the step and the rate they reach at the model's
shapes, attention, the rest), then a summary line. Not a timed test.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/mfu.py`: the repo root, not bench/, leads sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import (  # noqa: E402
    Figure, bench_config, machine_line, make_trainer, matmul_peak, median_seconds, parser, set_threads, timings,
    write_json,
)

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation",
              "mkldnn::_linear_pointwise", "aten::_scaled_mm"}
TARGET = 0.35


def is_attention(name: str) -> bool:
    return "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name


def profile_step(trainer, steps: int, first: int) -> dict:
    """Self time of every op over ``steps`` steps, grouped: matmuls (with the FLOPs torch.profiler counts for
    them), attention kernels, everything else; shares are of the measured wall time of those steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    micro_steps = iter(range(first, first + steps))
    with profile(activities=activities, with_flops=True) as prof:
        wall = sum(timings(lambda: trainer.step(next(micro_steps)), steps, warmup=0, sync=trainer.sync))
    # on a GPU an op's device time is that of the kernels it launched; the kernels' own entries are skipped
    self_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    groups = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    others, matmul_flops = {}, 0
    for e in prof.key_averages():
        if cuda and e.device_type != DeviceType.CPU:
            continue
        seconds = self_time(e) / 1e6
        if e.key in MATMUL_OPS:
            groups["matmul"] += seconds
            matmul_flops += e.flops
        elif is_attention(e.key):
            groups["attention"] += seconds
        else:
            groups["other"] += seconds
            name = "torch.compile's fused kernels" if e.key.startswith("## Call CompiledFxGraph") else e.key
            others[name] = others.get(name, 0.0) + seconds
    top = sorted(others.items(), key=lambda kv: -kv[1])[:6]
    return {"wall": wall, "groups": groups, "matmul_flops": matmul_flops, "top_other": top,
            "unattributed": max(0.0, wall - sum(groups.values()))}


def main(argv=None) -> list[Figure]:
    p = parser(__doc__)
    p.add_argument("--config", default="demo", help="prime_scale/configs/NAME.yaml (the model, seq_len, batch, dtype)")
    p.add_argument("--batch", type=int, default=0, help="sequences per step (0 = the config's train.batch_size)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--engine", choices=("deepspeed", "plain"), default="deepspeed",
                   help="prime_scale.trainer.Trainer.step (the training step as prime_scale.engine runs it), or a "
                        "plain PyTorch loop")
    p.add_argument("--variants", default="",
                   help="comma-separated: eager, compile, fused (fused AdamW), compile+fused "
                        "(default: eager on CPU, compile+fused on CUDA)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (the median counts)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-size", default="2048,4096", help="square matmul sizes for the peak (the best counts)")
    p.add_argument("--peak-repeats", type=int, default=5)
    p.add_argument("--profile-steps", type=int, default=3, help="steps under torch.profiler (0 = no profile)")
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    cuda = args.device == "cuda"
    overrides = [f"train.dtype={args.dtype}", f"train.device={args.device}", *args.set]
    if args.batch:
        overrides.append(f"train.batch_size={args.batch}")
    cfg = bench_config(args.config, tuple(overrides))
    variants = [v for v in (args.variants or ("compile+fused" if cuda else "eager")).split(",") if v]
    print(machine_line())

    sizes = [int(s) for s in args.peak_size.split(",")]
    rates = {n: matmul_peak(n, args.dtype, args.device, args.peak_repeats) for n in sizes}
    peak = max(rates.values())
    print(f"matmul peak ({args.dtype}, {threads} threads): "
          + ", ".join(f"{n}^2 {r / 1e9:,.1f} GFLOP/s" for n, r in rates.items()) + f" -> {peak / 1e9:,.1f} GFLOP/s")

    from prime_scale.metrics import flops_per_token

    results = {}
    for variant in variants:
        parts = set(variant.split("+"))
        if not parts <= {"eager", "compile", "fused"}:
            raise SystemExit(f"unknown variant {variant!r}: use eager, compile, fused, compile+fused")
        trainer = make_trainer(cfg, args.engine, args.device, compile="compile" in parts, fused="fused" in parts,
                               sdpa_fused_only=cuda)
        counter = iter(range(10**9))
        seconds = median_seconds(lambda: trainer.step(next(counter)), args.steps, args.warmup, trainer.sync)
        step_flops = flops_per_token(trainer.model, cfg.data.seq_len) * trainer.tokens_per_step
        results[variant] = (seconds, step_flops / seconds / peak, trainer, next(counter))
        base = results[variants[0]][0]
        if variant == variants[0]:
            print(f"model {args.config}: {trainer.model.num_params() / 1e6:.2f}M params, l={cfg.prime.num_subtokens}, "
                  f"C={cfg.data.vocab_size}, {flops_per_token(trainer.model, cfg.data.seq_len) / 1e6:.2f} MFLOP/token, "
                  f"{trainer.tokens_per_step:,} tokens/step (batch {cfg.train.batch_size} x seq {cfg.data.seq_len}) "
                  f"= {step_flops / 1e9:.2f} GFLOP/step")
        print(f"{variant:14s} ({args.engine}, {args.dtype}): {seconds * 1e3:8.1f} ms/step  "
              f"{trainer.tokens_per_step / seconds:10,.0f} tokens/s  {step_flops / seconds / 1e9:8.1f} GFLOP/s  "
              f"MFU {results[variant][1]:6.1%}  ({base / seconds:.2f}x {variants[0]} speed)")

    # the target is judged on the first variant (by default the engine as it runs: eager); the others are for
    # comparison, and the best of them is named in the summary
    first, best = variants[0], max(results, key=lambda v: results[v][1])
    seconds, mfu, trainer, next_step = results[first]
    figures = [Figure("mfu", mfu, "", f">= {TARGET}", f"{first}, {args.config}, {args.device} {args.dtype}"),
               Figure("train_tokens_per_s", trainer.tokens_per_step / seconds, "tokens/s"),
               Figure("matmul_peak", peak / 1e9, "GFLOP/s")]
    figures += [Figure(f"mfu_{v}", results[v][1]) for v in variants[1:]]
    if args.profile_steps:
        prof = profile_step(trainer, args.profile_steps, next_step)
        g, wall = prof["groups"], prof["wall"]
        mm_rate = prof["matmul_flops"] / g["matmul"] if g["matmul"] else 0.0
        print(f"profile ({first}, {args.profile_steps} steps, {wall / args.profile_steps * 1e3:.1f} ms/step under the "
              f"profiler): matmuls {g['matmul'] / wall:.0%} of the step at {mm_rate / 1e9:,.1f} GFLOP/s "
              f"({mm_rate / peak:.0%} of peak at the model's shapes), attention {g['attention'] / wall:.0%}, "
              f"other ops {g['other'] / wall:.0%}, outside ops {prof['unattributed'] / wall:.0%}")
        print("profile, largest other ops: " + ", ".join(f"{k} {s / wall:.1%}" for k, s in prof["top_other"]))
        figures += [Figure("matmul_share", g["matmul"] / wall), Figure("matmul_efficiency", mm_rate / peak),
                    Figure("attention_share", g["attention"] / wall)]
    verdict = "met" if mfu >= TARGET else "NOT met"
    also = f"; best {best} {results[best][1]:.1%}" if best != first else ""
    print(f"summary: MFU {mfu:.1%} ({first}, {trainer.tokens_per_step / seconds:,.0f} tokens/s, peak "
          f"{peak / 1e9:,.1f} GFLOP/s); target >= {TARGET:.0%} {verdict}{also}")
    write_json(figures, args.json)
    return figures


if __name__ == "__main__":
    main()
