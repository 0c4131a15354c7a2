"""Scaling laws from a results table (docs/scaling.md).

``python -m prime_scale.scaling fit results=TABLE [out=DIR] [family_column=family] [bootstrap=200] [seed=0] ...``
(``--help`` lists every key; the older ``fit RESULTS --out DIR ...`` spelling still works)

RESULTS is a CSV or Parquet table with one row per finished run and the columns ``family``, ``N`` (the parameter
count the sweep reports), ``D`` (training tokens), ``C`` (training FLOPs, counted by the sweep with the model's own
FLOPs per token) and ``loss`` (final validation loss, nats per token); ``budget``, ``seed``, ``run_url`` and
``wall_s`` are optional. For every family it fits

* Chinchilla approach 3: L(N, D) = E + A / N^alpha + B / D^beta by L-BFGS on the Huber loss of log residuals from a
  grid of initialisations, with bootstrap confidence intervals (``fit_chinchilla``, ``bootstrap``);
* the compute-optimal allocation of that law under C = 6 N D (``compute_optimal``);
* Chinchilla approach 2, isoFLOP parabolas and N_opt ~ C^a, D_opt ~ C^b (``isoflop_fit``);

and writes ``fit.json`` and three PNG plots. Everything is a pure function of its arguments: no global state.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

from prime_scale.cli import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, Key, UsageError, guarded, keys_help, parse_keys,
                             print_error, wants_help)

PARAMS = ("e", "a", "b", "alpha", "beta")  # the optimisation vector theta, in this order
HUBER_DELTA = 1e-3  # Hoffmann et al. 2022
REQUIRED_COLUMNS = ("N", "D", "C", "loss")


class ScalingError(ValueError):
    """Input that cannot be fitted as asked: a missing column, too few points, non-positive or non-finite values."""


# ----------------------------------------------------------------------------------------------------- inputs


def _positive(name: str, values) -> np.ndarray:
    """``values`` as a float64 1-d array; every entry must be finite and > 0."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ScalingError(f"{name} must be finite and > 0: {int(bad.sum())} of {arr.size} values are not "
                           f"(first at position {i}: {arr[i]!r}); remove failed or diverged runs first")
    return arr


def _same_length(**arrays: np.ndarray) -> int:
    lengths = {k: v.size for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ScalingError(f"inputs differ in length: {lengths}")
    return next(iter(lengths.values()))


# ------------------------------------------------------------------------------------------ approach 3: the fit


@dataclass(frozen=True)
class InitGrid:
    """Initial points of the L-BFGS runs: the Cartesian product of these values (Chinchilla's grid by default)."""

    e: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0)
    a: tuple[float, ...] = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
    b: tuple[float, ...] = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
    alpha: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
    beta: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)

    def points(self) -> np.ndarray:
        """(G, 5) array of initial theta = (e, a, b, alpha, beta)."""
        mesh = np.meshgrid(self.e, self.a, self.b, self.alpha, self.beta, indexing="ij")
        return np.stack([m.reshape(-1) for m in mesh], axis=1).astype(np.float64)

    def size(self) -> int:
        return len(self.e) * len(self.a) * len(self.b) * len(self.alpha) * len(self.beta)


CHINCHILLA_GRID = InitGrid()  # 4500 points
SMALL_GRID = InitGrid(e=(-1.0, 0.0, 1.0), a=(0.0, 5.0, 10.0, 20.0), b=(0.0, 5.0, 10.0, 20.0),
                      alpha=(0.0, 0.5, 1.0), beta=(0.0, 0.5, 1.0))  # 432 points
GRIDS = {"chinchilla": CHINCHILLA_GRID, "small": SMALL_GRID}


