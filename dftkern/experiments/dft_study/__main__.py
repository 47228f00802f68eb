"""``python -m dftkern.experiments.dft_study``: see :mod:`dftkern.experiments.dft_study.cli`."""

import sys

from .cli import main

sys.exit(main())
