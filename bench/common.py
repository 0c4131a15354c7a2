"""What every benchmark shares: timing, the machine it ran on, the training step it measures, the matmul peak,
and figures with their targets (which ``run_all.py`` collects and marks MET / NOT MET).

A benchmark script is ``main(argv) -> list[Figure]``: it prints one line per case with its figures and ratio and
a last line ``summary: ...``; ``--json PATH`` also writes its figures, so ``run_all.py`` can run it in a fresh
process and read them back.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]


def fresh_process_env() -> dict[str, str]:
    """The environment of a benchmark's child process (a script, a training): this one's, without a launcher's
    rank variables (they would make the child join this process's group instead of making its own), with the
    repository first on PYTHONPATH."""
    from prime_scale.run_context import RENDEZVOUS_VARIABLES

    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARIABLES}
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)}


# ---------------------------------------------------------------------------------------------------- timing

def timings(fn: Callable[[], object], repeats: int, warmup: int = 2, sync: Callable[[], None] = lambda: None
            ) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones. ``sync`` waits for queued device
    work (``torch.cuda.synchronize``) before each clock reading."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _median(times: list[float]) -> float:
    return sorted(times)[len(times) // 2]


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2,
                   sync: Callable[[], None] = lambda: None) -> float:
    """The median of ``timings`` (robust to a stray slow call on a shared machine)."""
    return _median(timings(fn, repeats, warmup, sync))


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                        sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median wall seconds of each of ``fns``, timed in rounds (one call of each per round) so that a slow
    stretch of the machine falls on every case alike and the ratios between them stay honest."""
    for fn in fns.values():
        timings(fn, 0, warmup, sync)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name] += timings(fn, 1, 0, sync)
    return {name: _median(t) for name, t in times.items()}


def device_sync(device) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)


# ---------------------------------------------------------------------------------------------------- files

IO_CHUNK = 4 << 20


