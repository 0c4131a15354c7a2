"""Framework overhead: the DeepSpeed engine's training step against a plain PyTorch loop, on the same model,
batch and noise, measured side by side in one process (one rank, gloo, CPU here; target <= 1.10x for ZeRO-1/2).

    python bench/engine_overhead.py [--d-model 256] [--layers 4] [--seq-len 256] [--batch 16] [--steps 20]

Both loops do what a training step does (bench/common.py's make_trainer): NELBO forward, backward, gradient
clipping at 1.0, AdamW, LR schedule. Prints one line per case with its ratio to the plain loop, then a summary
line. Not a timed test.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/engine_overhead.py`: the repo root leads sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import (  # noqa: E402
    Figure, bench_config, machine_line, make_trainer, median_seconds, parser, set_threads, write_json,
)

TARGET = 1.10


def main(argv=None) -> list[Figure]:
    p = parser(__doc__)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--subtokens", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--stages", default="0,1,2", help="ZeRO stages to measure")
    args = p.parse_args(argv)
    set_threads(args.threads)
    cfg = bench_config(None, (
        f"model.d_model={args.d_model}", f"model.n_layer={args.layers}", f"model.n_head={max(1, args.d_model // 64)}",
        f"data.seq_len={args.seq_len}", f"train.batch_size={args.batch}", f"data.vocab_size={args.vocab}",
        f"prime.num_subtokens={args.subtokens}", "train.warmup_steps=2", "train.device=cpu"))
    print(machine_line())
    print(f"model d={args.d_model} L={args.layers} seq={args.seq_len} batch={args.batch} C={args.vocab} "
          f"l={args.subtokens}")

    def measure(engine: str) -> float:
        trainer = make_trainer(cfg, engine)
        steps = iter(range(10**9))
        return median_seconds(lambda: trainer.step(next(steps)), args.steps, warmup=3)

    results = {"plain PyTorch": measure("plain")}
    stages = [int(s) for s in args.stages.split(",")]
    for stage in stages:
        cfg.engine.zero_stage = stage
        results[f"DeepSpeed ZeRO-{stage}"] = measure("deepspeed")
    base = results["plain PyTorch"]
    figures = []
    for name, seconds in results.items():
        print(f"{name:18s}: {seconds * 1e3:8.1f} ms/step  ({seconds / base:.3f}x plain)")
        if name != "plain PyTorch":
            stage = int(name[-1])
            figures.append(Figure(f"deepspeed_zero{stage}_ratio", seconds / base, "x plain",
                                  f"<= {TARGET}" if stage in (1, 2) else ""))
    worst = max((f for f in figures if f.target), key=lambda f: f.value, default=None)
    if worst is None:
        print(f"summary: DeepSpeed steps cost {', '.join(f'{f.value:.3f}x' for f in figures)} the plain PyTorch loop "
              "(the target is for ZeRO-1/2, not measured)")
    else:
        print(f"summary: DeepSpeed ZeRO-1/2 step costs at most {worst.value:.3f}x the plain PyTorch loop "
              f"(target <= {TARGET:.2f}x: {'met' if worst.value <= TARGET else 'NOT met'})")
    write_json(figures, args.json)
    return figures


if __name__ == "__main__":
    main()
