"""The training loop: a ``Trainer`` holds the parts of a run and steps them; callbacks do everything periodic.

``Trainer.step`` is one optimizer step: for each of its micro-batches, the NELBO (or the AR NLL) with masking noise
that is a pure function of (seed, rank, micro-step), the non-finite guard, the backward; then DeepSpeed's gradient
accumulation, clipping and AdamW step. ``Trainer.fit`` runs the steps over the data loader and calls the callbacks
(prime_scale.callbacks) after each: EMA update, metrics, evaluation, samples, checkpoints, in that order. Because
nothing else carries state across steps, a run killed at any point and resumed from its last checkpoint continues
exactly as the uninterrupted run would have.

The parts are built from the config in one place (``build_engine`` here; the data loader, checkpoint store, log
and callbacks in ``prime_scale.engine.build_trainer``) and handed in, so a benchmark can build a Trainer with an
engine alone and time ``step`` itself.
"""

from __future__ import annotations

import itertools
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from prime_scale.checkpoint import CheckpointError, CheckpointStore, resolve_resume, rng_state, set_rng_state
from prime_scale.cli import EXIT_RESUMABLE
from prime_scale.config import Config, ConfigError, config_to_dict
from prime_scale.ema import EMA
from prime_scale.metrics import RunLog
from prime_scale.model import PrimeTransformer
from prime_scale.objective import training_loss
from prime_scale.optim import build_optimizer, learning_rate
from prime_scale.run_context import RunContext, agree_max
from prime_scale.run_paths import RunPaths


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

    @classmethod
    def of(cls, cfg: Config, ctx: RunContext) -> "Geometry":
        return cls.resolve(cfg.train.batch_size, cfg.engine.micro_batch_size, ctx.world_size, ctx.rank,
                           ctx.local_rank)


@dataclass
class Progress:
    """The training position: what a checkpoint must restore for the run to continue exactly."""

    step: int = 0  # optimizer steps taken
    micro_step: int = 0  # micro-batches consumed (the data position)
    dropped_batches: int = 0  # nan_policy=drop_batch
    wandb_id: str = ""


@dataclass
class StepResult:
    """What one optimizer step leaves for the callbacks."""

    loss_sum: torch.Tensor  # the sum of its micro-batches' losses, on the device (no host sync)
    batches: list[torch.Tensor] = field(default_factory=list)  # the token ids of its micro-batches (host copies)
    grad_norm: Optional[torch.Tensor] = None  # measured by the trainer when DeepSpeed keeps none (ZeRO-0)


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


def build_engine(cfg: Config, geo: Geometry, universal: bool = False, optimizer_factory=None, extra: dict = None):
    """The network, AdamW and the LR schedule under DeepSpeed, as every training run sets them up: returns
    (engine, scheduler). ``universal``: the checkpoint to load is a universal one. ``optimizer_factory``: builds
    the optimizer from ``optim.build_optimizer``'s (benchmarks try fused AdamW); ``extra``: keys added to the
    DeepSpeed config (benchmarks try another checkpoint writer)."""
    import deepspeed

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = PrimeTransformer.from_config(cfg)
    model.activation_checkpointing = cfg.engine.activation_checkpointing
    optimizer = build_optimizer(model, cfg.train)
    if optimizer_factory is not None:
        optimizer = optimizer_factory(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate(s, cfg.train) / cfg.train.lr)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config={**deepspeed_config(cfg, geo, universal), **(extra or {})})
    forget_priming_step(engine)
    if cfg.engine.compile:
        engine.compile()
    return engine, scheduler


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


