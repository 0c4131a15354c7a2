"""Training on DeepSpeed ZeRO: the same loop for one CPU process and for many GPU ranks.

    torchrun --nproc_per_node 2 -m prime_scale.engine config=NAME [key=value ...]
    python launchers/local.py --nproc 2 config=NAME ...      (the same, started for you)

The loop (``train``) reads like this: resolve the batch geometry, build the model and the DeepSpeed engine,
restore the latest checkpoint, then for every micro-step take the batch that belongs to it (a pure function of
seed, step and rank: prime_scale.data.loader), compute the NELBO with noise that is also a pure function of
(seed, rank, step), step the engine, and at optimizer-step boundaries log, evaluate, save, and obey signals.
Because nothing else carries state across steps, a run killed at any point and resumed from its last checkpoint
continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import signal
import socket
import sys
import time
import zlib
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from prime_scale.checkpoint import CheckpointError, CheckpointStore, resolve_resume, rng_state, set_rng_state
from prime_scale.cli import EXIT_FAILED, EXIT_OK, EXIT_RESUMABLE, EXIT_USAGE, config_help, print_error, wants_help
from prime_scale.config import Config, ConfigError, config_to_dict, load_config, save_config
from prime_scale.data.loader import train_loader
from prime_scale.data.manifest import checked_dataset
from prime_scale.data.shards import read_blocks
from prime_scale.ema import EMA
from prime_scale.evaluate import evaluate_nelbo
from prime_scale.metrics import RunLog, Throughput, flops_per_token, format_eta
from prime_scale.model import PrimeTransformer
from prime_scale.objective import loss_name, training_loss
from prime_scale.optim import build_optimizer, learning_rate
from prime_scale.processes import die_with_parent
from prime_scale.runlock import RunLock, RunLocked, training_folders
from prime_scale.sampler import sample_with_config

_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)  # ignored once main's run is over (see main)
_STOP_SIGNALS = (signal.SIGINT, *_SIGNALS)


@dataclass(frozen=True)
class Geometry:
    """How the global batch is made: global = micro_batch * accumulation * world_size."""

    world_size: int
    rank: int
    local_rank: int
    micro_batch: int
    accumulation: int

    @classmethod
    def resolve(cls, global_batch: int, micro_batch: int, world_size: int, rank: int, local_rank: int) -> "Geometry":
        if micro_batch == 0:
            micro_batch = global_batch // world_size
        if micro_batch < 1 or global_batch % (micro_batch * world_size):
            raise ConfigError(
                f"train.batch_size={global_batch} (global) is not a multiple of engine.micro_batch_size="
                f"{micro_batch} x {world_size} ranks; choose a micro batch that divides batch_size / world size"
            )
        return cls(world_size, rank, local_rank, micro_batch, global_batch // (micro_batch * world_size))


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> tuple[int, int, int]:
    """(rank, world size, local rank). Under torchrun/SLURM the env says it; alone, a one-rank group on localhost.
    ``device`` is train.device: auto (CUDA when there is one), cpu or cuda. ``timeout_minutes``: how long a rank
    waits in one collective before it fails (engine.collective_timeout_minutes; docs/engine.md, "Faults")."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator when first imported
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if _use_cuda(device) else "gloo",
                                   timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def _use_cuda(device: str) -> bool:
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def deepspeed_config(cfg: Config, geo: Geometry, universal: bool = False) -> dict:
    return {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": geo.micro_batch,
        "gradient_accumulation_steps": geo.accumulation,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "bf16": {"enabled": cfg.train.dtype == "bfloat16"},
        "steps_per_print": 2**31 - 1,  # our own log line says what matters
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": universal},
    }


