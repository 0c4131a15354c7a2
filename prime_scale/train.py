"""Single-process training loop (the DeepSpeed engine replaces ``Trainer.step`` and the checkpointing later;
the model, the loss and the data order stay as they are)."""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from prime_scale.config import Config, TrainConfig
from prime_scale.diffusion import nelbo
from prime_scale.evaluate import EvalResult, evaluate_nelbo
from prime_scale.model import PrimeTransformer
from prime_scale.schedules import make_schedule


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    return torch.device(name)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at cfg.steps (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases or embedding tables)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


class SequenceBatches:
    """Batches of an in-memory (num_sequences, seq_len) array. The batch of step k is a pure function of
    (seed, k): epoch e = k // steps_per_epoch is a seeded permutation, so a resumed run seeks, never replays."""

    def __init__(self, sequences: torch.Tensor, batch_size: int, seed: int):
        if len(sequences) < batch_size:
            raise ValueError(f"{len(sequences)} training sequences cannot fill one batch of {batch_size}")
        self.sequences = sequences
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = len(sequences) // batch_size
        self._epoch, self._order = -1, None

    def batch(self, step: int) -> torch.Tensor:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.sequences), generator=g)
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        return self.sequences[rows]


@dataclass
class TrainResult:
    model: PrimeTransformer
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def train(
    cfg: Config,
    train_sequences: torch.Tensor,
    val_sequences: Optional[torch.Tensor] = None,
    run_dir: Optional[Path] = None,
    on_eval: Optional[Callable[[int, EvalResult], None]] = None,
    progress: bool = True,
) -> TrainResult:
    tc = cfg.train
    torch.manual_seed(tc.seed)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    device = resolve_device(tc.device)
    model = PrimeTransformer.from_config(cfg).to(device)
    optimizer = build_optimizer(model, tc)
    schedule = make_schedule(cfg.diffusion)
    batches = SequenceBatches(train_sequences, tc.batch_size, tc.seed)
    noise = torch.Generator(device=device).manual_seed(tc.seed + 1)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if tc.dtype == "bfloat16" else nullcontext()
    )
    antithetic = cfg.diffusion.time_sampling == "antithetic"
    metrics_file = open(run_dir / "metrics.jsonl", "a") if run_dir else None
    history: list[dict] = []

    def log(record: dict) -> None:
        history.append(record)
        if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    start = time.perf_counter()
    # a log file (not a terminal) gets a line every 30 s instead of a carriage-return stream
    bar = tqdm(range(tc.steps), desc="train", disable=not progress, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)
    running, running_n = 0.0, 0
    for step in bar:
        lr = learning_rate(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens = batches.batch(step).to(device, non_blocking=True)
        with autocast:
            loss = nelbo(model, tokens, model.codec, schedule, noise, antithetic=antithetic).per_token
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        running += loss.item()
        running_n += 1
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            record = {"step": done, "loss": running / running_n, "lr": lr, "grad_norm": float(grad_norm),
                      "elapsed_s": time.perf_counter() - start}
            bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
            log(record)
            running, running_n = 0.0, 0
        if val_sequences is not None and (done % tc.eval_every == 0 or done == tc.steps):
            result = evaluate_nelbo(model, val_sequences, cfg, seed=tc.seed)
            log({"step": done, **{f"val/{k}": v for k, v in result.as_dict().items()}})
            if on_eval:
                on_eval(done, result)
    if metrics_file:
        metrics_file.close()
    return TrainResult(model=model, history=history, seconds=time.perf_counter() - start)