@dataclass
class ChinchillaFit:
    """L(N, D) = E + A / N^alpha + B / D^beta, with E = exp(e), A = exp(a), B = exp(b)."""

    e: float
    a: float
    b: float
    alpha: float
    beta: float
    objective: float  # sum of Huber_delta(log L_pred - log L_obs) at the optimum
    n_points: int
    huber_delta: float = HUBER_DELTA
    n_starts: int = 0  # L-BFGS runs made
    converged: bool = True  # whether the best run reported convergence
    best_inits: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)), repr=False)  # by final objective

    @property
    def theta(self) -> np.ndarray:
        return np.array([self.e, self.a, self.b, self.alpha, self.beta])

    @property
    def E(self) -> float:
        return _exp(self.e)

    @property
    def A(self) -> float:
        return _exp(self.a)

    @property
    def B(self) -> float:
        return _exp(self.b)

    @property
    def has_optimum(self) -> bool:
        """Whether L(N, D) has a compute-optimal allocation: both exponents positive."""
        return self.alpha > 0 and self.beta > 0

    @property
    def n_exponent(self) -> float:
        """N*(C) ~ C^(beta / (alpha + beta))."""
        return self.beta / (self.alpha + self.beta)

    @property
    def d_exponent(self) -> float:
        """D*(C) ~ C^(alpha / (alpha + beta))."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        """G = (alpha A / (beta B))^(1 / (alpha + beta)), in log space so huge A, B do not overflow."""
        return math.exp((math.log(self.alpha / self.beta) + self.a - self.b) / (self.alpha + self.beta))

    def predict(self, N, D) -> np.ndarray:
        """Predicted loss at (N, D) (broadcast)."""
        logn, logd = np.log(np.asarray(N, dtype=np.float64)), np.log(np.asarray(D, dtype=np.float64))
        return np.exp(_log_pred(self.theta, logn, logd))

    def values(self) -> dict[str, float]:
        """The reported numbers, as :data:`BOOT_NAMES` names them."""
        out = {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta}
        ok = self.has_optimum
        out["N_exponent"] = self.n_exponent if ok else math.nan
        out["D_exponent"] = self.d_exponent if ok else math.nan
        out["G"] = self.G if ok else math.nan
        return out

    def to_dict(self) -> dict:
        return {**self.values(), "e": self.e, "a": self.a, "b": self.b, "objective": self.objective,
                "huber_delta": self.huber_delta, "n_points": self.n_points, "n_starts": self.n_starts,
                "converged": self.converged}


BOOT_NAMES = ("E", "A", "B", "alpha", "beta", "N_exponent", "D_exponent", "G")


def _log_pred(theta: np.ndarray, logn: np.ndarray, logd: np.ndarray) -> np.ndarray:
    """log L_pred = logsumexp(a - alpha log N, b - beta log D, e)."""
    e, a, b, alpha, beta = theta
    terms = np.stack(np.broadcast_arrays(a - alpha * logn, b - beta * logd, e + 0.0 * logn))
    m = terms.max(axis=0)
    return m + np.log(np.exp(terms - m).sum(axis=0))


def _objective_grad(theta: np.ndarray, logn: np.ndarray, logd: np.ndarray, logl: np.ndarray,
                    delta: float) -> tuple[float, np.ndarray]:
    """(sum Huber_delta(r) / (n delta), its gradient) with r = log L_pred - log L_obs.

    The 1/(n delta) scale does not move the minimum; it keeps the objective O(|r|) so that L-BFGS's absolute
    tolerances mean the same for any delta and any number of points."""
    e, a, b, alpha, beta = theta
    terms = np.stack((a - alpha * logn, b - beta * logd, np.full_like(logn, e)))
    m = terms.max(axis=0)
    w = np.exp(terms - m)
    s = w.sum(axis=0)
    r = m + np.log(s) - logl
    w /= s  # softmax weights: d log L_pred / d (term k)
    absr = np.abs(r)
    huber = np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta))
    psi = np.clip(r, -delta, delta)  # Huber'(r)
    scale = 1.0 / (logn.size * delta)
    g = np.array([(psi * w[2]).sum(), (psi * w[0]).sum(), (psi * w[1]).sum(),
                  -(psi * w[0] * logn).sum(), -(psi * w[1] * logd).sum()])
    return float(huber.sum() * scale), g * scale


def _screen(inits: np.ndarray, logn: np.ndarray, logd: np.ndarray, logl: np.ndarray, delta: float,
            chunk: int = 256) -> np.ndarray:
    """The objective at each of the (G, 5) initial points, vectorised over ``chunk`` points at a time."""
    out = []
    for start in range(0, len(inits), chunk):
        e, a, b, alpha, beta = (inits[start:start + chunk, i:i + 1] for i in range(5))
        terms = np.stack(np.broadcast_arrays(a - alpha * logn, b - beta * logd, e + 0.0 * logn))  # (3, g, n)
        m = terms.max(axis=0)
        r = m + np.log(np.exp(terms - m).sum(axis=0)) - logl
        absr = np.abs(r)
        out.append(np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta)).sum(axis=1))
    return np.concatenate(out)


# alpha, beta >= 0 (a negative exponent would make loss grow with scale); e, a, b free
_BOUNDS = [(None, None), (None, None), (None, None), (0.0, None), (0.0, None)]


def _one_blas_thread():
    """L-BFGS-B's 5-dimensional linear algebra goes through BLAS; with a multi-threaded OpenBLAS every call pays a
    thread handoff (10x slower on a busy machine), so the fits run with one BLAS thread."""
    import scipy.optimize  # noqa: F401  (loads scipy's BLAS first, so that the limit applies to it)
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _lbfgs(theta0: np.ndarray, logn, logd, logl, delta: float, maxiter: int):
    from scipy.optimize import minimize

    return minimize(_objective_grad, theta0, args=(logn, logd, logl, delta), jac=True, method="L-BFGS-B",
                    bounds=_BOUNDS, options={"maxiter": maxiter, "ftol": 1e-13, "gtol": 1e-9})


def _check_design(N: np.ndarray, D: np.ndarray, what: str = "Chinchilla fit") -> None:
    if N.size < 6:
        raise ScalingError(f"{what} needs at least 6 runs (it has 5 parameters), got {N.size}")
    for name, arr in (("N", N), ("D", D)):
        k = np.unique(arr).size
        if k < 3:
            raise ScalingError(f"{what} needs at least 3 distinct values of {name} to separate its term from E, "
                               f"got {k}")


def fit_chinchilla(N, D, L, *, grid: InitGrid = CHINCHILLA_GRID, n_starts: Optional[int] = None,
                   delta: float = HUBER_DELTA, maxiter: int = 2000, extra_inits: Optional[np.ndarray] = None,
                   check: bool = True) -> ChinchillaFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla approach 3).

    Minimises sum_i Huber_delta(log L_pred,i - log L_i) over theta = (e, a, b, alpha, beta) with L-BFGS-B
    (alpha, beta >= 0), from every point of ``grid`` (or, with ``n_starts``, from the ``n_starts`` grid points
    with the lowest initial objective) plus ``extra_inits``; keeps the run with the lowest final objective."""
    N, D, L = _positive("N", N), _positive("D", D), _positive("loss", L)
    _same_length(N=N, D=D, loss=L)
    if check:
        _check_design(N, D)
    logn, logd, logl = np.log(N), np.log(D), np.log(L)
    inits = grid.points()
    if n_starts is not None and n_starts < len(inits):
        order = np.argsort(_screen(inits, logn, logd, logl, delta), kind="stable")
        inits = inits[order[:max(int(n_starts), 1)]]
    if extra_inits is not None:
        inits = np.concatenate([np.asarray(extra_inits, dtype=np.float64).reshape(-1, 5), inits])
    with _one_blas_thread():
        results = [_lbfgs(theta0, logn, logd, logl, delta, maxiter) for theta0 in inits]
    finals = [res.fun if np.isfinite(res.fun) else np.inf for res in results]
    order = np.argsort(finals, kind="stable")
    best = results[order[0]]
    if not np.isfinite(best.fun):
        raise ScalingError("Chinchilla fit failed: no initial point gave a finite objective")
    scale = N.size * delta
    return ChinchillaFit(*map(float, best.x), objective=float(best.fun * scale), n_points=N.size, huber_delta=delta,
                         n_starts=len(inits), converged=bool(best.success), best_inits=inits[order[:16]].copy())


