"""The results table, fitted family by family: ``read_results`` reads and checks it (CSV or Parquet; one row per
finished run), ``fit_table`` fits every family with both approaches into a ``FamilyResult`` (its ``to_dict`` is the
family's entry of fit.json), and ``format_report`` writes the text report the command prints."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from prime_scale.scaling.chinchilla import (CHINCHILLA_GRID, BootstrapResult, ChinchillaFit, InitGrid, bootstrap,
                                            compute_optimal, fit_chinchilla)
from prime_scale.scaling.inputs import ScalingError, positive
from prime_scale.scaling.isoflop import IsoFlopFit, isoflop_fit

REQUIRED_COLUMNS = ("N", "D", "C", "loss")


@dataclass
class FamilyResult:
    """Everything fitted for one family; a method that could not be fitted has its error message instead."""

    name: str
    N: np.ndarray
    D: np.ndarray
    C: np.ndarray
    L: np.ndarray
    chinchilla: Optional[ChinchillaFit] = None
    chinchilla_error: Optional[str] = None
    boot: Optional[BootstrapResult] = None
    isoflop: Optional[IsoFlopFit] = None
    isoflop_error: Optional[str] = None
    k: float = 6.0  # C = k N D in the compute-optimal allocation

    @property
    def c_over_6nd(self) -> np.ndarray:
        return self.C / (6.0 * self.N * self.D)

    def to_dict(self) -> dict:
        ratio = self.c_over_6nd
        out: dict = {"n_runs": int(self.N.size),
                     "N_range": [float(self.N.min()), float(self.N.max())],
                     "D_range": [float(self.D.min()), float(self.D.max())],
                     "C_range": [float(self.C.min()), float(self.C.max())],
                     "loss_range": [float(self.L.min()), float(self.L.max())],
                     "C_over_6ND": {"median": float(np.median(ratio)), "min": float(ratio.min()),
                                    "max": float(ratio.max())}}
        if self.chinchilla is not None:
            ch = self.chinchilla.to_dict()
            if self.boot is not None:
                ch["bootstrap"] = self.boot.to_dict()
            out["chinchilla"] = ch
            if self.chinchilla.has_optimum:
                grid = _decades(self.C)
                alloc = compute_optimal(self.chinchilla, grid, self.k)
                out["compute_optimal"] = {
                    "k": self.k, "formula": "C = k N D; N* = G (C/k)^(beta/(alpha+beta)), "
                                            "D* = G^-1 (C/k)^(alpha/(alpha+beta))",
                    "G": self.chinchilla.G, "N_exponent": self.chinchilla.n_exponent,
                    "D_exponent": self.chinchilla.d_exponent,
                    "table": [{"C": float(c), "N": float(n), "D": float(d), "loss": float(lo)}
                              for c, n, d, lo in zip(grid, alloc.N, alloc.D, alloc.loss)]}
        else:
            out["chinchilla"] = {"error": self.chinchilla_error}
        out["isoflop"] = self.isoflop.to_dict() if self.isoflop is not None else {"error": self.isoflop_error}
        return out


def _decades(C: np.ndarray) -> np.ndarray:
    """Powers of ten spanning the observed budgets (one more decade at the top, for extrapolation)."""
    lo, hi = math.floor(math.log10(C.min())), math.ceil(math.log10(C.max())) + 1
    return 10.0 ** np.arange(lo, hi + 1, dtype=np.float64)


def read_results(path: str | Path, family_column: str = "family"):
    """The results table as a pandas DataFrame with the required columns checked (CSV, or Parquet by suffix)."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise ScalingError(f"no results table at {path}")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path)
    except Exception as e:  # unreadable or malformed file: report it, not a traceback
        raise ScalingError(f"cannot read {path}: {e}") from e
    missing = [c for c in (family_column, *REQUIRED_COLUMNS) if c not in df.columns]
    if missing:
        raise ScalingError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; the table needs "
                           f"{family_column!r}, 'N', 'D', 'C' and 'loss' (has: {', '.join(map(str, df.columns))})")
    unfinished = pd.to_numeric(df["loss"], errors="coerce").isna()
    if "status" in df.columns:
        unfinished |= df["status"].astype(str) != "done"
    if unfinished.any():  # a sweep's table lists the points still running or failed, without a loss
        print(f"[prime_scale] {path}: leaving out {int(unfinished.sum())} row(s) without a final loss "
              "(unfinished or failed sweep points)", file=sys.stderr)
        df = df[~unfinished].copy()
    if len(df) == 0:
        raise ScalingError(f"{path}: the table has no rows with a final loss")
    for col in REQUIRED_COLUMNS:
        try:
            values = pd.to_numeric(df[col])
        except (ValueError, TypeError) as e:
            raise ScalingError(f"{path}: column {col!r} is not numeric ({e})") from e
        try:
            df[col] = positive(col, values)
        except ScalingError as e:
            raise ScalingError(f"{path}: {e}") from e
    if df[family_column].isna().any():
        raise ScalingError(f"{path}: {int(df[family_column].isna().sum())} row(s) have no {family_column!r}")
    df[family_column] = df[family_column].astype(str)
    return df


