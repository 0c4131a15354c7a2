"""Checkpoint I/O of a DeepSpeed run through prime_scale.checkpoint.CheckpointStore (one rank, ZeRO-1), side by
side in one run with a dd-style write and read of the same number of bytes on the same disk (target: save and load
MB/s >= 0.7x dd), and the training stall a save causes (the step with a save minus a normal step).

    python bench/checkpoint.py [--d-model 256] [--layers 8] [--vocab 1024] [--dir /tmp] [--repeats 5] [--no-async]

Save MB/s is the CheckpointStore.save call, which is durable on its own on a local disk (it fsyncs every file it
wrote and its folders before the manifest, then writes the manifest and latest.json with fsync, rename, fsync of
the folder), against dd's write, which is fsync'd too; what the training loop waits for is that same call. Each
repeat also times one save with os.fsync made a no-op (its files are fsync'd afterwards, untimed, so that the next
save finds no dirty pages of it): the line gives that rate and the seconds the fsyncs add to a save. CheckpointStore
saves with torch.save's per-record CRC32 off (torch.load never checks it; with it on the save ran at 0.57x dd). Two
untimed saves come first. Loads and dd's read start from a dropped page cache (posix_fadvise DONTNEED). The async line measures
DeepSpeed's decoupled checkpoint writer ("checkpoint": {"writer": {"type": "python", "decoupled": true}}: a
separate process writes, the engine commits at the next optimizer step) with engine.save_checkpoint directly,
because CheckpointStore writes its commit marker right after save_checkpoint returns. Not a timed test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional
from unittest import mock

if __package__ in (None, ""):  # run as `python bench/checkpoint.py`: the repo root leads sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import (  # noqa: E402
    Figure, bench_config, evict, files_under, fsync_files, machine_line, make_trainer, parser, read_files,
    set_threads, timings, write_file, write_json,
)

TARGET = 0.7
MB = 1e6
# "data_parallel": "replica" (every rank writes its own files): without it DeepSpeed 0.19.8 fails in its writer set-up
# (UniversalParallelInfo has no dp_rank) when there is no model-parallel unit
ASYNC_WRITER = {"checkpoint": {"writer": {"type": "python", "decoupled": True, "data_parallel": "replica"}}}


def main(argv=None) -> list[Figure]:
    p = parser(__doc__)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="saves, loads and dd runs (the median counts)")
    p.add_argument("--steps", type=int, default=5, help="normal steps timed for the stall baseline")
    p.add_argument("--dir", default=None, help="where to write (default: the system's temporary folder)")
    p.add_argument("--no-async", action="store_true", help="skip DeepSpeed's decoupled (async) writer")
    args = p.parse_args(argv)
    set_threads(args.threads)
    from prime_scale.checkpoint import CheckpointStore

    cfg = bench_config("demo", (
        f"model.d_model={args.d_model}", f"model.n_layer={args.layers}", f"model.n_head={max(1, args.d_model // 64)}",
        f"data.vocab_size={args.vocab}", f"data.seq_len={args.seq_len}", f"train.batch_size={args.batch}",
        f"engine.zero_stage={args.zero_stage}", "train.device=cpu"))
    print(machine_line())
    trainer = make_trainer(cfg, "deepspeed")
    engine = trainer.engine
    micro = iter(range(10**9))
    normal = statistics.median(timings(lambda: trainer.step(next(micro)), args.steps, warmup=3))
    root = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir))
    figures = []
    try:
        store = CheckpointStore(str(root / "ckpt"), keep_last=1)
        counter = iter(range(1, 10**9))

        def save_once(durable: bool = True) -> tuple[float, float, list[str], int]:
            """(save call, stall, files, their bytes): a normal step, then a step with a save; the stall is their
            difference (paired, so drift on a shared machine cancels). ``durable=False``: os.fsync is a no-op during
            the save, and the files are fsync'd after it, untimed."""
            start = time.perf_counter()
            trainer.step(next(micro))
            normal_now = time.perf_counter() - start
            start = time.perf_counter()
            trainer.step(next(micro))
            stepped = time.perf_counter()
            step = next(counter)
            with mock.patch.object(os, "fsync", lambda fd: None) if not durable else contextlib.nullcontext():
                tag = store.save(engine, step, {"step": step}, {"rng": None})
            saved = time.perf_counter()
            files = files_under(root / "ckpt" / tag)
            if not durable:
                fsync_files(files)
            return saved - stepped, saved - start - normal_now, files, sum(os.path.getsize(f) for f in files)

        dd_path = root / "dd.bin"
        for durable in (True, False):  # untimed: the first saves of a process run slower (allocation, first writes)
            save_once(durable)
        saves, undurable, dd_writes = [], [], []
        for _ in range(args.repeats):  # interleaved, so that the disk's state drifts alike for all three
            undurable.append(save_once(durable=False))
            saves.append(save_once())  # last: keep_last=1 keeps its files, for the loads below
            start = time.perf_counter()
            write_file(dd_path, saves[-1][3])
            dd_writes.append(time.perf_counter() - start)
        files = saves[-1][2]
        tag = Path(files[0]).parent.name
        nbytes = saves[-1][3]
        print(f"model d={args.d_model} L={args.layers} C={args.vocab}: {trainer.model.num_params() / 1e6:.2f}M params, "
              f"ZeRO-{args.zero_stage} checkpoint of {len(files)} files, {nbytes / MB:.1f} MB; normal step "
              f"{normal * 1e3:.1f} ms")

        loads, dd_reads = [], []
        for _ in range(args.repeats):
            evict(files)
            start = time.perf_counter()
            store.load(engine, tag)
            loads.append(time.perf_counter() - start)
            evict([dd_path])
            start = time.perf_counter()
            assert read_files([dd_path]) == nbytes
            dd_reads.append(time.perf_counter() - start)

        med = statistics.median
        save_s, nofsync_s = med(s[0] for s in saves), med(s[0] for s in undurable)
        save_rate, nofsync_rate = nbytes / save_s / MB, nbytes / nofsync_s / MB
        load_rate = nbytes / med(loads) / MB
        dd_w, dd_r = nbytes / med(dd_writes) / MB, nbytes / med(dd_reads) / MB
        stall = med(s[1] for s in saves)
        print(f"save (CheckpointStore, durable): {save_rate:8.1f} MB/s  ({save_rate / dd_w:.2f}x dd write; the call "
              f"takes {save_s * 1e3:.0f} ms)")
        print(f"save, os.fsync a no-op         : {nofsync_rate:8.1f} MB/s  (not durable; the call takes "
              f"{nofsync_s * 1e3:.0f} ms: the fsyncs add {(save_s - nofsync_s) * 1e3:.0f} ms)")
        print(f"dd write (4 MiB writes, fsync)  : {dd_w:8.1f} MB/s")
        print(f"load (CheckpointStore, cold)    : {load_rate:8.1f} MB/s  ({load_rate / dd_r:.2f}x dd read)")
        print(f"dd read (4 MiB reads, cold)     : {dd_r:8.1f} MB/s")
        print(f"stall: the step with a save takes {stall * 1e3:.1f} ms more than a normal step "
              f"({(normal + stall) / normal:.2f}x a normal step)")
        figures = [Figure("ckpt_save_over_dd", save_rate / dd_w, "x", f">= {TARGET}"),
                   Figure("ckpt_load_over_dd", load_rate / dd_r, "x", f">= {TARGET}"),
                   Figure("ckpt_save_MBps", save_rate, "MB/s"), Figure("ckpt_load_MBps", load_rate, "MB/s"),
                   Figure("ckpt_save_call_ms", save_s * 1e3, "ms"),
                   Figure("ckpt_save_call_nofsync_ms", nofsync_s * 1e3, "ms", note="os.fsync a no-op: not durable"),
                   Figure("ckpt_dd_write_MBps", dd_w, "MB/s"), Figure("ckpt_dd_read_MBps", dd_r, "MB/s"),
                   Figure("ckpt_stall_ms", stall * 1e3, "ms")]
        async_note = "not measured (--no-async)"
        for stage in ([] if args.no_async else dict.fromkeys([args.zero_stage, 0])):  # ZeRO-0 if the run's fails
            cfg.engine.zero_stage = stage
            async_stall, why = decoupled_stall(cfg, root / f"async{stage}", args.repeats)
            if async_stall is None:
                print(f"async (DeepSpeed decoupled writer), ZeRO-{stage}: fails here: {why}")
                async_note = f"fails at ZeRO-{stage}"
                continue
            versus = f" ({async_stall / stall:.2f}x the synchronous ZeRO-{args.zero_stage} stall)" if stall > 0 else ""
            print(f"async (DeepSpeed decoupled writer), ZeRO-{stage}: a step with a save plus the next step take "
                  f"{async_stall * 1e3:.1f} ms more than two normal steps{versus}")
            figures.append(Figure(f"ckpt_async_zero{stage}_stall_ms", async_stall * 1e3, "ms"))
            async_note += f"; {async_stall * 1e3:.0f} ms at ZeRO-{stage}"
            break
        print(f"summary: durable save {save_rate / dd_w:.2f}x and load {load_rate / dd_r:.2f}x the dd rates (target >= "
              f"{TARGET}: {'met' if min(save_rate / dd_w, load_rate / dd_r) >= TARGET else 'NOT met'}); the save call "
              f"takes {save_s * 1e3:.0f} ms, {nofsync_s * 1e3:.0f} ms without fsync; a save stalls training "
              f"{stall * 1e3:.0f} ms; async stall {async_note}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write_json(figures, args.json)
    return figures


def decoupled_stall(cfg, folder: Path, repeats: int) -> tuple[Optional[float], str]:
    """(seconds a decoupled save adds to the save step plus the next step, where the engine waits for the writer
    to commit, median of ``repeats``; or None, and why it could not be measured)."""
    # the writer reads the machine layout from variables that only DeepSpeed's own launcher sets (one machine here)
    os.environ.setdefault("CROSS_RANK", "0")
    os.environ.setdefault("CROSS_SIZE", "1")
    try:
        trainer = make_trainer(cfg, "deepspeed", ds_config=ASYNC_WRITER)
    except Exception as e:  # e.g. a DeepSpeed without the decoupled writer
        return None, f"{type(e).__name__}: {e}"
    writer = trainer.engine.checkpoint_engine
    try:
        micro = iter(range(10**9))
        timings(lambda: trainer.step(next(micro)), 0, warmup=3)
        stalls = []
        for r in range(repeats):
            start = time.perf_counter()
            trainer.step(next(micro))
            trainer.step(next(micro))
            normal = time.perf_counter() - start
            start = time.perf_counter()
            trainer.step(next(micro))
            trainer.engine.save_checkpoint(str(folder), tag=f"step_{r}", save_latest=False)
            trainer.step(next(micro))  # commits (waits for) the decoupled save before its optimizer step
            stalls.append(time.perf_counter() - start - normal)
        writer.cleanup()
        return statistics.median(stalls), ""
    except Exception as e:
        process = getattr(writer, "ckpt_process", None)
        if process is not None and process.is_alive():  # the writer process DeepSpeed started for this engine
            process.terminate()
            process.join(10)
        writer.commit_info = None
        writer._cleanup_called = True  # nothing left to commit or to stop
        return None, f"{type(e).__name__}: {str(e).split('.')[0]}"


if __name__ == "__main__":
    main()
