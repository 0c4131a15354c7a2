"""Peak memory on CPU, measured side by side in one run, and the memory model (prime_scale/memory.py) next to it:

1. the loss head, forward + backward, for l = 1, 2, 4 at C = 50,257, on the compact (CPU) and the static (GPU)
   path, against MDM's plain cross-entropy head (``F.cross_entropy(logits.float(), target)`` forward + backward on
   the same rows; target: Prime l = 2, 4 <= 1.25x of it, both paths);
2. two sampling steps (each a network call and draws) of B sequences x N tokens, l = 2, with a stub network
   that returns a view of a fixed (N, C) table, so the network's output costs nothing and every byte is the
   sampler's (target: <= 2x one float32 (B, N, C) logits tensor);
3. training steps (forward, backward, AdamW) of three model sizes at C = 50,257 through the DeepSpeed engine on
   CPU, and ZeRO-2 bf16 on 2 ranks, against ``memory.estimate(..., device="cpu")`` (target: within 15%);
4. the memory model's largest micro-batch per GPU for owt_small and owt_large, 80 and 141 GB, ZeRO-1/2/3, 8 and
   64 GPUs (a prediction, not a measurement).

    python bench/memory.py [--quick] [--only head,sampler,train,table]

What is counted: every case runs in a fresh process (``--case``), which imports torch, DeepSpeed and prime_scale,
builds its inputs (the logits, digits and weights of a head case; the stub's table of a sampler case; nothing of
a training case, whose model, optimizer and engine are part of what is measured), then resets the kernel's peak
resident size (``echo 5 > /proc/self/clear_refs``) and reads the resident size: that is the baseline. The
figure is the peak resident size (VmHWM in /proc/self/status) after the work, minus the baseline; for the
training cases the model's ``runtime`` (the imports) is left out of the prediction alike. A rank of several
is measured the same way in its own process; the largest rank is reported. Not a timed test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/memory.py`: the repo root leads sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import REPO, Figure, machine_line, parser, proc_status, write_json  # noqa: E402

MiB = 1 << 20
HEAD_TARGET, SAMPLER_TARGET, MODEL_TARGET = 1.25, 2.0, 0.15
GPU_BUDGETS = {"80 GB": 81_559 * MiB, "141 GB": 143_771 * MiB}  # H100 80GB, H200: what nvidia-smi reports


# ---------------------------------------------------------------------------------------------------- in a case

def _reset_peak() -> int:
    """Set the kernel's peak resident size to the current one; returns that (the baseline), bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status()["VmRSS"]


def _head_case(case: dict) -> tuple[int, int]:
    import torch
    import torch.nn.functional as F

    from prime_scale.codec import SubtokenCodec
    from prime_scale.diffusion import subtoken_cross_entropy

    g = torch.Generator().manual_seed(0)
    C, rows, l = case["vocab"], case["rows"], case["l"]
    codec = SubtokenCodec(C, l)
    logits = torch.randn(rows, C, generator=g).requires_grad_()
    tokens = torch.randint(0, C, (rows,), generator=g)
    clean = codec.encode(tokens)
    noisy = torch.where(torch.rand(clean.shape, generator=g) < 0.5, codec.mask_id, clean)
    weight = torch.rand(clean.shape, generator=g)
    base = _reset_peak()
    if case["path"] == "ce":
        loss = (F.cross_entropy(logits.float(), tokens, reduction="none") * weight[:, 0]).sum()
    else:
        ce = subtoken_cross_entropy(logits, noisy, clean, codec, compact=case["path"] == "compact")
        loss = (ce * weight).sum()
    (grad,) = torch.autograd.grad(loss, logits)
    return proc_status()["VmHWM"] - base, base


def _sampler_case(case: dict) -> tuple[int, int]:
    import torch

    from prime_scale.codec import SubtokenCodec
    from prime_scale.config import DiffusionConfig
    from prime_scale.sampler import sample
    from prime_scale.schedules import make_schedule

    B, N, C, l = case["batch"], case["seq"], case["vocab"], case["l"]
    table = torch.randn(N, C, generator=torch.Generator().manual_seed(0)) * 3
    stub = lambda noisy, m: table.expand(len(noisy), N, C)  # noqa: E731  (a view: the network costs nothing)
    base = _reset_peak()
    sample(stub, SubtokenCodec(C, l), make_schedule(DiffusionConfig()), B, N, case["steps"],
           torch.Generator().manual_seed(1))
    return proc_status()["VmHWM"] - base, base


