"""Sampling cost of MDM-Prime (l = 2) against MDM (l = 1), side by side in one run: for each number of steps, the
network evaluations per sequence (NFE; the sampler reuses a sequence's output while its digits do not change), the
wall time and tokens/s of prime_scale.sampler.sample on the demo-size model.

    python bench/sampling.py [--steps 256,1024] [--num 8] [--config demo] [--subtokens 2]

The models are untrained (seeded initial weights): NFE depends on which digits get revealed when, i.e. on the
masking schedule and the number of sub-tokens, not on the weights, and the wall time depends on the shapes.
One line per (steps, model) with its ratio to MDM at the same steps, then a summary line. Not a timed test.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/sampling.py`: the repo root leads sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import Figure, bench_config, machine_line, parser, set_threads, write_json  # noqa: E402


def main(argv=None) -> list[Figure]:
    p = parser(__doc__)
    p.add_argument("--config", default="demo")
    p.add_argument("--steps", default="256,1024", help="comma-separated numbers of sampling steps")
    p.add_argument("--num", type=int, default=8, help="sequences sampled together (one batch)")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (0 = the config's data.seq_len)")
    p.add_argument("--subtokens", type=int, default=2, help="Prime's l (compared with l = 1)")
    args = p.parse_args(argv)
    set_threads(args.threads)
    import torch

    from prime_scale.model import PrimeTransformer
    from prime_scale.sampler import sample
    from prime_scale.schedules import make_schedule

    print(machine_line())
    models = {}
    for l in (1, args.subtokens):
        cfg = bench_config(args.config, (f"prime.num_subtokens={l}",))
        torch.manual_seed(0)
        models[l] = PrimeTransformer.from_config(cfg).eval()
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
    print(f"summary: Prime l={args.subtokens} vs MDM: " + "; ".join(summary))
    write_json(figures, args.json)
    return figures


if __name__ == "__main__":
    main()