def evict(paths) -> None:
    """Ask the kernel to drop these files' clean pages from the page cache (fsync first for freshly written ones),
    so the next read comes from the disk; a no-op where posix_fadvise is missing."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_files(paths, chunk: int = IO_CHUNK) -> int:
    """Read the files sequentially in ``chunk``-byte reads into one reused buffer (dd's read); returns the bytes."""
    buf = bytearray(chunk)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def fsync_files(paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_file(path, nbytes: int, chunk: int = IO_CHUNK) -> None:
    """dd's write: ``nbytes`` of incompressible bytes in ``chunk``-byte writes, then fsync."""
    block = os.urandom(chunk)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, block[: min(chunk, left)])
        os.fsync(fd)
    finally:
        os.close(fd)


def files_under(folder) -> list[str]:
    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------- figures

@dataclass
class Figure:
    """One reported number. ``target`` is "" (informational) or ">= X" / "<= X" on ``value``."""

    name: str
    value: float
    unit: str = ""
    target: str = ""
    note: str = ""

    def met(self) -> Optional[bool]:
        if not self.target:
            return None
        op, threshold = self.target.split()
        return self.value >= float(threshold) if op == ">=" else self.value <= float(threshold)

    def verdict(self) -> str:
        return {True: "MET", False: "NOT MET", None: "(no target)"}[self.met()]

    def formatted(self) -> str:
        value = f"{self.value:,.4g}" if abs(self.value) < 1e4 else f"{self.value:,.0f}"
        return f"{value}{' ' + self.unit if self.unit else ''}"



def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The kB fields of /proc/PID/status (VmRSS, VmHWM, RssShmem, ...) as bytes (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith(" kB"):
            fields[key] = int(value.split()[0]) * 1024
    return fields

def write_json(figures: list[Figure], path: Optional[str]) -> None:
    if path:
        Path(path).write_text(json.dumps([asdict(f) for f in figures], indent=1))


def read_json(path: str) -> list[Figure]:
    return [Figure(**d) for d in json.loads(Path(path).read_text())]


# ---------------------------------------------------------------------------------------------------- CLI

def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark has: --threads, --json."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0 = torch's default, one per core)")
    p.add_argument("--json", default="", help="also write the figures to this file (run_all.py reads it)")
    return p


def set_threads(threads: int) -> int:
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> dict:
    import torch

    info = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "nproc": os.cpu_count(),
            "cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_line() -> str:
    m = machine()
    gpu = f", GPU {m['gpu']}" if "gpu" in m else ""
    return (f"machine: {m['nproc']} cores ({m['cpu']}){gpu}, torch {m['torch']}, {m['threads']} threads, "
            f"load average {m['load_avg']:.2f}, {m['date']}")


# ---------------------------------------------------------------------------------------------------- workloads

def bench_config(config: Optional[str] = "demo", overrides: tuple[str, ...] = ()):
    """A run config as the engine would load it: ``config=NAME`` (None: the defaults) plus dotted overrides."""
    from prime_scale.config import load_config

    return load_config(([f"config={config}"] if config else []) + list(overrides))


def random_tokens(cfg, batch: int, device="cpu", seed: int = 0):
    """A (batch, seq_len) batch of valid token ids: the step's cost does not depend on which ids they are."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.data.vocab_size, (batch, cfg.data.seq_len), generator=g).to(device)


def fused_adamw(optimizer):
    """The same parameter groups and hyper-parameters as ``optim.build_optimizer``, in torch's fused AdamW kernel
    (one kernel for all tensors, CUDA and CPU)."""
    import torch

    drop = ("fused", "foreach", "initial_lr")
    groups = [{k: v for k, v in g.items() if k not in drop} for g in optimizer.param_groups]
    return torch.optim.AdamW(groups, fused=True)


@dataclass
class BenchTrainer:
    """One training step of a config, as a function of the micro-step, on a fixed batch with the engine's
    per-step noise. With the DeepSpeed engine it is ``prime_scale.trainer.Trainer.step`` itself (the NaN guard and
    stop agreement, the gradient norm on logged steps, DeepSpeed's clipping and AdamW step); the plain loop is a
    PyTorch twin to compare it with."""

    step: Callable[[int], float]
    model: object  # the network (a PrimeTransformer)
    engine: object  # the DeepSpeed engine, or None for the plain PyTorch loop
    tokens_per_step: int
    device: object
    trainer: object = None  # the prime_scale Trainer (DeepSpeed engine only)

    def sync(self) -> None:
        device_sync(self.device)()


def make_trainer(cfg, engine: str = "plain", device: str = "cpu", compile: bool = False, fused: bool = False,
                 sdpa_fused_only: bool = False, seed: int = 0, ds_config: Optional[dict] = None) -> BenchTrainer:
    """``engine`` "plain" (a PyTorch loop) or "deepspeed" (prime_scale's Trainer, built as the engine builds it:
    ZeRO stage ``cfg.engine.zero_stage``, bf16 mode when ``cfg.train.dtype`` says so; one rank, or every rank of a
    torchrun launch, each stepping on its own micro-batch of ``engine.micro_batch_size`` sequences, so that a step
    is one micro-step and ``train.batch_size`` stays the global batch). ``compile``: torch.compile
    (DeepSpeed's ``engine.compile()``). ``fused``: fused AdamW. ``sdpa_fused_only``: attention may use only the
    flash / memory-efficient / cuDNN kernels (an error rather than a silent fallback to the math kernel; GPU).
    ``ds_config``: keys added to the engine's DeepSpeed config (e.g. a checkpoint writer). ``seed``: the weights'
    and the noise's seed (train.seed)."""
    import dataclasses

    import torch

    from prime_scale.model import PrimeTransformer
    from prime_scale.objective import sequence_loss
    from prime_scale.optim import build_optimizer, learning_rate
    from prime_scale.trainer import noise_generator

    device = torch.device(device)
    batch = cfg.train.batch_size
    tokens = random_tokens(cfg, batch, device)
    attention = nullcontext
    if sdpa_fused_only:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
        attention = lambda: sdpa_kernel(backends)  # noqa: E731

    if engine == "plain":
        torch.manual_seed(seed)
        model = PrimeTransformer.from_config(cfg)
        optimizer = build_optimizer(model, cfg.train)
        model.to(device)
        if fused:
            optimizer = fused_adamw(optimizer)
        net = torch.compile(model) if compile else model
        bf16 = cfg.train.dtype == "bfloat16"
        autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

        def step(i: int) -> float:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(i, cfg.train)
            with autocast(), attention():
                loss = sequence_loss(net, tokens, cfg, noise_generator(seed, 0, i, device)).per_token
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            return loss.item()

        return BenchTrainer(step, model, None, batch * cfg.data.seq_len, device)

    if engine != "deepspeed":
        raise ValueError(f"engine must be 'plain' or 'deepspeed', got {engine!r}")
    from prime_scale.run_context import RunContext
    from prime_scale.trainer import Geometry, Trainer, build_engine

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed, log_every=0))
    # the process group lives as long as the benchmark's process (a script, or a process of its own per case)
    ctx = RunContext(cfg.train.device, cfg.engine.collective_timeout_minutes).__enter__()
    geo = Geometry.of(cfg, ctx)
    ds, scheduler = build_engine(cfg, geo, optimizer_factory=fused_adamw if fused else None, extra=ds_config)
    if compile and not cfg.engine.compile:
        ds.compile()
    trainer = Trainer(cfg, ctx, geo, ds, scheduler)
    tokens = tokens[: geo.micro_batch].cpu()  # the loader's batches are host tensors; step moves them

    def ds_step(i: int) -> float:
        trainer.progress.micro_step = i  # any micro-step: its noise is a pure function of (seed, rank, i)
        with attention():
            result = trainer.step([(i, tokens)])
        return result.loss_sum.item()

    return BenchTrainer(ds_step, ds.module, ds, batch * cfg.data.seq_len, device, trainer)


def matmul_peak(size: int, dtype: str = "float32", device: str = "cpu", repeats: int = 5) -> float:
    """Dense FLOP/s of ``torch.matmul`` of two size x size matrices in ``dtype``: the best of ``repeats`` (the
    machine's attainable peak with the current intra-op threads)."""
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(size, size, device=device).to(dt)
    b = torch.randn(size, size, device=device).to(dt)
    best = min(timings(lambda: torch.matmul(a, b), repeats, warmup=1, sync=device_sync(device)))
    return 2.0 * size**3 / best
