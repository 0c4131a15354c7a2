"""The three PNG plots of a fit (docs/scaling.md, "Reading the plots"): loss vs compute with approach 3's
compute-optimal frontier, the isoFLOP parabolas, and N*(C) from both approaches. matplotlib is imported inside
``plot_results``, so importing the package (and ``--help``) does not pay for it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from prime_scale.scaling.chinchilla import compute_optimal
from prime_scale.scaling.table import FamilyResult


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
