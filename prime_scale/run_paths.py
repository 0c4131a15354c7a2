"""The one definition of a run folder's layout (``run.out_dir/run.name``): the engine, the launchers, the SLURM
job, sweeps and the pipeline ask ``RunPaths`` where a run's files are. No torch here: launchers that only submit
import it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from prime_scale.config import Config


@dataclass(frozen=True)
class RunPaths:
    """Where a run's files live. ``root`` is ``run.out_dir/run.name``; checkpoints go to ``ckpt.dir`` when set (any
    fsspec URL), else ``root/checkpoints``."""

    root: Path
    ckpt_dir: str = ""

    @classmethod
    def of(cls, cfg: Config) -> "RunPaths":
        return cls(Path(cfg.run.out_dir) / cfg.run.name, cfg.ckpt.dir)

    @property
    def checkpoints(self) -> str:
        return self.ckpt_dir or str(self.root / "checkpoints")

    config = property(lambda self: self.root / "config.yaml")  # the resolved config of the run
    metrics = property(lambda self: self.root / "metrics.jsonl")  # every log record (training, evaluation, stops)
    samples = property(lambda self: self.root / "samples")  # sample grids / token ids drawn during training
    export = property(lambda self: self.root / "export")  # model.safetensors + config.yaml (python -m prime_scale.export)
    summary = property(lambda self: self.root / "summary.json")  # the pipeline's final evaluation and samples
    sample_grid = property(lambda self: self.root / "samples.png")  # the pipeline's final samples (pixel data)
    restarts = property(lambda self: self.root / "restarts.jsonl")  # one line per SLURM (re)start
    slurm_logs = property(lambda self: self.root / "slurm")  # submitit's folder: scripts, logs, results
    wandb_id = property(lambda self: self.root / "wandb_id.txt")

    def lock_folders(self) -> list[str]:
        """The folders a training run writes and locks: the run folder, and ckpt.dir when it lies outside it."""
        inside = not self.ckpt_dir or os.path.abspath(self.ckpt_dir).startswith(os.path.abspath(self.root) + os.sep)
        return [str(self.root)] + ([] if inside else [self.ckpt_dir])

    def metric_records(self) -> Iterator[dict]:
        """The records of ``metrics.jsonl`` in the order they were written (none before the first), skipping a line
        cut short by a kill or being written right now (a reader polling a live run)."""
        if not self.metrics.is_file():
            return
        for line in self.metrics.read_text().splitlines():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue

    def validation_records(self, step: Optional[int] = None) -> list[dict]:
        """The evaluation records of ``metrics.jsonl`` (those with a validation NELBO) in the order they were
        written; only those at ``step`` when it is given."""
        return [r for r in self.metric_records()
                if "val/nelbo_per_token" in r and (step is None or r.get("step") == step)]
