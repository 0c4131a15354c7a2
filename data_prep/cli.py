"""The command line every data-prep job shares: ``python -m data_prep.JOB config=NAME key=value ... [--workers N]
[--overwrite] [--no-progress] [--slurm ...]`` (docs/data_prep.md), its exit status (docs/cli.md) and the short
summary printed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from data_prep import batch
from data_prep.job import Job
from data_prep.slurm import SLURM_DEFAULTS
from prime_scale.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, config_parser, print_error
from prime_scale.config import Config, ConfigError, load_config
from prime_scale.data.errors import DataPrepError, DataPrepFailure
from prime_scale.launch.slurm_tools import SlurmOptions, add_slurm_options
from prime_scale.runlock import RunLocked


def cli_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = config_parser(prog, description, sections=("data", "prep"),
                      words="config=NAME and dotted key=value overrides (data.*, prep.*)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset already at data.path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = p.add_argument_group("SLURM (units as a submitit job array)")
    s.add_argument("--slurm", action="store_true", help="run the units as a SLURM job array")
    add_slurm_options(s, SLURM_DEFAULTS, requeue=False, array=True)  # --timeout-min: per array task
    s.add_argument("--logs", default=SLURM_DEFAULTS.logs, help="folder for submitit's logs and pickles")
    return p


def cli_main(make_job: Callable[[Config], Job], prog: str, description: str, argv: list[str] | None = None) -> int:
    args = cli_parser(prog, description).parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        cfg = load_config(args.overrides, check_schedule=False)  # the training schedule is the training's to check
    except ConfigError as e:
        print_error(str(e), prog)
        return EXIT_USAGE
    slurm = SlurmOptions.from_args(args, SLURM_DEFAULTS) if args.slurm else None
    try:
        manifest = batch.run_job(make_job(cfg), workers=args.workers, slurm=slurm, overwrite=args.overwrite,
                                 progress=not args.no_progress)
    except DataPrepFailure as e:  # started, did not finish
        print(f"data prep failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (DataPrepError, RunLocked) as e:  # refused before any unit ran
        print_error(str(e), prog)
        return EXIT_USAGE
    print(json.dumps(summary(manifest, cfg.data.path), indent=2))
    return EXIT_OK


def summary(manifest: dict, url: str) -> dict:
    """The short account printed at the end of a job."""
    return {
        "path": url,
        "splits": {name: {k: v for k, v in split.items() if k != "shards"} | {"shards": len(split["shards"])}
                   for name, split in manifest["splits"].items()},
        "skipped": manifest.get("skipped", {}).get("counts", {}),
    }
