"""Sweeps: a spec (``prime_scale/configs/sweeps/NAME.yaml``, package data) of a base config, model families and a
grid of points, expanded into one engine run per point with its parameter count N, training tokens D and training
FLOPs C.

``python -m prime_scale.launch.sweep sweep=NAME`` runs them (docs/scaling.md, "Running a sweep"). A spec::

    base: text_demo                  # a config name from prime_scale/configs/, or a path relative to the spec
    overrides: [data.seq_len=64]     # applied to every point ("key=value" strings, or a mapping)
    families:                        # name -> overrides; every point runs once per family
      mdm: [prime.num_subtokens=1]
      prime_l2: [prime.num_subtokens=2]
    grid:                            # key -> values: the cartesian product ...
      model.d_model: [32, 64]
      train.steps: [50, 100]
    # points: [{model.d_model: 32, train.steps: 50}, ...]      # ... or an explicit list of points
    # isoflop: {budgets: [1e11, 3e11], sizes: [{model.d_model: 32}, ...]}   # ... or compute budgets x sizes
    seeds: [0, 1]                    # sets train.seed (default: the base config's seed)
    max_warmup_fraction: 0.1         # warmup is clamped to this fraction of a point's steps

Every point gets a stable id (``family-slug-seedS``, the slug naming the point's own settings, e.g.
``prime_l2-d64_s100-seed0``), ``run.name=SWEEP/ID``, ``run.out_dir=OUT`` (so its folder is OUT/SWEEP/ID),
``ckpt.resume=auto`` and ``train.eval_every=steps`` (validation once, at the end). N is the *non-embedding*
parameter count, ``model.num_params(include_embedding=False)`` (everything but the sub-token embedding table; the
output head and a Prime merge MLP count); D = steps x batch_size x seq_len tokens; C = flops_per_token x D with
``prime_scale.metrics.flops_per_token`` (matrices applied per token x 6, plus attention; not exactly 6 N).

In isoFLOP mode a point's steps are ``round(C_budget / flops_per_token / (batch_size x seq_len))`` (at least 1),
and a point whose rounded steps move C more than 10% off its budget carries a warning.

The modules, in the order a sweep uses them:

    spec.py     the grammar above: ``load_spec`` -> ``SweepSpec`` (errors: ``SweepError``)
    points.py   ``expand``: the spec -> its ``Point``s, with ids, engine command lines and N, D, C
    state.py    a point's run folder as its state (pending, started, done, failed, mismatch) and its markers
                (``done.json``, ``failed.json``, ``attempts.jsonl``)
    results.py  the results table (``results.csv``, ``results.parquet``) and its text form
    slurm.py    ``SweepJob``, a point as a SLURM array task, and ``slurm.json``, the record of submissions

spec.py and points.py are pure functions of the spec, the overrides and the config files; state.py, results.py and
slurm.py read and write the run folders.
"""

from prime_scale.sweep.points import DEFAULT_OUT, Point, expand, model_size
from prime_scale.sweep.results import RESULT_COLUMNS, collect, format_table, results_rows, write_results
from prime_scale.sweep.slurm import SLURM_STATE, SweepJob, live_tasks, record_submission
from prime_scale.sweep.spec import SweepError, SweepSpec, available_sweeps, load_spec, parse_spec
from prime_scale.sweep.state import (ATTEMPTS, DONE, FAILED, PointState, mark_failed, mark_finished, read_state,
                                     record_attempt)

__all__ = ["ATTEMPTS", "DEFAULT_OUT", "DONE", "FAILED", "RESULT_COLUMNS", "SLURM_STATE", "Point", "PointState",
           "SweepError", "SweepJob", "SweepSpec", "available_sweeps", "collect", "expand", "format_table",
           "live_tasks", "load_spec", "mark_failed", "mark_finished", "model_size", "parse_spec", "read_state",
           "record_attempt", "record_submission", "results_rows", "write_results"]
