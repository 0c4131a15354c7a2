"""What a run reports: rank 0's console line, ``metrics.jsonl`` (what sweeps and plots read), and wandb.

wandb runs offline by default (``log.wandb=offline``: files under the run folder, ``wandb sync`` uploads them
later), online when configured, or not at all. The wandb run id is kept in the run folder and in every
checkpoint, so a resumed *online* run continues the same wandb run. Offline runs cannot be resumed by wandb: each
restart writes a new offline run folder with the same id; syncing them appends them to one online run only in
the order you sync them. metrics.jsonl is the complete record either way. Nothing secret is logged: the config
holds no credentials, and storage credentials come from the environment, which wandb is not asked to record.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Optional

from torch import nn

from prime_scale.config import Config, config_to_dict
from prime_scale.objective import TRAINING_LOSS_NAMES
from prime_scale.run_paths import RunPaths


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) of a sequence of ``seq_len`` tokens.

    Per *position* (P = model.tokens_per_position tokens share one): 6 x the weights of every matrix applied per
    position (the blocks, the Prime merge MLP if any, the output head over P x C values), plus attention's
    12 x layers x width x positions (QK^T and AV), halved for the causal AR model (its masked half is never
    computed by a causal kernel); divided by P. Per-sequence layers (time embedding, adaLN) and the embedding
    lookups of the l sub-tokens (additions, no multiplies) are left out; the carry-over is elementwise work."""
    cfg = model.cfg
    per_position = sum(m.weight.numel() for name, m in model.named_modules()
                       if isinstance(m, nn.Linear) and "time_embed" not in name and "ada" not in name.split(".")[-1])
    positions = seq_len // cfg.tokens_per_position
    attention = 12.0 * cfg.n_layer * cfg.d_model * positions * (0.5 if cfg.objective == "ar" else 1.0)
    return (6.0 * per_position + attention) / cfg.tokens_per_position



def step_records(run_dir: str | Path) -> dict[int, dict]:
    """The last ``metrics.jsonl`` record of every logged training step (those with a loss), by step: a resumed
    run logs the steps after its checkpoint again, and the later record is the one that counts. {} before the
    first log line."""
    return {r["step"]: r for r in RunPaths(Path(run_dir)).metric_records()
            if any(name in r for name in TRAINING_LOSS_NAMES)}


def last_stop(run_dir: str | Path, since: float = 0.0) -> Optional[dict]:
    """The newest record of a requested stop (the engine saved and stopped on a signal) written at or after
    ``since`` (a time.time()), or None."""
    stops = [r for r in RunPaths(Path(run_dir)).metric_records()
             if "stopped_by_signal" in r and r.get("time", 0) >= since]
    return stops[-1] if stops else None


class RunLog:
    """Rank 0 writes; other ranks call the same methods and nothing happens."""

    def __init__(self, cfg: Config, run_dir: Path, rank: int, wandb_id: Optional[str] = None):
        self.enabled = rank == 0
        self.file = open(RunPaths(run_dir).metrics, "a") if self.enabled else None
        self.wandb = None
        self.wandb_id = wandb_id
        if self.enabled and cfg.log.wandb != "disabled":
            self.wandb_id = wandb_id or _stored_id(run_dir)
            import wandb

            self.wandb = wandb.init(
                project=cfg.log.wandb_project, entity=cfg.log.wandb_entity or None, name=cfg.run.name,
                id=self.wandb_id, resume="allow", mode=cfg.log.wandb, dir=str(run_dir),
                config=config_to_dict(cfg), settings=wandb.Settings(save_code=False, silent=True),
            )

    def write(self, record: dict, line: Optional[str] = None) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                           step=record["step"])
        if line:
            print(line, flush=True)

    def image(self, step: int, path: str, caption: str) -> None:
        """An image file (a sample grid) for wandb; metrics.jsonl gets its path."""
        if not self.enabled:
            return
        self.write({"step": step, "samples": str(path)})
        if self.wandb is not None:
            import wandb

            self.wandb.log({"samples": wandb.Image(str(path), caption=caption)}, step=step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _stored_id(run_dir: Path) -> str:
    """The run's wandb id: made once, kept in the run folder (and in checkpoints) so restarts reuse it."""
    path = RunPaths(run_dir).wandb_id
    if path.exists():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


class Throughput:
    """Tokens/s, model FLOP utilisation and ETA over the last logging interval."""

    def __init__(self, flops_per_token: float, peak_flops: float, total_steps: int, start_step: int):
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.total_steps = total_steps
        self.t0, self.step0 = time.perf_counter(), start_step
        self.t_interval, self.step_interval = self.t0, start_step

    def interval(self, step: int, tokens_per_step: int) -> dict:
        now = time.perf_counter()
        tokens_per_s = (step - self.step_interval) * tokens_per_step / max(now - self.t_interval, 1e-9)
        per_step = (now - self.t0) / max(step - self.step0, 1)
        self.t_interval, self.step_interval = now, step
        out = {"tokens_per_s": tokens_per_s, "eta_s": per_step * (self.total_steps - step)}
        if self.peak_flops:
            out["mfu"] = self.flops_per_token * tokens_per_s / self.peak_flops
        return out


def format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"

