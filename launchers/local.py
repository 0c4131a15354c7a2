"""Run a job on this machine: ``python launchers/local.py config=demo [key=value ...]``.

Today one process (CPU or one GPU); the multi-rank DeepSpeed path arrives with the training engine.
"""

from __future__ import annotations

import sys

from prime_scale.config import ConfigError, load_config
from prime_scale.pipeline import run


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
