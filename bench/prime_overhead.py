"""Prime's cost over plain MDM, measured side by side in one run: training-step time for l = 1, 2, 4 at the same
width/depth/sequence, and the carry-over + marginal computation alone.

    python bench/prime_overhead.py [--vocab 50257] [--d-model 256] [--layers 4] [--seq-len 256] [--batch 8]

Prints one line per case with its ratio to l = 1, then a summary line. Not a timed test.
"""

from __future__ import annotations

import argparse
import time

import torch

from prime_scale.config import DiffusionConfig, ModelConfig, TrainConfig
from prime_scale.diffusion import nelbo, subtoken_cross_entropy
from prime_scale.model import PrimeTransformer
from prime_scale.schedules import make_schedule
from prime_scale.optim import build_optimizer


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    schedule = make_schedule(DiffusionConfig())
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    base_step = base_co = None
    print(f"vocab {args.vocab}, d_model {args.d_model}, layers {args.layers}, seq {args.seq_len}, batch {args.batch}, "
          f"threads {torch.get_num_threads()}")
    for l in (1, 2, 4):
        model = PrimeTransformer(ModelConfig(n_layer=args.layers, d_model=args.d_model, n_head=args.heads), args.vocab, l)
        opt = build_optimizer(model, TrainConfig())
        g = torch.Generator().manual_seed(0)

        def step():
            loss = nelbo(model, tokens, model.codec, schedule, g).per_token
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        logits = torch.randn(args.batch, args.seq_len, args.vocab)
        clean = model.codec.encode(tokens)
        noisy = torch.where(torch.rand(clean.shape, generator=g) < 0.5, model.codec.mask_id, clean)
        carry = lambda: subtoken_cross_entropy(logits, noisy, clean, model.codec)
        t_step = median_seconds(step, args.repeats)
        t_co = median_seconds(carry, args.repeats)
        base_step, base_co = base_step or t_step, base_co or t_co
        print(f"l={l} b={model.codec.base:<6d} params {model.num_params() / 1e6:7.2f}M  step {t_step * 1e3:8.1f} ms "
              f"({t_step / base_step:.2f}x l=1)  carry-over+marginals {t_co * 1e3:7.1f} ms ({t_co / base_co:.2f}x l=1)")
        if l == 4:
            print(f"summary: Prime l=4 step costs {t_step / base_step:.2f}x MDM (target <= 1.10x)")


if __name__ == "__main__":
    main()
