"""The training data path: the loader's tokens/s from local shards, side by side in one run with
- what a demo-size training step consumes (tokens/s of its step, measured here; target: loader >= 20x that), and
- a raw sequential read of the same shard bytes (dd-style 4 MiB reads; the loader/raw ratio is what parsing the tars,
  permuting the samples and building the batches costs).

    python bench/data_path.py [--data auto] [--batch 32] [--workers 0] [--steps 0] [--train-steps 5]

--data: a folder of prepared shards, "synthetic" (python -m data_prep.synthetic config=demo into a temporary
folder), or "auto" (data/pydocs, the text demo's shards, when they exist, else synthetic). Reads are timed twice:
"cold" after asking the kernel to drop the shards from the page cache (posix_fadvise DONTNEED), and "warm".
Not a timed test.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/data_path.py`: the repo root leads sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import (  # noqa: E402
    REPO, Figure, bench_config, evict, machine_line, make_trainer, median_seconds, parser, read_files, set_threads,
    write_json,
)

TARGET = 20.0


def prepare_shards(data: str, tmp: str, sequences: int) -> str:
    if data == "auto":
        data = str(REPO / "data" / "pydocs") if (REPO / "data" / "pydocs" / "manifest.json").exists() else "synthetic"
    if data != "synthetic":
        return data
    from data_prep.synthetic import prepare_markov

    prepare_markov(bench_config("demo", (f"data.path={tmp}", f"data.train_sequences={sequences}",
                                         "data.val_sequences=64")))
    return tmp


def main(argv=None) -> list[Figure]:
    p = parser(__doc__)
    p.add_argument("--data", default="auto", help="shard folder, 'synthetic' or 'auto'")
    p.add_argument("--sequences", type=int, default=20000, help="train sequences of the synthetic shards")
    p.add_argument("--batch", type=int, default=32, help="sequences per loader batch and per training step")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (engine.num_workers)")
    p.add_argument("--steps", type=int, default=0, help="loader batches to time (0 = one epoch)")
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps (the median counts)")
    args = p.parse_args(argv)
    set_threads(args.threads)
    print(machine_line())
    from prime_scale.data.loader import split_shards, train_loader
    from prime_scale.data.shards import read_manifest

    with tempfile.TemporaryDirectory(prefix="bench_data_path_") as tmp:
        url = prepare_shards(args.data, tmp, args.sequences)
        manifest = read_manifest(url)
        seq_len = int(manifest.get("seq_len") or manifest["config"]["data"]["seq_len"])
        _, plan = train_loader(url, "train", seq_len, args.batch, seed=0, manifest=manifest)
        steps = args.steps or plan.steps_per_epoch
        shards = split_shards(manifest, "train")
        used = sorted({int(s) for step in range(steps) for group, _ in plan.locate(step)[1]
                       for s in plan.groups(plan.locate(step)[0])[group]})
        paths = [os.path.join(url, shards[i][0]) for i in used]
        tokens_in_files = sum(shards[i][1] for i in used) * seq_len
        size = sum(os.path.getsize(p) for p in paths)
        source = manifest.get("source")
        kind = source if isinstance(source, str) else manifest.get("fingerprint", {}).get("kind")
        print(f"shards: {url} ({kind or 'prepared'}), {len(paths)} train shards read "
              f"for {steps} batches of {args.batch} x {seq_len} tokens, {size / 2**20:.1f} MiB, {tokens_in_files:,} "
              f"tokens")

        def loader_pass() -> float:
            loader, _ = train_loader(url, "train", seq_len, args.batch, seed=0, max_steps=steps,
                                     num_workers=args.workers, manifest=manifest)
            start = time.perf_counter()
            n = sum(batch.numel() for _, batch in loader)
            assert n == steps * args.batch * seq_len, n
            return time.perf_counter() - start

        def raw_pass() -> float:
            start = time.perf_counter()
            assert read_files(paths) == size
            return time.perf_counter() - start

        loader_tokens = steps * args.batch * seq_len
        rates = {}
        for cache in ("cold", "warm"):
            if cache == "cold":
                evict(paths)
            raw_s = raw_pass()
            if cache == "cold":
                evict(paths)
            loader_s = loader_pass()
            raw_rate, loader_rate = tokens_in_files / raw_s, loader_tokens / loader_s
            rates[cache] = (raw_rate, loader_rate)
            print(f"raw sequential read, {cache} : {size / raw_s / 2**20:9.1f} MiB/s = {raw_rate:14,.0f} tokens/s")
            print(f"loader ({args.workers} workers), {cache} : {loader_rate:14,.0f} tokens/s  "
                  f"({loader_rate / raw_rate:.3f}x raw read)")

    cfg = bench_config("demo", (f"train.batch_size={args.batch}", f"data.seq_len={seq_len}"))
    trainer = make_trainer(cfg, "plain")
    micro = iter(range(10**9))
    step_s = median_seconds(lambda: trainer.step(next(micro)), args.train_steps, warmup=2)
    train_rate = trainer.tokens_per_step / step_s
    cold_raw, cold_loader = rates["cold"]
    ratio = cold_loader / train_rate
    print(f"training step (demo model, batch {args.batch} x {seq_len}): {step_s * 1e3:.1f} ms = {train_rate:,.0f} "
          f"tokens/s  (the cold loader supplies {ratio:,.1f}x that)")
    print(f"summary: the loader supplies {ratio:,.1f}x what a demo training step consumes (target >= {TARGET:.0f}x: "
          f"{'met' if ratio >= TARGET else 'NOT met'}); loader/raw read {cold_loader / cold_raw:.3f} cold, "
          f"{rates['warm'][1] / rates['warm'][0]:.3f} warm")
    figures = [Figure("loader_over_training", ratio, "x", f">= {TARGET}"),
               Figure("loader_tokens_per_s", cold_loader, "tokens/s"),
               Figure("loader_over_raw_cold", cold_loader / cold_raw, "x"),
               Figure("loader_over_raw_warm", rates["warm"][1] / rates["warm"][0], "x"),
               Figure("train_step_tokens_per_s", train_rate, "tokens/s")]
    write_json(figures, args.json)
    return figures


if __name__ == "__main__":
    main()
