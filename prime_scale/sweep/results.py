"""The results table of a sweep: one row per point (``RESULT_COLUMNS``: its N, D and C, and its loss once it is
done), written as ``results.csv`` (atomically: ``prime_scale.storage.atomic_write_bytes``) and, where pyarrow
works, ``results.parquet``; ``format_table`` prints it. ``collect`` reads every point's state into the table."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Optional, Sequence

import fsspec

from prime_scale.cli import text_table
from prime_scale.storage import atomic_write_bytes
from prime_scale.sweep.points import Point
from prime_scale.sweep.spec import SweepSpec
from prime_scale.sweep.state import PointState, read_state

RESULT_COLUMNS = ("sweep", "id", "family", "seed", "N", "D", "C", "steps", "loss", "loss_stderr", "ppl", "wall_s",
                  "run_url", "status", "flops_per_token")


def collect(spec: SweepSpec, points: Sequence[Point], folder: Path, slurm_states: Optional[dict] = None):
    """States of every point, the results table written to ``folder``; returns (states, rows, paths).
    ``slurm_states`` ({point id: queued | running}, ``live_tasks``) names the points whose SLURM task is alive."""
    states = [read_state(p) for p in points]
    for p, s in zip(points, states):
        if slurm_states and s.status in ("started", "pending") and p.id in slurm_states:
            s.status = slurm_states[p.id]  # queued / running, as squeue says
    rows = results_rows(points, states, isoflop=spec.isoflop is not None)
    return states, rows, write_results(rows, folder)


def results_rows(points: Sequence[Point], states: Sequence[PointState], isoflop: bool = False) -> list[dict]:
    """One row per point with RESULT_COLUMNS (+ ``budget`` in isoFLOP mode); no loss unless it is done."""
    rows = []
    for p, s in zip(points, states):
        row = {"sweep": p.sweep, "id": p.id, "family": p.family, "seed": p.seed, "N": p.N, "D": p.D, "C": p.C,
               "steps": p.steps, "loss": s.loss if s.status == "done" else None,
               "loss_stderr": s.loss_stderr if s.status == "done" else None,
               "ppl": s.ppl if s.status == "done" else None, "wall_s": s.wall_s, "run_url": p.run_dir,
               "status": s.status, "flops_per_token": p.flops_per_token}
        if isoflop:
            row["budget"] = p.budget
        rows.append(row)
    return rows


def write_results(rows: Sequence[dict], folder: str | Path) -> list[Path]:
    """``results.csv`` (always) and ``results.parquet`` (when pyarrow works) in ``folder``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0].keys()) if rows else list(RESULT_COLUMNS)
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=columns)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else repr(r[k]) if isinstance(r[k], float) else r[k])
                    for k in columns})
    path = folder / "results.csv"
    atomic_write_bytes(fsspec.filesystem("file"), str(path), text.getvalue().encode())
    written = [path]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({c: [r.get(c) for r in rows] for c in columns})
        pq.write_table(table, folder / "results.parquet")
        written.append(folder / "results.parquet")
    except Exception:  # pyarrow missing or unable to write: the CSV is the table of record
        pass
    return written


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A plain text table (numbers in a compact form)."""
    def fmt(c: str, v: Any) -> str:
        if v is None or v == "":
            return "-"
        if c in ("C", "flops_per_token", "budget") and isinstance(v, (int, float)):
            return f"{v:.3e}"
        if c in ("N", "D") and isinstance(v, int):
            return f"{v:,}"
        if isinstance(v, float):
            return f"{v:.1f}" if c == "wall_s" else f"{v:.4f}"
        return str(v)

    right = {"N", "D", "C", "steps", "loss", "loss_stderr", "ppl", "wall_s", "seed", "budget", "flops_per_token"}
    cells = [[fmt(c, r.get(c)) for c in columns] for r in rows]
    return text_table(columns, cells, [i for i, c in enumerate(columns) if c in right])