def noise_generator(seed: int, rank: int, micro_step: int, device) -> torch.Generator:
    """The masking noise of a micro-step on a rank: a pure function of its coordinates, so resuming needs no RNG
    state, and no two (rank, step) pairs share a stream."""
    entropy = np.random.SeedSequence([seed, rank, micro_step]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


class StopFlag:
    """Signal handlers only set a flag; ranks agree on it at step boundaries (a collective is no signal work).
    A second SIGINT (Ctrl-C twice) stops at once, without the save."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def install(self) -> "StopFlag":
        for s in _STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum:
            raise KeyboardInterrupt
        self.signum = self.signum or signum  # another signal during the save changes nothing

    def previous(self, signum: int):
        """The handler this flag replaced (e.g. submitit's requeue handler), to hand the signal on after a save."""
        return self._previous.get(signum)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _agree(values: list, device) -> list[float]:
    """Element-wise max over ranks (stop flags, save-now flags, non-finite losses; floats or 0-d tensors on the
    device): one small all-reduce."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


@dataclass
class Progress:
    """The training position: what a checkpoint must restore for the run to continue exactly."""

    step: int = 0  # optimizer steps taken
    micro_step: int = 0  # micro-batches consumed (the data position)
    dropped_batches: int = 0  # nan_policy=drop_batch
    wandb_id: str = ""


def prepare_resume(cfg: Config, store: CheckpointStore, world_size: int, rank: int):
    """(store, tag, universal) of the checkpoint to start from, or None. A checkpoint written by another number
    of ranks is converted once to DeepSpeed's universal format (``universal/{tag}``), which loads on any world
    size; the conversion runs on rank 0 while the others wait."""
    start = resolve_resume(store, cfg.ckpt.resume)
    if start is None:
        return None
    source, tag = start
    manifest = source.manifest(tag)
    _check_same_model(manifest["config"], cfg)  # before DeepSpeed meets mismatched tensors
    if manifest["world_size"] == world_size:
        return source, tag, False
    if manifest["zero_stage"] != cfg.engine.zero_stage:
        raise CheckpointError(f"{source.url}/{tag} was written with ZeRO stage {manifest['zero_stage']} by "
                              f"{manifest['world_size']} ranks; to change the number of ranks keep the stage "
                              f"(engine.zero_stage={manifest['zero_stage']})")
    if rank == 0:
        print(f"[prime_scale] {source.url}/{tag} was written by {manifest['world_size']} ranks, this run has "
              f"{world_size}: converting it to a universal checkpoint", flush=True)
        source.to_universal(tag)
    if dist.is_initialized():
        dist.barrier()
    return source, tag, True


def train(cfg: Config, stop: Optional[StopFlag] = None) -> dict:
    """Train ``cfg`` on its prepared shards under DeepSpeed; returns the final summary (rank 0's view).

    ``stop``: the signal flag; ``main`` passes one and ignores the signals once ``train`` returns, so a signal
    after a requested save cannot change the exit status. By default one is installed for this call only.
    """
    # the data must be what the config says before anything starts (a disagreement is a ConfigError: exit 2)
    manifest = checked_dataset(cfg).to_json()
    rank, world_size, local_rank = init_distributed(cfg.train.device, cfg.engine.collective_timeout_minutes)
    geo = Geometry.resolve(cfg.train.batch_size, cfg.engine.micro_batch_size, world_size, rank, local_rank)
    device = torch.device(f"cuda:{local_rank}" if _use_cuda(cfg.train.device) else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the first collective (the lock's), so NCCL binds the rank's GPU
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    locks = lock_run_folders(cfg, run_dir, rank, device)  # one writer per run folder, before anything is written
    try:
        return _fit(cfg, stop, manifest, geo, device, run_dir)
    finally:
        for lock in reversed(locks):
            lock.release()


def lock_run_folders(cfg: Config, run_dir: Path, rank: int, device) -> list[RunLock]:
    """Rank 0 locks the run folder, and ckpt.dir when it lies elsewhere (prime_scale.runlock); every rank learns
    whether it could, and all stop with RunLocked (exit 2) if not, before DeepSpeed starts."""
    locks, refusal = [], ""
    if rank == 0:
        try:
            for folder in training_folders(str(run_dir), cfg.ckpt.dir):
                locks.append(RunLock(folder, "training", cfg.ckpt.lock_stale_minutes).acquire())
        except RunLocked as e:
            for lock in locks:
                lock.release()
            locks, refusal = [], str(e)
    if _agree([float(bool(refusal))], device)[0]:
        raise RunLocked(refusal or "rank 0 could not lock the run folder (its message says who holds it)")
    return locks


def _fit(cfg: Config, stop: Optional[StopFlag], manifest: dict, geo: Geometry, device: torch.device,
         run_dir: Path) -> dict:
    """The training loop of ``train``, once the run folder is this run's."""
    import deepspeed

    rank, world_size = geo.rank, geo.world_size
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    # only what evaluate() scores, in the shards' dtype until here
    val = torch.from_numpy(read_blocks(cfg.data.path, "val", cfg.data.seq_len, cfg.data.vocab_size,
                                       cfg.eval.max_sequences, manifest)).long()

    # the checkpoint to start from, decided first: a universal one changes how DeepSpeed is set up
    store = CheckpointStore(cfg.ckpt.dir or str(run_dir / "checkpoints"), rank, world_size, cfg.ckpt.keep_last,
                            cfg.ckpt.keep_every)
    resume = prepare_resume(cfg, store, world_size, rank)

    # model, engine, EMA
    model = PrimeTransformer.from_config(cfg)
    model.activation_checkpointing = cfg.engine.activation_checkpointing
    optimizer = build_optimizer(model, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate(s, cfg.train) / cfg.train.lr)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, geo, universal=bool(resume and resume[2])))
    forget_priming_step(engine)
    if cfg.engine.compile:
        engine.compile()
    ema = EMA(engine.module, cfg.engine.ema_decay) if cfg.engine.ema_decay else None
    codec = model.codec

    progress = restore(engine, ema, *resume, geo, rank) if resume is not None else Progress()
    log = RunLog(cfg, run_dir, rank, progress.wandb_id or None)
    progress.wandb_id = log.wandb_id or ""

    loader, plan = train_loader(cfg.data.path, "train", cfg.data.seq_len, geo.micro_batch, cfg.train.seed,
                                world_size, rank, start_step=progress.micro_step,
                                max_steps=cfg.train.steps * geo.accumulation, num_workers=cfg.engine.num_workers,
                                shuffle_shards=cfg.engine.shuffle_shards, resampled=cfg.engine.resampled,
                                shard_chunks=cfg.engine.shard_chunks, manifest=manifest)
    own_stop = stop is None
    stop = (stop or StopFlag()).install()
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    speed = Throughput(flops_per_token(model, cfg.data.seq_len), cfg.engine.peak_tflops * 1e12 * world_size,
                       cfg.train.steps, progress.step)
    last_save, loss_n, batch_crc, exit_code = time.monotonic(), 0, 0, 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: no host sync per step
    stop_now = time_now = 0.0  # agreed with the non-finite check each micro-step, acted on at the step's end

    def evaluate() -> dict:
        with ema.swapped() if ema else nullcontext():
            result = evaluate_nelbo(engine, val, cfg, seed=cfg.train.seed, rank=rank, world_size=world_size)
        record = {"step": progress.step, "ema": ema is not None,
                  **{f"val/{k}": v for k, v in result.as_dict().items()}}
        joint = (f"; token_joint (not a bound) {result.token_joint_not_a_bound:.4f}"
                 if result.token_joint_not_a_bound is not None and cfg.prime.num_subtokens > 1 else "")
        log.write(record, f"[prime_scale] step {progress.step}: val NELBO {result.nelbo_per_token:.4f} ± "
                          f"{result.stderr:.4f} nats/token, PPL {result.ppl:.3f}, {result.bits_per_dim:.4f} bits/dim"
                          f"{joint}{' (EMA weights)' if ema else ''}")
        return record

    def draw_samples() -> None:
        """Every rank samples with the same seed (ZeRO-3 needs all of them in every forward); rank 0 writes the
        grid (pixel data) or the token ids (other data)."""
        from prime_scale.pipeline import save_sample_grid

        engine.eval()
        with ema.swapped() if ema else nullcontext():
            out = sample_with_config(cfg, engine, codec, cfg.sample.num_samples, cfg.train.seed + progress.step,
                                     device)
        engine.train()
        if rank == 0:
            folder = run_dir / "samples"
            folder.mkdir(exist_ok=True)
            grid = save_sample_grid(manifest, out.tokens.cpu(), folder / f"step_{progress.step:08d}.png")
            if grid is None:
                path = folder / f"step_{progress.step:08d}.json"
                path.write_text(json.dumps(out.tokens.tolist()))
                log.write({"step": progress.step, "samples": str(path), "sample_nfe": out.nfe})
            else:
                log.image(progress.step, grid, f"step {progress.step}, {cfg.sample.steps} steps, NFE {out.nfe:.1f}")

    def save() -> str:
        nonlocal last_save
        shared = {**asdict(progress), "config": config_to_dict(cfg), "world_size": world_size}
        own = {"rng": rng_state()}
        if ema is not None and (ema.partitioned or rank == 0):  # whole tensors: rank 0's copy serves everyone
            own["ema"] = ema.state_dict()
        tag = store.save(engine, progress.step, shared, own)
        last_save = time.monotonic()
        if rank == 0:
            print(f"[prime_scale] saved {store.url}/{tag}", flush=True)
        return tag

    engine.train()
    for batch_step, tokens in loader:
        if batch_step != progress.micro_step:
            raise RuntimeError(f"data loader yielded step {batch_step} where {progress.micro_step} was due")
        noise = noise_generator(cfg.train.seed, rank, progress.micro_step, device)
        codec.check_tokens(tokens)  # on the host copy: the same check on the device would stall it every step
        loss = training_loss(engine, tokens.to(device, non_blocking=True), cfg, noise)
        due_by_time = cfg.ckpt.every_minutes > 0 and time.monotonic() - last_save > 60 * cfg.ckpt.every_minutes
        loss, stop_seen, time_seen = guard_non_finite(loss, engine, cfg, progress, device,
                                                      [float(stop.signum), float(due_by_time and rank == 0)])
        stop_now, time_now = max(stop_now, stop_seen), max(time_now, time_seen)
        engine.backward(loss)
        boundary = (progress.micro_step + 1) % geo.accumulation == 0
        # ZeRO 1-3 keep the norm they clip with; stage 0 does not, so measure it before the step zeroes the grads
        grad_norm = _grad_norm(engine.module) if boundary and engine.zero_optimization_stage() == 0 else None
        engine.step()
        progress.micro_step += 1
        loss_sum, loss_n = loss_sum + loss.detach(), loss_n + 1
        batch_crc = zlib.crc32(tokens.numpy().tobytes(), batch_crc)
        if not boundary:
            continue
        progress.step += 1
        if ema is not None:
            ema.update()

        if _due(progress.step, cfg.train.log_every) or progress.step == cfg.train.steps:
            mean_loss, crc_sum = _agree_sum([loss_sum.item() / loss_n / world_size, float(batch_crc)], device)
            record = {"step": progress.step, loss_name(cfg): mean_loss, "lr": scheduler.get_last_lr()[0],
                      "grad_norm": float(grad_norm if grad_norm is not None else engine.get_global_grad_norm() or 0),
                      **speed.interval(progress.step, tokens_per_step),
                      "epoch": progress.micro_step // plan.steps_per_epoch,
                      "dropped_batches": progress.dropped_batches,
                      "batch_crc": int(crc_sum)}  # the token ids of the interval's batches on all ranks, for audits
            mfu = f" MFU {record['mfu']:.1%}" if "mfu" in record else ""
            log.write(record, f"[prime_scale] step {progress.step}/{cfg.train.steps} {loss_name(cfg)} "
                              f"{mean_loss:.4f} "
                              f"lr {record['lr']:.2e} grad {record['grad_norm']:.3f} "
                              f"{record['tokens_per_s']:,.0f} tok/s{mfu} ETA {format_eta(record['eta_s'])}")
            loss_sum, loss_n, batch_crc = torch.zeros_like(loss_sum), 0, 0
        if _due(progress.step, cfg.train.eval_every) or progress.step == cfg.train.steps:
            evaluate()
        if _due(progress.step, cfg.sample.every_steps):
            draw_samples()

        tag = None
        if stop_now or time_now or _due(progress.step, cfg.ckpt.every_steps) or progress.step == cfg.train.steps:
            tag = save()
        time_now = 0.0
        if stop_now:  # the launchers read this record to tell a requested stop from a crash (metrics.last_stop)
            log.write({"step": progress.step, "stopped_by_signal": int(stop_now), "checkpoint": tag,
                       "time": time.time()},
                      f"[prime_scale] stopped by signal {int(stop_now)} at step {progress.step}; resume with the "
                      "same command")
            exit_code = EXIT_RESUMABLE
            break

    if own_stop:
        stop.restore()
    log.close()
    return {"step": progress.step, "micro_step": progress.micro_step, "exit_code": exit_code, "rank": rank,
            "dropped_batches": progress.dropped_batches}


def forget_priming_step(engine) -> bool:
    """Undo the optimizer step DeepSpeed's bf16 wrapper at ZeRO-0 (FP16_UnfusedOptimizer) takes with zero gradients
    when it is set up, to create AdamW's state: it leaves every parameter's step counter at 1, so each later bias
    correction is one step behind and the first updates are 26% too small (0.526 / sqrt(0.505) of lr; see
    deepspeedai/DeepSpeed#5104). Only that exact state is cleared (every step 1, every moment 0); AdamW then makes
    it afresh at the first real step. Returns whether it did."""
    inner = getattr(engine.optimizer, "optimizer", None)
    states = list(getattr(inner, "state", {}).values())
    primed = states and all(
        float(s.get("step", -1)) == 1 and not s["exp_avg"].any() and not s["exp_avg_sq"].any() for s in states)
    if primed:
        inner.state.clear()
    return bool(primed)


def restore(engine, ema: Optional[EMA], source: CheckpointStore, tag: str, universal: bool, geo: Geometry,
            rank: int) -> Progress:
    """Load a checkpoint into the engine and EMA; returns the position to continue from."""
    shared, own = source.load(engine, tag, universal)
    progress = Progress(**{k: shared[k] for k in ("step", "micro_step", "dropped_batches", "wandb_id")})
    if universal:
        # another world size: the same global step, at the same fraction of the data (other shards per rank)
        progress.micro_step = progress.step * geo.accumulation
    if own is not None:
        set_rng_state(own["rng"])
    if ema is not None:
        saved = own.get("ema") if own is not None else None
        if saved is None and not ema.partitioned:
            saved = (source.rank_state(tag, 0) or {}).get("ema")
        if saved is not None:
            ema.load_state_dict(saved)
        elif rank == 0:
            print("[prime_scale] no usable EMA in the checkpoint (another world size under ZeRO-3, or EMA was off): "
                  "the average starts again from the current weights", flush=True)
    if rank == 0:
        print(f"[prime_scale] resumed from {source.url}/{tag} at step {progress.step}"
              f"{' (universal checkpoint)' if universal else ''}", flush=True)
    return progress


def guard_non_finite(loss: torch.Tensor, engine, cfg: Config, progress: Progress, device,
                     flags: list[float]) -> tuple[torch.Tensor, float, float]:
    """A NaN/inf loss on any rank: stop with a clear message, or (drop_batch) replace it on every rank by a loss
    whose gradient is exactly zero, so that all ranks still run the same backward and reductions.

    The same all-reduce (max over ranks) agrees on ``flags`` (stop signal, save-by-time), returned after the
    loss: the one host sync of a step, before the backward (the loss must be known to choose it)."""
    bad, *agreed = _agree([(~torch.isfinite(loss.detach())).double(), *flags], device)
    if not bad:
        return (loss, *agreed)
    where = f"micro-step {progress.micro_step} (optimizer step {progress.step + 1})"
    if cfg.engine.nan_policy == "stop":
        raise FloatingPointError(f"non-finite loss at {where}; the last checkpoint is intact. Lower train.lr, "
                                 "or set engine.nan_policy=drop_batch to drop such batches")
    progress.dropped_batches += 1
    if progress.dropped_batches > cfg.engine.max_dropped_batches:
        raise FloatingPointError(f"{progress.dropped_batches} batches dropped for non-finite losses (the last at "
                                 f"{where}), more than engine.max_dropped_batches={cfg.engine.max_dropped_batches}")
    if dist.get_rank() == 0:
        print(f"[prime_scale] non-finite loss at {where}: batch dropped ({progress.dropped_batches} so far)",
              flush=True)
    # AdamW still takes its step (its moments decay); the batch itself contributes nothing
    return (sum(p.sum() for p in engine.module.parameters()) * 0.0, *agreed)


def _due(step: int, every: int) -> bool:
    """Whether a periodic action (every ``every`` steps; 0 = never) falls on ``step``."""
    return every > 0 and step % every == 0


def _agree_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) \
        if grads else 0.0


