"""``python -m prime_scale.scaling fit ...``: the command of prime_scale.scaling.cli."""

import sys

from prime_scale.scaling.cli import main

if __name__ == "__main__":
    sys.exit(main())
