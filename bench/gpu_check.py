"""The checks that need a GPU, in one script for a machine with one CUDA device (at most about 8 minutes):

1. the loss head's static (GPU) path against its CPU values at C = 50,257, l = 1, 2, 4, values and gradients, bf16
   logits as the engine gives them;
2. one bf16 engine step (DeepSpeed, ZeRO-0, flash attention) at owt_small's shape (12 x 768, seq 1024, l = 2),
   without and with time conditioning, its ``torch.cuda.max_memory_allocated()`` next to
   prime_scale.memory.estimate, and its MFU against the device's dense bf16 matmul peak measured in the same run
   (goal >= 45%);
3. one sample batch at C = 50,257 (64 steps), its peak memory next to memory.estimate_sample.

    python bench/gpu_check.py [--batch 16] [--steps 10] [--json figures.json]
    python bench/gpu_check.py --device cpu --config tiny --batch 2 --head-rows 256 --vocab 300 --steps 1 \
        --sample-steps 8                                                                             # the code path

On a GPU machine without network, `bash bench/gpu_run.sh` runs it with the wheels bench/gpu_wheels.py made (its
image may lack DeepSpeed and WebDataset). Never run on a GPU in CI (there is none); tests/test_bench.py runs its
code path on the CPU at toy sizes, where memory is not measured. docs/performance.md records what it printed on
the GPUs it ran on.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/gpu_check.py`: the repo root leads sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import (  # noqa: E402
    Figure, bench_config, machine_line, make_trainer, matmul_peak, median_seconds, parser, write_json,
)

MFU_GOAL = 0.45
GiB = 2**30


def loss_head_agrees(rows: int, vocab: int, device: str) -> list[Figure]:
    """The static path on ``device`` against the compact path on the CPU, on the same bf16 logits."""
    import torch

    from bench.common import device_sync

    from prime_scale.codec import SubtokenCodec
    from prime_scale.diffusion import subtoken_cross_entropy

    figures = []
    for l in (1, 2, 4):
        codec = SubtokenCodec(vocab, l)
        g = torch.Generator().manual_seed(l)
        logits = (3 * torch.randn(1, rows, vocab, generator=g)).bfloat16()
        clean = codec.encode(torch.randint(0, vocab, (1, rows), generator=g))
        noisy = torch.where(torch.rand(clean.shape, generator=g) < 0.5, torch.full_like(clean, codec.mask_id), clean)
        weights = torch.rand(clean.shape, generator=g)
        out = {}
        for where, on, compact in (("reference", "cpu", True), ("static", device, False)):
            x = logits.to(on).clone().requires_grad_()
            sync = device_sync(on)
            sync()
            start = time.perf_counter()
            ce = subtoken_cross_entropy(x, noisy.to(on), clean.to(on), codec.to(on), compact=compact)
            (ce * weights.to(on)).sum().backward()
            sync()
            out[where] = (ce.detach().cpu(), x.grad.float().cpu(), time.perf_counter() - start)
        value_err = (out["static"][0] - out["reference"][0]).abs().max().item()
        grad_err = (out["static"][1] - out["reference"][1]).abs().max().item() / out["reference"][1].abs().max().item()
        print(f"loss head l = {l}: {rows:,} rows x C = {vocab:,}: static path on {device} vs compact on cpu: values max "
              f"|diff| {value_err:.2e} nats, gradients {grad_err:.2e} of their max; static fwd+bwd "
              f"{out['static'][2] * 1e3:.1f} ms", flush=True)
        figures += [Figure(f"head_l{l}_value_err", value_err, "nats", "<= 1e-3"),
                    Figure(f"head_l{l}_grad_rel_err", grad_err, "", "<= 1e-2")]
    return figures


def engine_steps(config: str, batch: int, steps: int, peak: float, device: str, sample_steps: int) -> list[Figure]:
    import torch

    from prime_scale.memory import estimate
    from prime_scale.metrics import flops_per_token

    cuda, figures = device == "cuda", []
    for tc in (False, True):
        cfg = bench_config(config, (f"train.device={device}", "train.dtype=bfloat16", "engine.zero_stage=0",
                                    f"train.batch_size={batch}", f"model.time_conditioning={str(tc).lower()}"))
        trainer = make_trainer(cfg, "deepspeed", device, sdpa_fused_only=cuda)
        counter = iter(range(10**9))
        trainer.step(next(counter))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds = median_seconds(lambda t=trainer, c=counter: t.step(next(c)), steps, 2, trainer.sync)
        mfu = flops_per_token(trainer.model, cfg.data.seq_len) * trainer.tokens_per_step / seconds / peak
        name = "time_conditioned" if tc else "plain"
        line = (f"engine step ({name.replace('_', '-')}, batch {batch} x {cfg.data.seq_len}, bf16, ZeRO-0): "
                f"{seconds * 1e3:.1f} ms, {trainer.tokens_per_step / seconds:,.0f} tokens/s, MFU {mfu:.1%} of the "
                "measured bf16 peak")
        figures += [Figure(f"mfu_{name}", mfu, "", f">= {MFU_GOAL}" if cuda else ""),
                    Figure(f"tokens_per_s_{name}", trainer.tokens_per_step / seconds, "tokens/s")]
        if cuda:
            used = torch.cuda.max_memory_allocated()
            predicted = estimate(cfg, 1, batch, "cuda")
            model_bytes = predicted.total - predicted.runtime  # max_memory_allocated sees torch's allocator only
            line += (f"; max_memory_allocated {used / GiB:.2f} GiB vs memory model {model_bytes / GiB:.2f} GiB "
                     f"({used / model_bytes:.2f}x)")
            figures.append(Figure(f"memory_over_model_{name}", used / model_bytes, "x"))
        print(line, flush=True)
        if not tc:
            sample_batch(cfg, trainer.model, figures, device, steps=sample_steps)
        del trainer
        if cuda:
            torch.cuda.empty_cache()
    return figures


def sample_batch(cfg, model, figures: list[Figure], device: str, num: int = 8, steps: int = 64) -> None:
    import dataclasses

    import torch

    from bench.common import device_sync
    from prime_scale.memory import estimate_sample
    from prime_scale.objective import sample_with_config

    cuda = device == "cuda"
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, steps=steps))
    model.eval()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    out = sample_with_config(cfg, model, model.codec, num, seed=0, device=device)
    device_sync(device)()
    seconds = time.perf_counter() - start
    model.train()
    valid = bool((out.tokens < cfg.data.vocab_size).all())
    line = (f"sample: {num} x {cfg.data.seq_len} tokens, {steps} steps, NFE {out.nfe:.0f}, {seconds:.1f} s "
            f"({num * cfg.data.seq_len / seconds:,.0f} tokens/s), every token valid: {valid}")
    figures.append(Figure("sample_tokens_per_s", num * cfg.data.seq_len / seconds, "tokens/s"))
    if cuda:
        used = torch.cuda.max_memory_allocated() - before
        predicted = estimate_sample(cfg, num, "cuda")
        beyond = predicted.total - predicted.runtime - predicted.parameters
        line += f"; peak beyond the weights {used / GiB:.2f} GiB vs memory model {beyond / GiB:.2f} GiB"
        figures.append(Figure("sample_peak_over_model", used / beyond, "x"))
    print(line, flush=True)


def main(argv=None) -> list[Figure]:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=16, help="sequences of 1024 tokens per engine step")
    p.add_argument("--steps", type=int, default=10, help="timed engine steps (the median counts)")
    p.add_argument("--head-rows", type=int, default=8192, help="rows of the loss-head comparison")
    p.add_argument("--vocab", type=int, default=50257, help="C of the loss-head comparison")
    p.add_argument("--config", default="owt_small", help="the engine step's config")
    p.add_argument("--sample-steps", type=int, default=64, help="steps of the sample batch")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the code path at toy sizes")
    args = p.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_check.py needs a CUDA GPU; none is visible here (--device cpu runs its code path)")
    print(machine_line(), flush=True)
    start = time.perf_counter()
    sizes = (4096, 8192) if args.device == "cuda" else (256,)
    peak = max(matmul_peak(n, "bfloat16", args.device) for n in sizes)
    print(f"bf16 matmul peak (measured): {peak / 1e12:,.3f} TFLOP/s", flush=True)
    figures = [Figure("bf16_peak_tflops", peak / 1e12, "TFLOP/s")]
    figures += loss_head_agrees(args.head_rows, args.vocab, args.device)
    figures += engine_steps(args.config, args.batch, args.steps, peak, args.device, args.sample_steps)
    judged = [f for f in figures if f.target]
    missed = [f.name for f in judged if not f.met()]
    mfu = next(f.value for f in figures if f.name == "mfu_plain")
    print(f"summary: {args.config} bf16 MFU {mfu:.1%} (goal >= {MFU_GOAL:.0%}: {'met' if mfu >= MFU_GOAL else 'NOT met'}); "
          f"{len(judged) - len(missed)} of {len(judged)} checks met{' (NOT MET: ' + ', '.join(missed) + ')' if missed else ''}"
          f"; {time.perf_counter() - start:.0f} s", flush=True)
    write_json(figures, args.json)
    return figures


if __name__ == "__main__":
    main()
