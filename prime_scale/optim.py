"""AdamW with weight decay on linear layers' matrices only, and the learning-rate schedule (linear warmup, then
cosine or constant)."""

from __future__ import annotations

import math

import torch

from prime_scale.config import TrainConfig


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at cfg.steps (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on the matrices of linear layers only (the blocks, the Prime merge MLP, the time
    embedding, the output head), chosen by layer type: not on norms, biases, embedding tables or GenMD4's
    schedule exponents, whatever their names."""
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    decay = [p for p in model.parameters() if id(p) in matrices]
    no_decay = [p for p in model.parameters() if id(p) not in matrices]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
