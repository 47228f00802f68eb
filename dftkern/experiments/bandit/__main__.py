"""``python -m dftkern.experiments.bandit``: see :mod:`dftkern.experiments.bandit.cli`."""

from .cli import main

if __name__ == "__main__":
    main()