def _check_same_model(saved: dict, cfg: Config) -> None:
    """A checkpoint can only continue the model it was made for: name every field that differs."""
    now = config_to_dict(cfg)
    keys = [("model", k) for k in now["model"]] + [("prime", k) for k in now["prime"]] + \
        [("data", "vocab_size"), ("data", "seq_len")]
    diff = [f"{s}.{k}: checkpoint {saved.get(s, {}).get(k)!r}, config {now[s][k]!r}"
            for s, k in keys if saved.get(s, {}).get(k) != now[s][k]]
    if diff:
        raise CheckpointError("the checkpoint holds a different model than the config asks for:\n  " + "\n  ".join(diff))


def main(argv: Optional[list[str]] = None) -> int:
    """Exit status (prime_scale.cli): 0 trained; 1 failed (a non-finite loss under engine.nan_policy); 2 a config
    error, data that disagrees with it, an unusable checkpoint or a run folder held by another run, before
    training; 75 stopped by a signal after a save."""
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(f"{__doc__}\nKeys (config=NAME, then any of these as key=value):\n{config_help()}")
        return EXIT_OK
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: if torchrun dies, so does this rank, at once
        die_with_parent()
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        print_error(str(e), "python -m prime_scale.engine")
        return EXIT_USAGE
    try:
        summary = train(cfg, StopFlag())
        # The DeepSpeed engine sits in reference cycles, which hold gloo work objects (ZeRO-3's gathers). Freed at
        # interpreter exit instead, they need the GIL while Python is torn down and can abort the process
        # ("terminate called without an active exception", pytorch/pytorch#179291): free them now.
        gc.collect()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # no rank tears its process group down while another still has collectives in flight
    except (ConfigError, CheckpointError, RunLocked) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except FloatingPointError as e:  # a non-finite loss (engine.nan_policy): the run failed, its checkpoints stand
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        # The run is over: a late signal must not turn its exit status into "killed". Python resets its own
        # handlers to the default while the interpreter shuts down, but keeps SIG_IGN.
        for s in _SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        if dist.is_initialized():
            dist.destroy_process_group()
    return summary["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