def noise_generator(seed: int, rank: int, micro_step: int, device) -> torch.Generator:
    """The masking noise of a micro-step on a rank: a pure function of its coordinates, so resuming needs no RNG
    state, and no two (rank, step) pairs share a stream."""
    entropy = np.random.SeedSequence([seed, rank, micro_step]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


def due(step: int, every: int) -> bool:
    """Whether a periodic action (every ``every`` steps; 0 = never) falls on ``step``."""
    return every > 0 and step % every == 0


class Trainer:
    """One run's parts: the config, the process (``ctx``), the batch geometry, the DeepSpeed engine and its LR
    scheduler; for ``fit`` also the data loader (yielding (micro-step, tokens)) and its plan, the run's paths, its
    log, its checkpoint store, the EMA and the callbacks. ``progress`` is where training stands."""

    def __init__(self, cfg: Config, ctx: RunContext, geo: Geometry, engine, scheduler=None, *, loader=None,
                 plan=None, paths: Optional[RunPaths] = None, log: Optional[RunLog] = None,
                 store: Optional[CheckpointStore] = None, ema: Optional[EMA] = None, callbacks: Sequence = (),
                 progress: Optional[Progress] = None):
        self.cfg, self.ctx, self.geo = cfg, ctx, geo
        self.engine, self.scheduler = engine, scheduler
        self.model, self.codec, self.device = engine.module, engine.module.codec, ctx.device
        self.loader, self.plan, self.paths, self.log, self.store, self.ema = loader, plan, paths, log, store, ema
        self.callbacks = list(callbacks)
        self.progress = progress or Progress()
        self.exit_code = 0
        self.stop_signal = 0  # a stop signal every rank agreed on during the step (0: none)
        self.save_requested = False  # this rank asks for a save (ckpt.every_minutes); agreed like a stop signal
        self.save_agreed = False  # some rank asked for one during the step
        self.last_saved: tuple[int, str] = (-1, "")  # (step, tag) of the newest checkpoint this run wrote

    # ---------------------------------------------------------------------------------------------- the loop

    def fit(self) -> dict:
        """Train to ``train.steps`` (or until a stop signal, after a save); returns rank 0's view of the end."""
        self.ctx.install_stop_handlers()
        self.engine.train()
        for callback in self.callbacks:
            callback.pre_train(self)
        for micro_batches in _groups(self.loader, self.geo.accumulation):
            for callback in self.callbacks:
                callback.pre_step(self)
            result = self.step(micro_batches)
            for callback in self.callbacks:
                callback.post_step(self, result)
            if self.stop_signal:  # every rank agreed on it during the step, and the Checkpointer saved
                self._record_stop()
                break
        for callback in self.callbacks:
            callback.post_train(self)
        if self.log is not None:
            self.log.close()
        return {"step": self.progress.step, "micro_step": self.progress.micro_step, "exit_code": self.exit_code,
                "rank": self.geo.rank, "dropped_batches": self.progress.dropped_batches}

    def step(self, micro_batches: Sequence[tuple[int, torch.Tensor]]) -> StepResult:
        """Forward and backward of each micro-batch, (micro-step, token ids) with the micro-step the one due (the
        loader's order, checked), and DeepSpeed's step after each: it accumulates, and at every
        ``accumulation``-th micro-step clips and takes the AdamW step. ``fit`` passes one optimizer step's worth;
        a benchmark may pass a single micro-batch."""
        cfg, device, progress = self.cfg, self.device, self.progress
        result = StepResult(torch.zeros((), dtype=torch.float64, device=device))
        self.save_agreed = False
        for micro_step, tokens in micro_batches:
            if micro_step != progress.micro_step:
                raise RuntimeError(f"data loader yielded step {micro_step} where {progress.micro_step} was due")
            noise = noise_generator(cfg.train.seed, self.geo.rank, micro_step, device)
            self.codec.check_tokens(tokens)  # on the host copy: the same check on the device would stall each step
            loss = training_loss(self.engine, tokens.to(device, non_blocking=True), cfg, noise)
            loss = self._guard_and_agree(loss)
            self.engine.backward(loss)
            boundary = (progress.micro_step + 1) % self.geo.accumulation == 0
            # ZeRO 1-3 keep the norm they clip with; stage 0 does not, so it is measured before the step zeroes
            # the gradients, on the steps that are logged only
            if boundary and self.engine.zero_optimization_stage() == 0 and self.logs_at(progress.step + 1):
                result.grad_norm = _grad_norm(self.engine.module)
            self.engine.step()
            progress.micro_step += 1
            if boundary:
                progress.step += 1
            result.loss_sum += loss.detach()
            result.batches.append(tokens)
        self.save_requested = False
        return result

    def logs_at(self, step: int) -> bool:
        """Whether ``step`` writes a metrics line (train.log_every, and the last step)."""
        return due(step, self.cfg.train.log_every) or step == self.cfg.train.steps

    def _guard_and_agree(self, loss: torch.Tensor) -> torch.Tensor:
        """A NaN/inf loss on any rank: stop with a clear message, or (drop_batch) replace it on every rank by a loss
        whose gradient is exactly zero, so that all ranks still run the same backward and reductions.

        The same all-reduce (max over ranks) agrees on the stop signal and the save request: the one host sync of
        a micro-step, before the backward (the loss must be known to choose it)."""
        bad, signum, save = agree_max([(~torch.isfinite(loss.detach())).double(), float(self.ctx.stop.signum),
                                       float(self.save_requested)], self.device)
        self.stop_signal = max(self.stop_signal, int(signum))
        self.save_agreed = self.save_agreed or bool(save)
        if not bad:
            return loss
        progress, cfg = self.progress, self.cfg
        where = f"micro-step {progress.micro_step} (optimizer step {progress.step + 1})"
        if cfg.engine.nan_policy == "stop":
            raise FloatingPointError(f"non-finite loss at {where}; the last checkpoint is intact. Lower train.lr, "
                                     "or set engine.nan_policy=drop_batch to drop such batches")
        progress.dropped_batches += 1
        if progress.dropped_batches > cfg.engine.max_dropped_batches:
            raise FloatingPointError(f"{progress.dropped_batches} batches dropped for non-finite losses (the last at "
                                     f"{where}), more than engine.max_dropped_batches={cfg.engine.max_dropped_batches}")
        if self.geo.rank == 0:
            print(f"[prime_scale] non-finite loss at {where}: batch dropped ({progress.dropped_batches} so far)",
                  flush=True)
        # AdamW still takes its step (its moments decay); the batch itself contributes nothing
        return sum(p.sum() for p in self.engine.module.parameters()) * 0.0

    def _record_stop(self) -> None:
        """The launchers read this record to tell a requested stop from a crash (metrics.last_stop)."""
        step = self.progress.step
        tag = self.last_saved[1] if self.last_saved[0] == step else None
        self.log.write({"step": step, "stopped_by_signal": self.stop_signal, "checkpoint": tag, "time": time.time()},
                       f"[prime_scale] stopped by signal {self.stop_signal} at step {step}; resume with the same "
                       "command")
        self.exit_code = EXIT_RESUMABLE

    # ---------------------------------------------------------------------------------------------- weights

    def averaged_weights(self):
        """A context in which the network holds the weights evaluation and sampling use: the EMA when the run
        keeps one, else the trained weights."""
        return self.ema.swapped() if self.ema is not None else nullcontext()

    # ---------------------------------------------------------------------------------------------- checkpoints

    def save(self) -> str:
        """A checkpoint of the whole position (every rank takes part); returns its tag."""
        shared = {**asdict(self.progress), "config": config_to_dict(self.cfg), "world_size": self.geo.world_size}
        own = {"rng": rng_state()}
        if self.ema is not None and (self.ema.partitioned or self.geo.rank == 0):  # rank 0's whole copy serves all
            own["ema"] = self.ema.state_dict()
        tag = self.store.save(self.engine, self.progress.step, shared, own)
        self.last_saved = (self.progress.step, tag)
        if self.geo.rank == 0:
            print(f"[prime_scale] saved {self.store.url}/{tag}", flush=True)
        return tag


def prepare_resume(cfg: Config, store: CheckpointStore, world_size: int, rank: int):
    """(store, tag, universal) of the checkpoint to start from, or None. A checkpoint written by another number
    of ranks is converted once to DeepSpeed's universal format (``universal/{tag}``), which loads on any world
    size; the conversion runs on rank 0 while the others wait."""
    start = resolve_resume(store, cfg.ckpt.resume)
    if start is None:
        return None
    source, tag = start
    manifest = source.manifest(tag)
    check_same_model(manifest["config"], cfg)  # before DeepSpeed meets mismatched tensors
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


def check_same_model(saved: dict, cfg: Config) -> None:
    """A checkpoint can only continue the model it was made for: name every field that differs."""
    now = config_to_dict(cfg)
    keys = [("model", k) for k in now["model"]] + [("prime", k) for k in now["prime"]] + \
        [("data", "vocab_size"), ("data", "seq_len")]
    diff = [f"{s}.{k}: checkpoint {saved.get(s, {}).get(k)!r}, config {now[s][k]!r}"
            for s, k in keys if saved.get(s, {}).get(k) != now[s][k]]
    if diff:
        raise CheckpointError("the checkpoint holds a different model than the config asks for:\n  " + "\n  ".join(diff))


def _groups(loader: Iterable, size: int) -> Iterator[list]:
    """The loader's micro-batches in lists of ``size``: one list per optimizer step."""
    batches = iter(loader)
    while group := list(itertools.islice(batches, size)):
        yield group


def _grad_norm(module: torch.nn.Module) -> Optional[torch.Tensor]:
    """The global L2 norm of the gradients, as a device tensor (read by the metrics line: no host sync here)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) \
        if grads else None
