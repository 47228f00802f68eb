"""``python -m dftkern.train``: see :mod:`dftkern.train.cli` (``--help`` lists every stage's options)."""

import sys

from .cli import main

sys.exit(main())
