"""Framework overhead: the DeepSpeed engine's training step against a plain PyTorch loop, on the same model,
batch and noise, measured side by side in one process (one rank, gloo, CPU here; target <= 1.10x for ZeRO-1/2).

    python bench/engine_overhead.py [--d-model 256] [--layers 4] [--seq-len 256] [--batch 16] [--steps 20]

Both loops do what a training step does: NELBO forward, backward, gradient clipping at 1.0, AdamW, LR schedule.
Prints one line per case with its ratio to the plain loop, then a summary line. Not a timed test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prime_scale.config import load_config
from prime_scale.diffusion import nelbo
from prime_scale.engine import Geometry, deepspeed_config, init_distributed, noise_generator
from prime_scale.model import PrimeTransformer
from prime_scale.schedules import make_schedule
from prime_scale.optim import build_optimizer, learning_rate


def step_times(step, steps: int, warmup: int = 3) -> list[float]:
    for i in range(warmup):
        step(i)
    times = []
    for i in range(warmup, warmup + steps):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--subtokens", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    import deepspeed

    init_distributed()
    cfg = load_config([f"model.d_model={args.d_model}", f"model.n_layer={args.layers}", f"model.n_head={args.d_model // 64}",
                       f"data.seq_len={args.seq_len}", f"train.batch_size={args.batch}", f"data.vocab_size={args.vocab}",
                       f"prime.num_subtokens={args.subtokens}", "train.warmup_steps=2"])
    schedule = make_schedule(cfg.diffusion)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    print(f"model d={args.d_model} L={args.layers} seq={args.seq_len} batch={args.batch} C={args.vocab} "
          f"l={args.subtokens}, {torch.get_num_threads()} threads")

    torch.manual_seed(0)
    model = PrimeTransformer.from_config(cfg)
    optimizer = build_optimizer(model, cfg.train)

    def plain_step(i: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(i, cfg.train)
        loss = nelbo(model, tokens, model.codec, schedule, noise_generator(0, 0, i, "cpu")).per_token
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()

    results = {"plain PyTorch": statistics.median(step_times(plain_step, args.steps))}
    for stage in (0, 1, 2):
        torch.manual_seed(0)
        model = PrimeTransformer.from_config(cfg)
        opt = build_optimizer(model, cfg.train)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: learning_rate(s, cfg.train) / cfg.train.lr)
        cfg.engine.zero_stage = stage
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                               config=deepspeed_config(cfg, Geometry.resolve(args.batch, 0, 1, 0, 0)))

        def ds_step(i: int, engine=engine, model=model) -> None:
            loss = nelbo(engine, tokens, model.codec, schedule, noise_generator(0, 0, i, "cpu")).per_token
            engine.backward(loss)
            engine.step()

        results[f"DeepSpeed ZeRO-{stage}"] = statistics.median(step_times(ds_step, args.steps))
    base = results["plain PyTorch"]
    for name, seconds in results.items():
        print(f"{name:18s}: {seconds * 1e3:8.1f} ms/step  ({seconds / base:.3f}x plain)")
    worst = max(results[f"DeepSpeed ZeRO-{s}"] / base for s in (1, 2))
    print(f"summary: DeepSpeed ZeRO-1/2 step costs at most {worst:.3f}x the plain PyTorch loop (target <= 1.10x)")


if __name__ == "__main__":
    main()
