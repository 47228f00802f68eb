"""``python -m dftkern.experiments.length_study``: see :mod:`dftkern.experiments.length_study.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
