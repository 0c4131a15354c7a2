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
from pathlib import Path
from typing import Optional

import numpy as np

from prime_scale.cli import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, Key, UsageError, guarded, keys_help, parse_keys,
                             print_error, wants_help)
from prime_scale.scaling.chinchilla import GRIDS, HUBER_DELTA
from prime_scale.scaling.inputs import ScalingError
from prime_scale.scaling.plots import plot_results
from prime_scale.scaling.table import fit_table, format_report, read_results


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

