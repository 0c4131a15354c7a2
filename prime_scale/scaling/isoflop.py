"""Chinchilla approach 2: isoFLOP parabolas. The runs are grouped into compute budgets (``group_budgets``); per
budget, parabolas of loss in ln N and in ln D give the loss-minimising N_opt(C) and D_opt(C); power laws
N_opt ~ C^a and D_opt ~ C^b are then fitted across the budgets (``isoflop_fit``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from prime_scale.scaling.inputs import ScalingError, positive, same_length


def group_budgets(C, tolerance: float = 0.1) -> np.ndarray:
    """Integer budget labels: rows sorted by C start a new budget when C exceeds the current budget's smallest C by
    more than the relative ``tolerance``. Labels increase with C."""
    c = positive("C", C)
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
    N, D, C, L = positive("N", N), positive("D", D), positive("C", C), positive("loss", L)
    same_length(N=N, D=D, C=C, loss=L)
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