def fit_table(df, *, family_column: str = "family", grid: InitGrid = CHINCHILLA_GRID,
              n_starts: Optional[int] = None, n_boot: int = 200, seed: int = 0, tolerance: float = 0.1,
              flops_per_param_token: float | str = 6.0, log=None) -> list[FamilyResult]:
    """Fit every family of a results DataFrame (see :func:`read_results`). ``flops_per_param_token`` is the k of
    C = k N D in the compute-optimal allocation: a number, or "auto" for each family's median C / (N D)."""
    results = []
    for name in sorted(df[family_column].unique()):
        sub = df[df[family_column] == name]
        res = FamilyResult(name, *(sub[c].to_numpy(np.float64) for c in REQUIRED_COLUMNS))
        res.k = (float(np.median(res.C / (res.N * res.D))) if flops_per_param_token == "auto"
                 else float(flops_per_param_token))
        if log:
            log(f"[scaling] {name}: {len(sub)} runs, fitting")
        try:
            res.chinchilla = fit_chinchilla(res.N, res.D, res.L, grid=grid, n_starts=n_starts)
            if n_boot > 0:
                res.boot = bootstrap(res.N, res.D, res.L, res.chinchilla, n=n_boot, seed=seed)
        except ScalingError as e:
            res.chinchilla_error = str(e)
        try:
            budget = sub["budget"].to_numpy() if "budget" in sub.columns else None
            res.isoflop = isoflop_fit(res.N, res.D, res.C, res.L, budget=budget, tolerance=tolerance)
        except ScalingError as e:
            res.isoflop_error = str(e)
        results.append(res)
    return results


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else "nan"


def format_report(results: Sequence[FamilyResult]) -> str:
    """A compact block per family: approach 3 with its CIs, the compute-optimal exponents, approach 2."""
    lines = []
    for r in results:
        ratio = float(np.median(r.c_over_6nd))
        lines.append(f"== {r.name}: {r.N.size} runs, N {r.N.min():.3g}..{r.N.max():.3g}, "
                     f"D {r.D.min():.3g}..{r.D.max():.3g}, C {r.C.min():.3g}..{r.C.max():.3g}, "
                     f"median C/(6ND) {ratio:.3f}")
        if r.chinchilla is None:
            lines.append(f"  approach 3  error: {r.chinchilla_error}")
        else:
            vals = r.chinchilla.values()
            ci = r.boot.ci() if r.boot is not None else {}
            cells = []
            for name in ("E", "A", "B", "alpha", "beta", "N_exponent", "D_exponent"):
                cell = f"{name}={_fmt(vals[name])}"
                if name in ci:
                    cell += f" [{_fmt(ci[name][0])}, {_fmt(ci[name][1])}]"
                cells.append(cell)
            boot = (f"; {r.boot.percentiles[0]:g}-{r.boot.percentiles[1]:g}% bootstrap CI over "
                    f"{r.boot.n_requested - r.boot.n_failed} refits" if r.boot is not None else "")
            lines.append(f"  approach 3  {'  '.join(cells[:5])}")
            lines.append(f"              N* ~ C^{cells[5].split('=', 1)[1]}  D* ~ C^{cells[6].split('=', 1)[1]}  "
                         f"(Huber objective {r.chinchilla.objective:.3g}{boot})")
            if r.chinchilla.has_optimum:
                c_top = 10.0 ** math.ceil(math.log10(r.C.max()))
                alloc = compute_optimal(r.chinchilla, c_top, r.k)
                lines.append(f"              at C={c_top:.0e} = {r.k:.3g} N D: N*={alloc.N:.3g}, D*={alloc.D:.3g}, "
                             f"loss*={alloc.loss:.4g}")
        if r.isoflop is None:
            lines.append(f"  approach 2  {r.isoflop_error}")
        else:
            iso = r.isoflop
            off = sum(not bud.in_range for bud in iso.budgets)
            note = f", {off} minimum(s) outside the sizes tried" if off else ""
            lines.append(f"  approach 2  N_opt ~ C^{iso.a:.4g}  D_opt ~ C^{iso.b:.4g}  "
                         f"({len(iso.budgets)} budgets{note}; {len(iso.skipped)} skipped)")
    return "\n".join(lines)
