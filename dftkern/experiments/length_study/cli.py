"""Command line: ``python -m dftkern.experiments.length_study [--quick] [--out DIR] ...``."""

from __future__ import annotations

import argparse
import sys

from .config import LengthStudyConfig
from .study import run_length_study

__all__ = ["build_parser", "main"]

_PROG = "python -m dftkern.experiments.length_study"
_DESCRIPTION = ("The synthetic length tasks of Tajwar et al. (2024), in miniature, through dftkern's reference "
                "trainer: offline vs on-policy data, with and without a negative gradient.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_PROG, description=_DESCRIPTION)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed, seconds (for CI)")
    parser.add_argument("--out", default="docs/length_study",
                        help="output directory: results.md, results.json, reward_vs_steps.png "
                             "(default: docs/length_study)")
    parser.add_argument("--work", default=None,
                        help="where the reference model (reused when its settings match) and the scratch runs "
                             "go (default: runs/length_study)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: 0 1)")
    parser.add_argument("--steps", type=int, default=None, help="gradient steps S per run (default: 40)")
    parser.add_argument("--refresh-every", type=int, default=None,
                        help="on-policy: steps between sampling rounds (default: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0 = torch's default (default: 1)")
    parser.add_argument("--progress", action="store_true", help="show the trainer's progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = LengthStudyConfig(out=args.out, work=args.work, quick=args.quick, threads=args.threads or None, progress=args.progress)
    if args.seeds is not None:
        cfg.seeds = tuple(args.seeds)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.refresh_every is not None:
        cfg.refresh_every = args.refresh_every
    try:
        run_length_study(cfg)
    except ValueError as err:
        print(f"{build_parser().prog}: error: {err}", file=sys.stderr)
        return 2
    return 0

