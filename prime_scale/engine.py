"""Training on DeepSpeed ZeRO: the same loop for one CPU process and for many GPU ranks.

    torchrun --nproc_per_node 2 -m prime_scale.engine config=NAME [key=value ...]
    python -m prime_scale.launch.local --nproc 2 config=NAME ...      (the same, started for you)

``train`` checks the data against the config, opens the process's ``RunContext`` (device, process group, run-folder
locks, signal handlers: prime_scale.run_context), builds the run's parts from the config (``build_trainer``) and
runs ``Trainer.fit`` (prime_scale.trainer: the loop; prime_scale.callbacks: logging, evaluation, samples,
checkpoints). Every batch is a pure function of seed, step and rank (prime_scale.data.loader) and so is the masking
noise, so a run killed at any point and resumed from its last checkpoint continues exactly as the uninterrupted run
would have.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional

import torch
import torch.distributed as dist

from prime_scale.callbacks import Checkpointer, EMAUpdate, Evaluator, MetricsLogger, SampleWriter
from prime_scale.checkpoint import CheckpointError, CheckpointStore
from prime_scale.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, config_help, print_error, wants_help
from prime_scale.config import Config, ConfigError, load_config, save_config
from prime_scale.data.loader import train_loader
from prime_scale.data.manifest import checked_dataset
from prime_scale.data.shards import read_blocks
from prime_scale.ema import EMA
from prime_scale.metrics import RunLog
from prime_scale.processes import die_with_parent
from prime_scale.run_context import RunContext, StopFlag, destroy_process_group
from prime_scale.run_paths import RunPaths
from prime_scale.runlock import RunLocked
from prime_scale.trainer import Geometry, Progress, Trainer, build_engine, prepare_resume, restore


def train(cfg: Config, stop: Optional[StopFlag] = None) -> dict:
    """Train ``cfg`` on its prepared shards under DeepSpeed; returns the final summary (rank 0's view).

    ``stop``: the signal flag to install while the loop runs (a SLURM job passes one, to read the handlers it
    replaced afterwards). Everything this call changes in the process is put back when it returns."""
    # the data must be what the config says before anything starts (a disagreement is a ConfigError: exit 2)
    manifest = checked_dataset(cfg).to_json()
    with RunContext.of(cfg, stop) as ctx:
        geo = Geometry.of(cfg, ctx)
        ctx.lock_run_folders(RunPaths.of(cfg), cfg.ckpt.lock_stale_minutes)  # one writer, before anything is written
        return build_trainer(cfg, ctx, geo, manifest).fit()


def build_trainer(cfg: Config, ctx: RunContext, geo: Geometry, manifest: dict) -> Trainer:
    """The parts of a run, built from its config: the checkpoint store and the position to resume from, the
    DeepSpeed engine, the EMA, the log, the data loader and the callbacks."""
    paths, rank, world_size = RunPaths.of(cfg), geo.rank, geo.world_size
    if rank == 0:
        paths.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, paths.config)
    # only what the evaluation scores, in the shards' dtype until here
    val = torch.from_numpy(read_blocks(cfg.data.path, "val", cfg.data.seq_len, cfg.data.vocab_size,
                                       cfg.eval.max_sequences, manifest)).long()
    # the checkpoint to start from, decided first: a universal one changes how DeepSpeed is set up
    store = CheckpointStore(paths.checkpoints, rank, world_size, cfg.ckpt.keep_last, cfg.ckpt.keep_every)
    resume = prepare_resume(cfg, store, world_size, rank)
    engine, scheduler = build_engine(cfg, geo, universal=bool(resume and resume[2]))
    ema = EMA(engine.module, cfg.engine.ema_decay) if cfg.engine.ema_decay else None
    progress = restore(engine, ema, *resume, geo, rank) if resume is not None else Progress()
    log = RunLog(cfg, paths.root, rank, progress.wandb_id or None)
    progress.wandb_id = log.wandb_id or ""
    loader, plan = train_loader(cfg.data.path, "train", cfg.data.seq_len, geo.micro_batch, cfg.train.seed,
                                world_size, rank, start_step=progress.micro_step,
                                max_steps=cfg.train.steps * geo.accumulation, num_workers=cfg.engine.num_workers,
                                shuffle_shards=cfg.engine.shuffle_shards, resampled=cfg.engine.resampled,
                                shard_chunks=cfg.engine.shard_chunks, manifest=manifest)
    callbacks = ([EMAUpdate()] if ema is not None else []) + [
        MetricsLogger(), Evaluator(val), SampleWriter(manifest), Checkpointer()]
    return Trainer(cfg, ctx, geo, engine, scheduler, loader=loader, plan=plan, paths=paths, log=log, store=store,
                   ema=ema, callbacks=callbacks, progress=progress)


def main(argv: Optional[list[str]] = None) -> int:
    """Exit status (prime_scale.cli): 0 trained; 1 failed (a non-finite loss under engine.nan_policy); 2 a config
    error, data that disagrees with it, an unusable checkpoint or a run folder held by another run, before
    training; 75 stopped by a signal after a save. Callable in-process (the local launcher's one rank): it leaves
    the process as it found it."""
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(f"{__doc__}\nKeys (config=NAME, then any of these as key=value):\n{config_help()}")
        return EXIT_OK
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        print_error(str(e), "python -m prime_scale.engine")
        return EXIT_USAGE
    launched_group = not dist.is_initialized()
    try:
        return train(cfg)["exit_code"]
    except (ConfigError, CheckpointError, RunLocked) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except FloatingPointError as e:  # a non-finite loss (engine.nan_policy): the run failed, its checkpoints stand
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if launched_group and dist.is_initialized():  # a torchrun/SLURM rank's group, made by this call
            destroy_process_group()


if __name__ == "__main__":
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: if torchrun dies, so does this rank, at once
        die_with_parent()
    status = main()
    # The run is over and this process ends: a late signal (torchrun forwarding one more) must not turn its exit
    # status into "killed". Python keeps SIG_IGN while the interpreter shuts down.
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, signal.SIG_IGN)
    sys.exit(status)
