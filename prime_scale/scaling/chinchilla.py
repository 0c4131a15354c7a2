"""Chinchilla approach 3 (Hoffmann et al. 2022): the law L(N, D) = E + A / N^alpha + B / D^beta fitted by L-BFGS on
the Huber loss of log residuals from a grid of initialisations (``fit_chinchilla``), its bootstrap confidence
intervals (``bootstrap``), and the compute-optimal allocation the fitted law implies under C = k N D
(``compute_optimal``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import numpy as np

from prime_scale.scaling.inputs import ScalingError, positive, same_length

PARAMS = ("e", "a", "b", "alpha", "beta")  # the optimisation vector theta, in this order
HUBER_DELTA = 1e-3  # Hoffmann et al. 2022


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


def _exp(x: float) -> float:
    """exp that gives inf instead of raising: a bootstrap refit may wander to a huge log-coefficient, which the
    percentile intervals then ignore (they keep finite values)."""
    return math.exp(x) if x < 709.0 else math.inf


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
    N, D, L = positive("N", N), positive("D", D), positive("loss", L)
    same_length(N=N, D=D, loss=L)
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
    N, D, L = positive("N", N), positive("D", D), positive("loss", L)
    same_length(N=N, D=D, loss=L)
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
    c = positive("C", np.atleast_1d(C)) / flops_per_param_token
    n_opt = fit.G * c ** fit.n_exponent
    d_opt = c / n_opt
    out = Allocation(n_opt, d_opt, fit.predict(n_opt, d_opt))
    if np.ndim(C) == 0:
        return Allocation(*(float(v[0]) for v in out))
    return out