@dataclass
class BootstrapResult:
    """Refits on rows resampled with replacement: ``samples[name]`` holds one value per successful refit."""

    samples: dict[str, np.ndarray]
    n_requested: int
    n_failed: int
    percentiles: tuple[float, float] = (5.0, 95.0)

    def ci(self) -> dict[str, tuple[float, float]]:
        """(lo, hi) percentile interval of every reported number."""
        out = {}
        for name, vals in self.samples.items():
            vals = vals[np.isfinite(vals)]
            out[name] = (tuple(float(v) for v in np.percentile(vals, self.percentiles)) if vals.size
                         else (math.nan, math.nan))
        return out

    def to_dict(self) -> dict:
        return {"n": self.n_requested, "n_failed": self.n_failed, "percentiles": list(self.percentiles),
                "ci": {k: list(v) for k, v in self.ci().items()}}


def bootstrap(N, D, L, fit: ChinchillaFit, *, n: int = 200, seed: int = 0, grid_starts: int = 3,
              percentiles: tuple[float, float] = (5.0, 95.0), delta: Optional[float] = None,
              maxiter: int = 2000) -> BootstrapResult:
    """Bootstrap the Chinchilla fit: resample the rows with replacement ``n`` times and refit each sample from the
    full fit's optimum, the grid point it came from and the next ``grid_starts - 1`` best grid points of the full
    fit. Resamples with fewer than 3 distinct N or D are counted as failed."""
    N, D, L = _positive("N", N), _positive("D", D), _positive("loss", L)
    _same_length(N=N, D=D, loss=L)
    rng = np.random.default_rng(seed)
    starts = np.concatenate([fit.theta[None], fit.best_inits[:max(grid_starts, 0)]])
    delta = fit.huber_delta if delta is None else delta
    with _one_blas_thread():
        rows, failed = _bootstrap_loop(N, D, L, rng, n, starts, delta, maxiter)
    samples = {name: np.array([r[name] for r in rows], dtype=np.float64) for name in BOOT_NAMES}
    return BootstrapResult(samples, n_requested=n, n_failed=failed, percentiles=tuple(percentiles))


