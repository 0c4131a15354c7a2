"""Prime's cost over plain MDM, measured side by side in one run: training-step time for l = 1, 2, 4 at the same
width/depth/sequence, and the carry-over + marginal computation alone (target: l = 2 and l = 4 steps <= 1.10x l = 1).

    python bench/prime_overhead.py [--vocab 50257] [--d-model 256] [--layers 4] [--seq-len 256] [--batch 8]
                                   [--repeats 5] [--profile]

The step is bench.common.make_trainer's plain PyTorch loop (the engine's loss, noise, gradient clipping, AdamW and
LR schedule). Each case is timed in rounds over the three models (one step of each per round; medians), so a slow
stretch of the machine hits all of them alike. "carry-over" is prime_scale.diffusion.subtoken_cross_entropy alone
(log-softmax, carry-over, digit cross-entropies), forward and backward, on the same fixed logits with half of the
digits masked. Prints one line per case with its ratio to l = 1, then a summary line. Not a timed test.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/prime_overhead.py`: the repo root leads sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import itertools  # noqa: E402

from bench.common import (Figure, bench_config, interleaved_medians, machine_line, make_trainer, parser,  # noqa: E402
                          random_tokens, set_threads, write_json)

TARGET = 1.10


def measure(args) -> dict[int, tuple[float, float]]:
    """{l: (median training-step seconds, median carry-over forward + backward seconds)} for l = 1, 2, 4, each
    timed in rounds over the three cases (bench.common.interleaved_medians)."""
    import torch  # here, not at the top: --help needs no torch

    from prime_scale import diffusion

    models, steps = {}, {}
    for l in (1, 2, 4):
        cfg = bench_config(None, (
            f"model.d_model={args.d_model}", f"model.n_layer={args.layers}", f"model.n_head={args.heads}",
            f"data.seq_len={args.seq_len}", f"train.batch_size={args.batch}", f"data.vocab_size={args.vocab}",
            f"prime.num_subtokens={l}", "train.device=cpu"))
        trainer = make_trainer(cfg, "plain")
        models[l], steps[l] = trainer.model, lambda t=trainer, i=itertools.count(): t.step(next(i))
    step_s = interleaved_medians(steps, args.repeats)
    if args.profile:
        profile_steps(steps)
    del steps  # the optimizers' states

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(args.batch, args.seq_len, args.vocab, generator=g, requires_grad=True)
    weights = torch.rand(args.batch, args.seq_len, 4, generator=g)
    masked = torch.rand(args.batch, args.seq_len, 4, generator=g) < 0.5
    tokens = random_tokens(cfg, args.batch)

    def carry_over(codec):
        clean = codec.encode(tokens)
        noisy = torch.where(masked[..., :codec.num_subtokens], codec.mask_id, clean)
        ce = diffusion.subtoken_cross_entropy(logits, noisy, clean, codec)
        torch.autograd.grad((ce * weights[..., :codec.num_subtokens]).sum(), logits)

    carry_s = interleaved_medians({l: lambda codec=m.codec: carry_over(codec) for l, m in models.items()}, args.repeats)
    out = {}
    for l, model in models.items():
        out[l] = (step_s[l], carry_s[l])
        print(f"l={l} b={model.codec.base:<6d} params {model.num_params() / 1e6:7.2f}M  step {step_s[l] * 1e3:8.1f} ms "
              f"({step_s[l] / step_s[1]:.2f}x l=1)  carry-over fwd+bwd {carry_s[l] * 1e3:7.1f} ms "
              f"({carry_s[l] / carry_s[1]:.2f}x l=1)", flush=True)
    return out


def profile_steps(steps: dict, rows: int = 12) -> None:
    """torch.profiler of 3 steps of each model: self CPU ms per step of the largest ops, side by side."""
    from torch.profiler import ProfilerActivity, profile

    per_op = {}
    for l, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        per_op[l] = {e.key: e.self_cpu_time_total / 3e3 for e in prof.key_averages()}
    print("profile, self CPU ms per step:  " + "  ".join(f"{'l=' + str(l):>8s}" for l in per_op))
    for key in sorted(set().union(*per_op.values()), key=lambda k: -max(p.get(k, 0) for p in per_op.values()))[:rows]:
        print(f"  {key[:40]:40s}" + "  ".join(f"{p.get(key, 0):8.1f}" for p in per_op.values()))
    print("  " + f"{'all ops':40s}" + "  ".join(f"{sum(p.values()):8.1f}" for p in per_op.values()))


def main(argv=None) -> list[Figure]:
    p = parser(__doc__)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler op table per l")
    args = p.parse_args(argv)
    set_threads(args.threads)
    print(machine_line())
    print(f"vocab {args.vocab}, d_model {args.d_model}, layers {args.layers}, seq {args.seq_len}, batch {args.batch}")
    steps = measure(args)
    figures = []
    for l in (2, 4):
        figures += [Figure(f"prime_l{l}_step_ratio", steps[l][0] / steps[1][0], "x l=1", f"<= {TARGET}"),
                    Figure(f"prime_l{l}_carry_over_ratio", steps[l][1] / steps[1][1], "x l=1")]
    ratios = [steps[l][0] / steps[1][0] for l in (2, 4)]
    print(f"summary: Prime step time over MDM: l=2 {ratios[0]:.2f}x, l=4 {ratios[1]:.2f}x (target <= {TARGET:.2f}x: "
          f"{'met' if max(ratios) <= TARGET else 'NOT met'})")
    write_json(figures, args.json)
    return figures


if __name__ == "__main__":
    main()
