"""The training data path: the loader's tokens/s from local shards, side by side in one run with
- what a demo-size training step consumes (tokens/s of its step, measured here; target: loader >= 20x that), and
- a raw sequential read of the same shard bytes (dd-style 4 MiB reads; the loader/raw ratio is what parsing the tars,
  permuting the samples and building the batches costs).

    python bench/data_path.py [--data auto] [--batch 32] [--workers 0] [--steps 0] [--train-steps 5]
                              [--group-mb 256] [--io-workers 4]

--data: a folder of prepared shards, "synthetic" (python -m data_prep.synthetic config=demo into a temporary
folder), or "auto" (data/pydocs, the text demo's shards, when they exist, else synthetic). Reads are timed twice:
"cold" after asking the kernel to drop the shards from the page cache (posix_fadvise DONTNEED), and "warm".

Side by side in the same run, on a synthetic dataset of random uint16 tokens (seq 1024) whose groups hold
--group-mb MiB of tokens (default 256: shuffle_shards=4 shards of 64 MiB, about OpenWebText's layout), one epoch
read by --io-workers DataLoader workers (default 4, one group each) through a filesystem that logs every read of
every process:
- bytes read per epoch over the shards' bytes (target <= 1.05x: each group is read by one worker, once), and
- each worker's memory growth, its peak (VmHWM) over the VmRSS first seen when it started (polled from
  /proc/PID/status every 2 ms), over one group in the shard dtype (target <= 2x).
Not a timed test.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem

if __package__ in (None, ""):  # run as `python bench/data_path.py`: the repo root leads sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import (  # noqa: E402
    REPO, Figure, bench_config, evict, machine_line, make_trainer, median_seconds, parser, proc_status, read_files,
    set_threads, write_json,
)
from prime_scale.data.shards import ShardWriter, write_manifest  # noqa: E402

TARGET = 20.0
BYTES_TARGET = 1.05
RSS_TARGET = 2.0


class CountingFileSystem(LocalFileSystem):
    """The local filesystem under ``countfs://``: every read by any process (DataLoader workers too) is logged as
    ``path offset bytes`` to ``log_dir/PID.log``, so what the loader reads can be counted exactly."""

    protocol = "countfs"
    log_dir = ""

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        if "r" not in mode:
            return super()._open(path, mode, block_size, **kwargs)
        return _CountingFile(self._strip_protocol(path), mode, fs=self, **kwargs)


class _CountingFile(LocalFileOpener):
    def _log(self, at: int, n: int) -> None:
        with open(os.path.join(CountingFileSystem.log_dir, f"{os.getpid()}.log"), "a") as log:
            log.write(f"{self.path} {at} {n}\n")

    def read(self, *args, **kwargs):
        at = self.f.tell()
        data = self.f.read(*args, **kwargs)
        self._log(at, len(data))
        return data

    def readinto(self, buffer):
        at = self.f.tell()
        n = self.f.readinto(buffer)
        self._log(at, n or 0)
        return n


def counting_url(path: str, log_dir: str) -> str:
    """``path`` as a countfs:// URL whose reads are logged under ``log_dir`` (see ``reads``)."""
    fsspec.register_implementation(CountingFileSystem.protocol, CountingFileSystem, clobber=True)
    CountingFileSystem.log_dir = log_dir
    return f"{CountingFileSystem.protocol}://{path}"


def reads(log_dir: str) -> list[tuple[int, str, int, int]]:
    """(pid, path, offset, bytes) of every read logged under ``log_dir``."""
    out = []
    for log in Path(log_dir).glob("*.log"):
        for line in log.read_text().splitlines():
            path, at, n = line.rsplit(" ", 2)
            out.append((int(log.stem), path, int(at), int(n)))
    return out