def _bootstrap_loop(N, D, L, rng, n, starts, delta, maxiter) -> tuple[list[dict[str, float]], int]:
    size = N.size
    rows: list[dict[str, float]] = []
    failed = 0
    for _ in range(n):
        idx = rng.integers(0, size, size)
        if np.unique(N[idx]).size < 3 or np.unique(D[idx]).size < 3:
            failed += 1
            continue
        logn, logd, logl = np.log(N[idx]), np.log(D[idx]), np.log(L[idx])
        best = min((_lbfgs(t, logn, logd, logl, delta, maxiter) for t in starts),
                   key=lambda r: r.fun if np.isfinite(r.fun) else np.inf)
        if not np.isfinite(best.fun):
            failed += 1
            continue
        rows.append(ChinchillaFit(*map(float, best.x), objective=float(best.fun), n_points=size).values())
    return rows, failed


# ------------------------------------------------------------------------------------- compute-optimal allocation


class Allocation(NamedTuple):
    N: np.ndarray
    D: np.ndarray
    loss: np.ndarray


def compute_optimal(fit: ChinchillaFit, C, flops_per_param_token: float = 6.0) -> Allocation:
    """The (N*, D*) minimising the fitted L(N, D) subject to C = k N D (k = 6 by default), and L there:
    N* = G (C/k)^(beta/(alpha+beta)), D* = G^-1 (C/k)^(alpha/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta))."""
    if not fit.has_optimum:
        raise ScalingError(f"no compute-optimal allocation: the fit has alpha={fit.alpha:.3g}, beta={fit.beta:.3g} "
                           "(both must be > 0)")
    c = _positive("C", np.atleast_1d(C)) / flops_per_param_token
    n_opt = fit.G * c ** fit.n_exponent
    d_opt = c / n_opt
    out = Allocation(n_opt, d_opt, fit.predict(n_opt, d_opt))
    if np.ndim(C) == 0:
        return Allocation(*(float(v[0]) for v in out))
    return out


# -------------------------------------------------------------------------------------- approach 2: isoFLOP


def group_budgets(C, tolerance: float = 0.1) -> np.ndarray:
    """Integer budget labels: rows sorted by C start a new budget when C exceeds the current budget's smallest C by
    more than the relative ``tolerance``. Labels increase with C."""
    c = _positive("C", C)
    order = np.argsort(c, kind="stable")
    labels = np.empty(c.size, dtype=np.int64)
    label, start = -1, -math.inf
    for i in order:
        if c[i] > start * (1.0 + tolerance):
            label, start = label + 1, c[i]
        labels[i] = label
    return labels