def _train_case(case: dict) -> tuple[int, int]:
    from bench.common import bench_config, make_trainer
    from prime_scale.run_context import RunContext

    cfg = bench_config(None, tuple(case["overrides"]))
    RunContext("cpu").__enter__()  # the process group before the baseline (the case's process ends with it)
    import deepspeed  # noqa: F401  (imported before the baseline: part of the runtime, not the step)

    base = _reset_peak()
    trainer = make_trainer(cfg, "deepspeed")  # the engine's model, AdamW, DeepSpeed set-up and step
    for i in range(case["steps"]):
        trainer.step(i)
    return proc_status()["VmHWM"] - base, base


def run_case(case: dict) -> None:
    """In the case's own process: do the work and print its peak above the baseline as the last line."""
    import torch

    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    work = {"head": _head_case, "sampler": _sampler_case, "train": _train_case}[case["kind"]]
    peak, base = work(case)
    print(json.dumps({"peak": peak, "baseline": base}))


# ---------------------------------------------------------------------------------------------------- driver

def measure(case: dict, world: int = 1) -> tuple[int, int]:
    """(peak bytes above the baseline, the baseline) of ``case`` in fresh processes (``world`` ranks: the largest
    rank's peak)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["DS_ACCELERATOR"] = "cpu"
    command = [sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(case)]
    if world == 1:
        procs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True,
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
                 for r in range(world)]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memory case {case} exited with status {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    best = max(results, key=lambda r: r["peak"])
    return best["peak"], best["baseline"]


def head_section(args) -> list[Figure]:
    rows, C = args.head_rows, args.vocab
    print(f"\nloss head, forward + backward of {rows} rows at C = {C:,} (float32 logits: {rows * C * 4 / MiB:,.0f} MiB, "
          "in the baseline); peak above the baseline:")
    ce, _ = measure({"kind": "head", "path": "ce", "l": 1, "rows": rows, "vocab": C})
    print(f"  MDM plain cross-entropy  F.cross_entropy(logits.float())  {ce / MiB:8,.0f} MiB  (1.00x)")
    figures = [Figure("head_ce_peak_mib", ce / MiB, "MiB")]
    for path in ("compact", "static"):
        for l in (1, 2, 4):
            peak, _ = measure({"kind": "head", "path": path, "l": l, "rows": rows, "vocab": C})
            target = f"<= {HEAD_TARGET}" if l > 1 else ""
            print(f"  subtoken_cross_entropy l={l} {path:8s}                    {peak / MiB:8,.0f} MiB  "
                  f"({peak / ce:.2f}x{', target <= %.2fx' % HEAD_TARGET if l > 1 else ''})")
            figures.append(Figure(f"head_l{l}_{path}_over_ce", peak / ce, "x CE", target))
    return figures


def sampler_section(args) -> list[Figure]:
    B, N, C, l = args.sample_batch, args.sample_seq, args.vocab, 2
    one = B * N * C * 4
    peak, _ = measure({"kind": "sampler", "batch": B, "seq": N, "vocab": C, "l": l, "steps": 2})
    print(f"\nsampler, 2 steps of {B} x {N} tokens, l = {l}, C = {C:,} (stub network: a view, no memory); one float32 "
          f"(B, N, C) logits tensor = {one / MiB:,.0f} MiB")
    print(f"  peak above the baseline {peak / MiB:8,.0f} MiB = {peak / one:.2f}x one logits tensor "
          f"(target <= {SAMPLER_TARGET:.1f}x); the joint the sampler used to cache alone: "
          f"{B * N * 225**2 * 4 / one:.2f}x, its float64 draw buffers 3 x {B * N * 225**2 * 8 / one:.2f}x")
    return [Figure("sampler_peak_over_logits", peak / one, "x logits", f"<= {SAMPLER_TARGET}")]


TRAIN_SIZES = {  # name -> overrides (C = 50,257, l = 2, one rank unless said)
    "d256 L4 seq256 b8": ("model.d_model=256", "model.n_layer=4", "model.n_head=4", "data.seq_len=256",
                          "train.batch_size=8"),
    "d512 L6 seq512 b4": ("model.d_model=512", "model.n_layer=6", "model.n_head=8", "data.seq_len=512",
                          "train.batch_size=4"),
    "d768 L12 seq1024 b2": ("model.d_model=768", "model.n_layer=12", "model.n_head=12", "data.seq_len=1024",
                            "train.batch_size=2"),
}
QUICK_SIZES = {"d32 L1 seq16 b2": ("model.d_model=32", "model.n_layer=1", "model.n_head=1", "data.seq_len=16",
                                   "train.batch_size=2")}


def train_section(args) -> list[Figure]:
    from bench.common import bench_config
    from prime_scale import memory

    common = (f"data.vocab_size={args.vocab}", "prime.num_subtokens=2", "train.device=cpu", "train.warmup_steps=1")
    cases = [(name, 1, (*common, *o)) for name, o in (QUICK_SIZES if args.quick else TRAIN_SIZES).items()]
    owt = QUICK_SIZES["d32 L1 seq16 b2"] if args.quick else (
        "model.d_model=768", "model.n_layer=12", "model.n_head=12", "data.seq_len=1024", "train.batch_size=2")
    cases.append(("ZeRO-2 bf16, 2 ranks, " + ("quick" if args.quick else "owt_small shape, micro-batch 1"), 2,
                  (*common, *owt, "engine.zero_stage=2", "train.dtype=bfloat16")))
    print("\ntraining steps (DeepSpeed engine on CPU, forward + backward + AdamW, 2 steps), peak above the imports "
          "against memory.estimate(device='cpu') less its runtime:")
    figures = []
    for name, world, overrides in cases:
        cfg = bench_config(None, overrides)
        est = memory.estimate(cfg, world_size=world, device="cpu")
        predicted = est.total - est.runtime
        peak, base = measure({"kind": "train", "overrides": list(overrides), "steps": 2}, world)
        error = predicted / peak - 1
        print(f"  {name:42s} ZeRO-{cfg.engine.zero_stage} {cfg.train.dtype:8s} measured {peak / MiB:7,.0f} MiB  "
              f"predicted {predicted / MiB:7,.0f} MiB  ({error:+.1%}, target within {MODEL_TARGET:.0%}); imports "
              f"{base / MiB:,.0f} MiB")
        figures.append(Figure(f"model_error_{name.split(',')[0].replace(' ', '_')}", abs(error), "relative",
                              f"<= {MODEL_TARGET}"))
    print(f"  (estimate() adds {memory.CPU_RUNTIME_BYTES / MiB:.0f} MiB of runtime to a CPU rank: the imports)")
    return figures


def table_section(args) -> list[Figure]:
    from bench.common import bench_config
    from prime_scale import memory

    configs = {name: bench_config(name) for name in ("owt_small", "owt_large")}
    print("\nlargest micro-batch per GPU that fits (memory.largest_micro_batch; bf16, flash attention, seq 1024, "
          f"{memory.HEADROOM:.0%} headroom; a prediction):")
    header = f"  {'config':10s} {'params':>7s} {'GPUs':>5s}  " + "  ".join(
        f"{g + ' Z' + str(z):>10s}" for g in GPU_BUDGETS for z in (1, 2, 3))
    print(header)
    figures = []
    for name, cfg in configs.items():
        for world in (8, 64):
            cells = []
            for budget_name, budget in GPU_BUDGETS.items():
                for stage in (1, 2, 3):
                    batch = memory.largest_micro_batch(cfg, world, budget, "cuda", stage)
                    cells.append(f"{batch:10d}")
                    figures.append(Figure(f"micro_batch_{name}_{budget_name.replace(' ', '')}_z{stage}_{world}gpu",
                                          batch, "sequences"))
            print(f"  {name:10s} {memory.parameter_count(cfg) / 1e6:6.0f}M {world:5d}  " + "  ".join(cells))
    small = configs["owt_small"]
    print("  " + memory.estimate(small, 8, 64, "cuda", 2).table().replace("\n", "\n  "))
    return figures


SECTIONS = {"head": head_section, "sampler": sampler_section, "train": train_section, "table": table_section}


def main(argv=None) -> list[Figure]:
    p = parser(__doc__)
    p.add_argument("--case", default="", help=argparse_hidden())
    p.add_argument("--quick", action="store_true", help="the smallest sizes (seconds; the figures mean nothing)")
    p.add_argument("--only", default="", help=f"comma-separated sections of {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--head-rows", type=int, default=2048, help="rows of the loss-head cases")
    p.add_argument("--sample-batch", type=int, default=8)
    p.add_argument("--sample-seq", type=int, default=1024)
    args = p.parse_args(argv)
    if args.case:
        run_case(json.loads(args.case))
        return []
    if args.quick:
        args.vocab, args.head_rows, args.sample_batch, args.sample_seq = 500, 64, 2, 16
    print(machine_line())
    figures = []
    for name in [n for n in args.only.split(",") if n] or list(SECTIONS):
        figures += SECTIONS[name](args)
    judged = [f for f in figures if f.target]
    missed = [f.name for f in judged if not f.met()]
    print(f"summary: {len(judged) - len(missed)} of {len(judged)} memory targets met"
          + (f" (NOT MET: {', '.join(missed)})" if missed else "")
          + (" [--quick: sizes too small to judge]" if args.quick else ""))
    write_json(figures, args.json)
    return figures


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