class ChildMemory(threading.Thread):
    """Polls this process's child processes (DataLoader workers): the VmRSS and RssShmem first seen, and the last
    VmHWM (the peak) seen before the child exits."""

    def __init__(self, every_s: float = 0.002):
        super().__init__(daemon=True)
        self.every_s, self.first, self.peak = every_s, {}, {}
        self._done = threading.Event()

    def children(self) -> list[int]:
        pids = []
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            try:
                pids += [int(p) for p in (task / "children").read_text().split()]
            except OSError:  # a thread that ended meanwhile
                pass
        return pids

    def run(self) -> None:
        while not self._done.is_set():
            for pid in self.children():
                try:
                    status = proc_status(pid)
                except OSError:
                    continue
                if "VmHWM" in status:  # not in a zombie's status
                    self.first.setdefault(pid, status)
                    self.peak[pid] = status["VmHWM"]
            time.sleep(self.every_s)

    def stop(self) -> None:
        self._done.set()
        self.join()


def write_random_shards(url: str, group_mb: float, shuffle_shards: int, groups: int, seq_len: int = 1024) -> dict:
    """A dataset of random uint16 tokens: ``groups`` groups of ``group_mb`` MiB of tokens each, in shards of
    group_mb / shuffle_shards MiB of tokens, written with the data-prep ShardWriter a shard's rows at a time; its
    manifest."""
    per_shard = max(1, int(group_mb * 2**20 / shuffle_shards) // (2 * seq_len))
    shard_bytes = per_shard * (512 + -(-2 * seq_len // 512) * 512) + 2 * 512  # headers, padded tokens, the end
    rng = np.random.default_rng(0)
    key = 0
    with ShardWriter(url, lambda i: f"train-{i:06d}.tar", shard_bytes) as writer:
        for _ in range(groups * shuffle_shards):
            for row in rng.integers(0, 2**16, (per_shard, seq_len), dtype=np.uint16):
                writer.write(f"{key:09d}", {"tokens.u16": row.tobytes()})
                key += 1
    manifest = {"seq_len": seq_len, "splits": {"train": {"shards": writer.shards}}}
    write_manifest(url, manifest)
    return manifest


def io_and_memory(tmp: str, group_mb: float, workers: int, shuffle_shards: int = 4) -> list[Figure]:
    """One epoch of a dataset of ``workers`` groups read by as many workers: bytes read and worker memory."""
    from prime_scale.data.loader import StreamPlan, train_loader

    folder, log_dir = os.path.join(tmp, "io"), os.path.join(tmp, "reads")
    os.makedirs(log_dir)
    start = time.perf_counter()
    manifest = write_random_shards(folder, group_mb, shuffle_shards, workers)
    shard_bytes = sum(s["bytes"] for s in manifest["splits"]["train"]["shards"])
    print(f"io dataset: {len(manifest['splits']['train']['shards'])} shards of random uint16 tokens, "
          f"{shard_bytes / 2**20:,.0f} MiB, written in {time.perf_counter() - start:.0f} s")
    sizes = tuple(s["samples"] for s in manifest["splits"]["train"]["shards"])
    epoch = StreamPlan(sizes, 1, 0, 32, 0, shuffle_shards).steps_per_epoch
    memory = ChildMemory()
    with warnings.catch_warnings():  # more workers than cores is this measurement's point
        warnings.filterwarnings("ignore", "This DataLoader will create")
        loader, plan = train_loader(counting_url(folder, log_dir), "train", 1024, 32, seed=0, max_steps=epoch,
                                    num_workers=workers, shuffle_shards=shuffle_shards, manifest=manifest)
        group = int(np.diff(plan.group_bounds(0)).max()) * 1024 * 2
        memory.start()
        start = time.perf_counter()
        main_before = proc_status(os.getpid())["VmRSS"]
        steps = sum(1 for _ in loader)
    seconds = time.perf_counter() - start
    main_peak = proc_status(os.getpid())["VmHWM"]
    memory.stop()
    assert steps == plan.steps_per_epoch, steps
    logged = reads(log_dir)
    total = sum(n for _, _, _, n in logged)
    readers = {pid for pid, _, _, n in logged if n > 512}
    growth = {pid: memory.peak[pid] - first["VmRSS"] for pid, first in memory.first.items()}
    worst = max(growth.values()) if growth else float("nan")
    print(f"epoch with {workers} workers, groups of {group / 2**20:.0f} MiB (uint16): {steps} steps in {seconds:.1f} s "
          f"({shard_bytes / seconds / 2**20:.0f} MiB/s); {total / 2**20:,.1f} MiB read by {len(readers)} processes "
          f"= {total / shard_bytes:.4f}x the shards' bytes")
    for pid, first in sorted(memory.first.items()):
        print(f"  worker {pid}: VmRSS {first['VmRSS'] / 2**20:.0f} MiB when first seen (RssShmem "
              f"{first.get('RssShmem', 0) / 2**20:.1f} MiB), peak VmHWM {memory.peak[pid] / 2**20:.0f} MiB: "
              f"+{growth[pid] / 2**20:.0f} MiB = {growth[pid] / group:.2f}x one group")
    print(f"  main process: VmRSS {main_before / 2**20:.0f} MiB before the epoch, VmHWM {main_peak / 2**20:.0f} MiB")
    return [Figure("epoch_bytes_over_shard_bytes", total / shard_bytes, "x", f"<= {BYTES_TARGET}",
                   f"{workers} workers"),
            Figure("worker_rss_growth_over_group", worst / group, "x", f"<= {RSS_TARGET}",
                   f"groups of {group / 2**20:.0f} MiB")]


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
    p.add_argument("--group-mb", type=float, default=256, help="MiB of tokens per group in the bytes/memory epoch")
    p.add_argument("--io-workers", type=int, default=4, help="DataLoader workers of the bytes/memory epoch")
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
        used = sorted({shard for epoch, group in plan.group_sequence(0, steps)
                       for shard, _, _ in plan.groups(epoch)[group]})
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
        io = io_and_memory(tmp, args.group_mb, args.io_workers)

    cfg = bench_config("demo", (f"train.batch_size={args.batch}", f"data.seq_len={seq_len}"))
    trainer = make_trainer(cfg, "plain")
    micro = iter(range(10**9))
    step_s = median_seconds(lambda: trainer.step(next(micro)), args.train_steps, warmup=2)
    train_rate = trainer.tokens_per_step / step_s
    cold_raw, cold_loader = rates["cold"]
    ratio = cold_loader / train_rate
    print(f"training step (demo model, batch {args.batch} x {seq_len}): {step_s * 1e3:.1f} ms = {train_rate:,.0f} "
          f"tokens/s  (the cold loader supplies {ratio:,.1f}x that)")
    verdict = {True: "met", False: "NOT met"}
    print(f"summary: the loader supplies {ratio:,.1f}x what a demo training step consumes (target >= {TARGET:.0f}x: "
          f"{verdict[ratio >= TARGET]}); loader/raw read {cold_loader / cold_raw:.3f} cold, "
          f"{rates['warm'][1] / rates['warm'][0]:.3f} warm; {args.io_workers} workers read {io[0].value:.4f}x the "
          f"shards' bytes per epoch (target <= {BYTES_TARGET}: {verdict[io[0].met()]}) and grow by at most "
          f"{io[1].value:.2f}x one group (target <= {RSS_TARGET:g}: {verdict[io[1].met()]})")
    figures = [Figure("loader_over_training", ratio, "x", f">= {TARGET}"),
               Figure("loader_tokens_per_s", cold_loader, "tokens/s"),
               Figure("loader_over_raw_cold", cold_loader / cold_raw, "x"),
               Figure("loader_over_raw_warm", rates["warm"][1] / rates["warm"][0], "x"),
               Figure("train_step_tokens_per_s", train_rate, "tokens/s"), *io]
    write_json(figures, args.json)
    return figures


if __name__ == "__main__":
    main()