@dataclass
class IsoBudget:
    """One isoFLOP budget: its runs, the parabolas of loss in ln N and ln D, and their minima."""

    C: float  # geometric mean of the rows' C
    N: np.ndarray
    D: np.ndarray
    L: np.ndarray
    coef_n: np.ndarray  # loss = p2 (ln N - x0)^2 + p1 (ln N - x0) + p0, x0 = center_n
    center_n: float
    coef_d: np.ndarray
    center_d: float
    N_opt: float
    D_opt: float
    L_opt: float
    in_range: bool  # N_opt inside the sampled sizes

    def parabola_n(self, N) -> np.ndarray:
        return np.polyval(self.coef_n, np.log(np.asarray(N, dtype=np.float64)) - self.center_n)

    def to_dict(self) -> dict:
        return {"C": self.C, "n_runs": int(self.N.size), "N_range": [float(self.N.min()), float(self.N.max())],
                "N_opt": self.N_opt, "D_opt": self.D_opt, "loss_opt": self.L_opt, "in_range": self.in_range,
                "curvature_lnN": float(self.coef_n[0])}


@dataclass
class IsoFlopFit:
    """N_opt = exp(n_intercept) C^a and D_opt = exp(d_intercept) C^b, least squares in log space over budgets."""

    budgets: list[IsoBudget]
    skipped: list[tuple[float, str]]
    a: float
    n_intercept: float
    b: float
    d_intercept: float

    def N_opt(self, C) -> np.ndarray:
        return np.exp(self.n_intercept) * np.asarray(C, dtype=np.float64) ** self.a

    def D_opt(self, C) -> np.ndarray:
        return np.exp(self.d_intercept) * np.asarray(C, dtype=np.float64) ** self.b

    def to_dict(self) -> dict:
        return {"N_opt_exponent": self.a, "N_opt_coefficient": math.exp(self.n_intercept),
                "D_opt_exponent": self.b, "D_opt_coefficient": math.exp(self.d_intercept),
                "budgets": [bud.to_dict() for bud in self.budgets],
                "skipped": [{"C": c, "reason": why} for c, why in self.skipped]}


