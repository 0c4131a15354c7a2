"""The run folder of a point, read as its state: ``pending`` (no folder yet), ``started`` (metrics or checkpoints but
no marker: running, or interrupted), ``done`` (``done.json``, written from the final validation record) or
``failed`` (``failed.json``), and ``mismatch`` when the folder's ``config.yaml`` is another recipe's. Every training
attempt appends a line to ``attempts.jsonl``; their wall times add up to the point's. The markers are written
atomically and durably (``prime_scale.storage.write_json``): a marker is whole or absent."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import fsspec
import yaml

from prime_scale.config import config_to_dict
from prime_scale.run_paths import RunPaths
from prime_scale.storage import write_json
from prime_scale.sweep.points import Point

DONE, FAILED, ATTEMPTS = "done.json", "failed.json", "attempts.jsonl"
# config keys that change how a run is executed or logged but not what it computes: a finished point whose saved
# config differs from the spec only in these still counts as the same point
EXECUTION_KEYS = ("run.out_dir", "train.num_threads", "train.device", "train.log_every", "engine.num_workers",
                  "log.", "ckpt.", "sample.")


@dataclass
class PointState:
    """What the run folder of a point says about it."""

    status: str  # done | failed | started (a run folder, no marker: interrupted or running) | pending | mismatch
    loss: Optional[float] = None
    loss_stderr: Optional[float] = None
    ppl: Optional[float] = None
    wall_s: Optional[float] = None
    detail: str = ""
    record: dict = field(default_factory=dict)


def final_record(run_dir: str | Path, steps: int) -> Optional[dict]:
    """The last validation record of ``metrics.jsonl`` at the final step, or None."""
    finals = RunPaths(Path(run_dir)).validation_records(steps)
    return finals[-1] if finals else None


def attempts_wall_s(run_dir: str | Path) -> float:
    path = Path(run_dir) / ATTEMPTS
    if not path.is_file():
        return 0.0
    total = 0.0
    for line in path.read_text().splitlines():
        try:
            total += float(json.loads(line).get("wall_s", 0.0))
        except (json.JSONDecodeError, TypeError, ValueError):
            continue
    return total


def record_attempt(run_dir: str | Path, wall_s: float, exit_code: Optional[int], where: str) -> None:
    """One line per training attempt of a point (its wall time is summed into the point's wall_s)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / ATTEMPTS, "a") as f:
        f.write(json.dumps({"time": time.time(), "wall_s": wall_s, "exit_code": exit_code, "where": where}) + "\n")


def mark_finished(point: Point, where: str) -> PointState:
    """After a training process ended with status 0: write ``done.json`` from the final validation record, or
    ``failed.json`` when there is none. Returns the state."""
    run_dir = Path(point.run_dir)
    record = final_record(run_dir, point.steps)
    wall = attempts_wall_s(run_dir)
    if record is None:
        return mark_failed(point, 0, f"training ended without a validation record at step {point.steps} in "
                                     f"{RunPaths(run_dir).metrics}", where)
    (run_dir / FAILED).unlink(missing_ok=True)
    done = {"id": point.id, "status": "done", "loss": record["val/nelbo_per_token"],
            "loss_stderr": record.get("val/stderr"), "ppl": record.get("val/ppl"), "wall_s": wall,
            "steps": point.steps, "where": where, "finished": time.time(), "record": record,
            "overrides": list(point.overrides)}
    write_json(fsspec.filesystem("file"), str(run_dir / DONE), done)
    return read_state(point)


def mark_failed(point: Point, exit_code: Optional[int], detail: str, where: str) -> PointState:
    run_dir = Path(point.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    failed = {"id": point.id, "status": "failed", "exit_code": exit_code, "detail": detail, "where": where,
              "time": time.time()}
    write_json(fsspec.filesystem("file"), str(run_dir / FAILED), failed)
    return PointState("failed", detail=detail)


def _identity(d: dict) -> dict:
    flat = {f"{s}.{k}": v for s, body in d.items() if isinstance(body, dict) for k, v in body.items()}
    return {k: v for k, v in flat.items() if not any(k == e or (e.endswith(".") and k.startswith(e))
                                                     for e in EXECUTION_KEYS)}


def config_mismatch(point: Point) -> list[str]:
    """Fields in which the config a point's folder was run with differs from the point's (execution-only keys
    aside): a folder of another sweep definition, whose results must not be mixed in."""
    path = Path(point.run_dir) / "config.yaml"
    if not path.is_file():
        return []
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return [f"{path} is not valid YAML"]
    old, new = _identity(saved), _identity(config_to_dict(point.config()))
    return [f"{k}: run {old.get(k)!r}, spec {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)]


def read_state(point: Point, check_config: bool = True) -> PointState:
    """The point's state from its run folder: done / failed / started / pending, or mismatch (a run folder made
    with another config)."""
    run_dir = Path(point.run_dir)
    if check_config:
        diff = config_mismatch(point)
        if diff:
            return PointState("mismatch", detail="; ".join(diff[:4]) + (" ..." if len(diff) > 4 else ""))
    done = run_dir / DONE
    if done.is_file():
        try:
            d = json.loads(done.read_text())
            return PointState("done", d.get("loss"), d.get("loss_stderr"), d.get("ppl"), d.get("wall_s"),
                              record=d.get("record", {}))
        except json.JSONDecodeError:
            pass  # a marker cut short: the point is not known to be done
    if (run_dir / FAILED).is_file():
        try:
            detail = json.loads((run_dir / FAILED).read_text()).get("detail", "")
        except json.JSONDecodeError:
            detail = ""
        return PointState("failed", detail=detail, wall_s=attempts_wall_s(run_dir) or None)
    paths = RunPaths(run_dir)
    if paths.metrics.is_file() or Path(paths.checkpoints).is_dir():
        return PointState("started", wall_s=attempts_wall_s(run_dir) or None)
    return PointState("pending")
