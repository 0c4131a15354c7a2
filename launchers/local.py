"""``python launchers/local.py ...`` = ``python -m prime_scale.launch.local ...`` (kept so that commands written for a
checkout keep working; the package must be installed: ``pip install -e .``)."""

import sys

from prime_scale.launch.local import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
