"""Run a job on this machine: ``python -m prime_scale.launch.local [--nproc K] config=NAME [key=value ...]``.

Data prep (the synthetic source is prepared here; text and image shards must exist at data.path), training on
the DeepSpeed engine with K ranks (torchrun; CPU with gloo, or one GPU per rank with nccl), then evaluation and
samples on the final weights. Run the same command again after an interruption: training resumes from the
latest checkpoint (ckpt.resume=auto). ``python launchers/local.py`` is the same command.

Ctrl-C or SIGTERM: every rank saves at the next step boundary and the launcher exits with status 75; a second
Ctrl-C stops at once without saving. If this launcher is killed outright, torchrun and the ranks die with it.
Exit status (docs/cli.md): 0 done, 1 training failed, 2 a bad config or a run folder in use by another run, 75
stopped after a save (rerun to continue).
"""

from __future__ import annotations

import sys
from typing import Optional

from prime_scale.cli import config_parser, guarded
from prime_scale.config import load_config
from prime_scale.pipeline import run
from prime_scale.runlock import RunLocked


PROG = "python -m prime_scale.launch.local"


def main(argv: Optional[list[str]] = None) -> int:
    parser = config_parser(PROG, __doc__)
    parser.add_argument("--nproc", type=int, default=1, help="training ranks on this machine (default 1)")
    parser.add_argument("--grace", type=int, default=120, metavar="SECONDS",
                        help="after a stop (Ctrl-C, SIGTERM), how long the ranks may take to save before torchrun "
                             "kills them (default 120)")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)  # options after overrides too
    if args.nproc < 1:
        parser.error("--nproc must be at least 1")
    if args.grace < 1:
        parser.error("--grace must be at least 1 second")
    # a bad config, data that disagrees with it, or a run folder another live run writes: found before training
    # starts (exit 2); otherwise the training's status, 75 when a signal stopped it after a save
    return guarded(lambda: run(load_config(args.overrides), args.overrides, args.nproc, args.grace), PROG,
                   usage=(RunLocked,))


if __name__ == "__main__":
    sys.exit(main())
