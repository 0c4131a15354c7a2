"""Scaling laws from a results table (docs/scaling.md): ``python -m prime_scale.scaling fit results=TABLE`` fits,
for every model family, Chinchilla's approaches 3 and 2 and the compute-optimal allocation, and writes ``fit.json``
and three plots. Every fit is a pure function of its arguments: no global state.

The modules, in the order a fit uses them:

    inputs.py       ``ScalingError`` and the checks of the columns (finite, > 0, one length)
    chinchilla.py   approach 3: L(N, D) = E + A / N^alpha + B / D^beta by L-BFGS from a grid of initialisations
                    (``fit_chinchilla`` -> ``ChinchillaFit``), ``bootstrap`` intervals, ``compute_optimal``
    isoflop.py      approach 2: isoFLOP parabolas per budget and N_opt ~ C^a, D_opt ~ C^b (``isoflop_fit``)
    table.py        the results table: ``read_results``, ``fit_table`` (one ``FamilyResult`` per family),
                    ``format_report``
    plots.py        ``plot_results``: the three PNGs (matplotlib, imported when they are drawn)
    cli.py          the ``fit`` command: its keys, ``main``, fit.json

Import the API from here: ``from prime_scale.scaling import fit_chinchilla, isoflop_fit, read_results``.
"""

from prime_scale.scaling.chinchilla import (BOOT_NAMES, CHINCHILLA_GRID, GRIDS, HUBER_DELTA, SMALL_GRID, Allocation,
                                            BootstrapResult, ChinchillaFit, InitGrid, bootstrap, compute_optimal,
                                            fit_chinchilla)
from prime_scale.scaling.cli import main
from prime_scale.scaling.inputs import ScalingError
from prime_scale.scaling.isoflop import IsoBudget, IsoFlopFit, group_budgets, isoflop_fit
from prime_scale.scaling.plots import plot_results
from prime_scale.scaling.table import REQUIRED_COLUMNS, FamilyResult, fit_table, format_report, read_results

__all__ = ["BOOT_NAMES", "CHINCHILLA_GRID", "GRIDS", "HUBER_DELTA", "REQUIRED_COLUMNS", "SMALL_GRID", "Allocation",
           "BootstrapResult", "ChinchillaFit", "FamilyResult", "InitGrid", "IsoBudget", "IsoFlopFit", "ScalingError",
           "bootstrap", "compute_optimal", "fit_chinchilla", "fit_table", "format_report", "group_budgets",
           "isoflop_fit", "main", "plot_results", "read_results"]
