"""Run a job on this machine: ``python launchers/local.py [--nproc K] config=NAME [key=value ...]``.

Data prep (the synthetic source is prepared here; text and image shards must exist at data.path), training on
the DeepSpeed engine with K ranks (torchrun; CPU with gloo, or one GPU per rank with nccl), then evaluation and
samples on the final weights. Run the same command again after an interruption: training resumes from the
latest checkpoint (ckpt.resume=auto).

Ctrl-C or SIGTERM: every rank saves at the next step boundary and the launcher exits with status 75; a second
Ctrl-C stops at once without saving. If this launcher is killed outright, torchrun and the ranks die with it.
Exit status: 0 done, 2 a bad config or a run folder in use by another run, 75 stopped after a save (rerun to
continue), else the training's failure status.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from prime_scale.config import ConfigError, load_config  # noqa: E402
from prime_scale.pipeline import run  # noqa: E402
from prime_scale.runlock import RunLocked  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python launchers/local.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=1, help="training ranks on this machine (default 1)")
    parser.add_argument("--grace", type=int, default=120, metavar="SECONDS",
                        help="after a stop (Ctrl-C, SIGTERM), how long the ranks may take to save before torchrun "
                             "kills them (default 120)")
    parser.add_argument("overrides", nargs="*", help="config=NAME and dotted key=value overrides")
    args = parser.parse_intermixed_args(argv)  # options may come after key=value overrides
    if args.nproc < 1:
        parser.error("--nproc must be at least 1")
    if args.grace < 1:
        parser.error("--grace must be at least 1 second")
    try:
        cfg = load_config(args.overrides)
        return run(cfg, args.overrides, args.nproc, args.grace)  # 75: stopped by a signal after a save
    except ConfigError as e:  # a bad config, or data that disagrees with it: found before training starts
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except RunLocked as e:  # another live run writes this run folder
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