def _parabola(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    center = float(x.mean())
    return np.polyfit(x - center, y, 2), center


def isoflop_fit(N, D, C, L, *, budget=None, tolerance: float = 0.1, min_sizes: int = 3) -> IsoFlopFit:
    """Chinchilla approach 2: per compute budget (rows grouped by ``budget`` labels if given, else by C within the
    relative ``tolerance``), fit parabolas of loss in ln N and in ln D and take their minima N_opt(C), D_opt(C);
    then fit ln N_opt = a ln C + const and ln D_opt = b ln C + const. A budget needs ``min_sizes`` distinct N and a
    convex parabola; at least 2 budgets must qualify."""
    N, D, C, L = _positive("N", N), _positive("D", D), _positive("C", C), _positive("loss", L)
    _same_length(N=N, D=D, C=C, loss=L)
    if budget is None:
        labels = group_budgets(C, tolerance)
    else:
        _, labels = np.unique(np.asarray(budget).astype(str), return_inverse=True)
        if labels.size != N.size:
            raise ScalingError(f"budget has {labels.size} labels for {N.size} rows")
    budgets, skipped = [], []
    for lab in np.unique(labels):
        sel = labels == lab
        c_b = float(np.exp(np.log(C[sel]).mean()))
        n_b, d_b, l_b = N[sel], D[sel], L[sel]
        k = np.unique(n_b).size
        if k < min_sizes:
            skipped.append((c_b, f"{k} distinct model size(s), a parabola needs at least {min_sizes}"))
            continue
        coef_n, cn = _parabola(np.log(n_b), l_b)
        coef_d, cd = _parabola(np.log(d_b), l_b)
        if coef_n[0] <= 0 or coef_d[0] <= 0:
            skipped.append((c_b, "loss vs size is not convex (no minimum inside or near the sizes tried)"))
            continue
        xn = -coef_n[1] / (2 * coef_n[0])
        xd = -coef_d[1] / (2 * coef_d[0])
        n_opt, d_opt = math.exp(cn + xn), math.exp(cd + xd)
        budgets.append(IsoBudget(c_b, n_b, d_b, l_b, coef_n, cn, coef_d, cd, n_opt, d_opt,
                                 float(np.polyval(coef_n, xn)), bool(n_b.min() <= n_opt <= n_b.max())))
    if len(budgets) < 2:
        detail = "; ".join(f"C={c:.3g}: {why}" for c, why in skipped) or "no rows"
        raise ScalingError(f"isoFLOP fit needs at least 2 compute budgets with {min_sizes}+ model sizes each, "
                           f"got {len(budgets)} ({detail})")
    logc = np.log([bud.C for bud in budgets])
    a, n0 = np.polyfit(logc, np.log([bud.N_opt for bud in budgets]), 1)
    b, d0 = np.polyfit(logc, np.log([bud.D_opt for bud in budgets]), 1)
    return IsoFlopFit(budgets, skipped, float(a), float(n0), float(b), float(d0))


# ------------------------------------------------------------------------------------------------ the table


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


def _exp(x: float) -> float:
    """exp that gives inf instead of raising: a bootstrap refit may wander to a huge log-coefficient, which the
    percentile intervals then ignore (they keep finite values)."""
    return math.exp(x) if x < 709.0 else math.inf


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
            df[col] = _positive(col, values)
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


# ------------------------------------------------------------------------------------------------------ plots


def plot_results(results: Sequence[FamilyResult], out_dir: str | Path) -> list[Path]:
    """Write loss_vs_compute.png, isoflop.png and optimal_n.png to ``out_dir``; returns their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    colors = [f"C{i}" for i in range(10)]
    paths = []

    def save(fig: Figure, name: str) -> None:
        FigureCanvasAgg(fig)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        paths.append(path)

    # (a) loss vs compute with the fitted law's compute-optimal frontier
    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    for i, r in enumerate(results):
        col = colors[i % len(colors)]
        ax.scatter(r.C, r.L, s=14, alpha=0.6, color=col, label=f"{r.name} runs")
        if r.chinchilla is not None and r.chinchilla.has_optimum:
            cs = np.geomspace(r.C.min() / 2, r.C.max() * 10, 200)
            ax.plot(cs, compute_optimal(r.chinchilla, cs, r.k).loss, color=col,
                    label=f"{r.name} frontier (approach 3, C = {r.k:.3g}ND)")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="validation loss (nats/token)",
           title="loss vs compute; frontier: min L(N, D) s.t. kND = C")
    ax.legend(fontsize=8)
    save(fig, "loss_vs_compute.png")

    # (b) isoFLOP curves, one panel per family
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    fig = Figure(figsize=(5 * len(results), 4.2))
    for i, r in enumerate(results):
        ax = fig.add_subplot(1, len(results), i + 1)
        ax.set(xscale="log", xlabel="parameters N", ylabel="validation loss", title=f"{r.name}: isoFLOP")
        if r.isoflop is None:
            ax.scatter(r.N, r.L, s=10, color="gray")
            ax.text(0.5, 0.5, "no isoFLOP fit:\nneeds 2+ budgets with\n3+ sizes each", transform=ax.transAxes,
                    ha="center", va="center", fontsize=9)
            continue
        logc = np.log10([bud.C for bud in r.isoflop.budgets])
        span = max(float(logc.max() - logc.min()), 1e-9)
        for bud, lc in zip(r.isoflop.budgets, logc):
            col = cmap(0.9 * (lc - logc.min()) / span)
            ax.scatter(bud.N, bud.L, s=14, color=col)
            ns = np.geomspace(min(bud.N.min(), bud.N_opt), max(bud.N.max(), bud.N_opt), 100)
            ax.plot(ns, bud.parabola_n(ns), color=col, lw=1, label=f"C={bud.C:.2g}")
            ax.plot([bud.N_opt], [bud.L_opt], marker="*", ms=10, color=col, mec="k", mew=0.5)
        ax.legend(fontsize=7)
    save(fig, "isoflop.png")

    # (c) N*(C) from both approaches
    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    for i, r in enumerate(results):
        col = colors[i % len(colors)]
        cs = np.geomspace(r.C.min() / 2, r.C.max() * 10, 100)
        if r.chinchilla is not None and r.chinchilla.has_optimum:
            ax.plot(cs, compute_optimal(r.chinchilla, cs, r.k).N, color=col,
                    label=f"{r.name} approach 3: C^{r.chinchilla.n_exponent:.3f}")
        if r.isoflop is not None:
            ax.scatter([bud.C for bud in r.isoflop.budgets], [bud.N_opt for bud in r.isoflop.budgets],
                       color=col, marker="o", edgecolor="k", zorder=3)
            ax.plot(cs, r.isoflop.N_opt(cs), color=col, ls="--", label=f"{r.name} approach 2: C^{r.isoflop.a:.3f}")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="compute-optimal parameters N*",
           title="N*(C): fitted law (solid), isoFLOP minima (points, dashed)")
    ax.legend(fontsize=8)
    save(fig, "optimal_n.png")
    return paths


# -------------------------------------------------------------------------------------------------------- CLI


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


KEYS = (
    Key("results", "the results table: CSV, or Parquet (.parquet/.pq)", required=True),
    Key("out", "folder for fit.json and the plots (default: next to the results table)"),
    Key("family_column", "the column that names the model family", "family"),
    Key("bootstrap", "bootstrap refits per family (0: none)", 200, int, minimum=0),
    Key("seed", "seed of the bootstrap resampling", 0, int),
    Key("tolerance", "relative spread of C within one isoFLOP budget (ignored with a 'budget' column)", 0.1, float,
        minimum=0.0),
    Key("grid", "initialisation grid of approach 3: chinchilla (4500 points) or small (432)", "chinchilla",
        choices=tuple(sorted(GRIDS))),
    Key("starts", "run L-BFGS only from the STARTS grid points with the lowest initial objective (default: all)",
        type=int, minimum=1),
    Key("flops_per_param_token", "k of C = k N D in the compute-optimal allocation: a number, or 'auto' for each "
        "family's median C / (N D), which puts the frontier on the sweep's own FLOP scale", "6"),
)
PROG = "python -m prime_scale.scaling fit"


def main(argv: Optional[list[str]] = None) -> int:
    """``fit``: exit status 0 every family fitted; 1 some family could not be fitted (the others are written);
    2 a usage error or a table that cannot be read, before any fit."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        print(f"{__doc__}\nKeys of {PROG}:\n{keys_help(KEYS)}")
        return EXIT_OK
    if not argv or argv[0] != "fit":
        print_error(f"the first word is the command, 'fit'; got {' '.join(argv[:1]) or 'nothing'}", PROG)
        return EXIT_USAGE
    return guarded(lambda: fit_command(argv[1:]), PROG, usage=(ScalingError,))


def fit_command(argv: list[str]) -> int:
    args = argparse.Namespace(**parse_keys(argv, KEYS, positional=("results",)))
    if args.tolerance >= 1:
        raise UsageError(f"tolerance must be in [0, 1), got {args.tolerance}")
    k = args.flops_per_param_token
    if k != "auto":
        try:
            k = float(k)
        except ValueError:
            k = math.nan
        if not (math.isfinite(k) and k > 0):
            raise UsageError(f"flops_per_param_token expects a number > 0 or 'auto', got {args.flops_per_param_token!r}")
    df = read_results(args.results, args.family_column)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    out_dir = Path(args.out) if args.out else Path(args.results).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    results = fit_table(df, family_column=args.family_column, grid=GRIDS[args.grid], n_starts=args.starts,
                        n_boot=args.bootstrap, seed=args.seed, tolerance=args.tolerance,
                        flops_per_param_token=k, log=log)
    print(format_report(results))
    report = {"results": str(Path(args.results).resolve()), "family_column": args.family_column,
              "model": "L(N, D) = E + A / N^alpha + B / D^beta", "flops_per_param_token": k,
              "approach3": {"grid": args.grid, "grid_points": GRIDS[args.grid].size(), "starts": args.starts,
                            "huber_delta": HUBER_DELTA, "bootstrap": args.bootstrap, "seed": args.seed},
              "approach2": {"tolerance": args.tolerance, "grouped_by": "budget" if "budget" in df.columns else "C"},
              "families": {r.name: r.to_dict() for r in results}}
    (out_dir / "fit.json").write_text(json.dumps(_jsonable(report), indent=2) + "\n")
    paths = plot_results(results, out_dir)
    log(f"[scaling] wrote {out_dir / 'fit.json'}, " + ", ".join(p.name for p in paths))
    failed = [r.name for r in results if r.chinchilla is None]
    for name in failed:
        log(f"error: family {name!r}: {next(r.chinchilla_error for r in results if r.name == name)}")
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
