"""``python launchers/sweep.py ...`` = ``python -m prime_scale.launch.sweep ...`` (kept so that commands written for a
checkout keep working; the package must be installed: ``pip install -e .``)."""

import sys

from prime_scale.launch.sweep import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
