"""Command line: ``python -m dftkern.experiments.length_study [--quick] [--out DIR] ...``."""

from __future__ import annotations

import argparse
import shlex
import sys

from .config import LOSSES, LengthStudyConfig
from .rewards import LENGTH_REWARDS
from .study import run_length_study

__all__ = ["build_parser", "main"]

_PROG = "python -m dftkern.experiments.length_study"
_DESCRIPTION = ("The synthetic length tasks of Tajwar et al. (2024), in miniature, through dftkern's reference "
                "trainer: offline vs on-policy data, with and without a negative gradient (rwr = maximum "
                "likelihood; dpo, reinforce, ppo, grpo). ppo, ppo_2ep (two updates per sampled window), grpo "
                "and dpo_sampler (on-policy DPO against the moving sampler) run on-policy only.")


def build_parser() -> argparse.ArgumentParser:
    defaults = LengthStudyConfig()
    parser = argparse.ArgumentParser(prog=_PROG, description=_DESCRIPTION)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed, seconds (for CI)")
    parser.add_argument("--out", default=defaults.out,
                        help=f"output directory: results.md, results.json, reward_vs_steps.png (default: {defaults.out})")
    parser.add_argument("--work", default=None,
                        help="where the reference model (reused when its settings match) and the scratch runs "
                             "go (default: runs/length_study)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help=f"training seeds (default: {' '.join(map(str, defaults.seeds))})")
    parser.add_argument("--steps", type=int, default=None, help=f"gradient steps S per run (default: {defaults.steps})")
    parser.add_argument("--num-checkpoints", type=int, default=None,
                        help=f"evaluations after step 0 (default: {defaults.num_checkpoints})")
    parser.add_argument("--losses", nargs="+", default=None, choices=LOSSES,
                        help=f"losses to run (default: {' '.join(defaults.losses)})")
    parser.add_argument("--rewards", nargs="+", default=None, choices=LENGTH_REWARDS,
                        help=f"rewards to run (default: {' '.join(defaults.rewards)})")
    parser.add_argument("--refresh-every", type=int, default=None,
                        help=f"on-policy: steps between sampling rounds (default: {defaults.refresh_every})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (per worker); 0 = torch's default (default: 1)")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"runs trained at once, each in its own process (default: {defaults.workers}); "
                             "the results do not depend on it")
    parser.add_argument("--progress", action="store_true", help="show the trainer's progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = LengthStudyConfig(out=args.out, work=args.work, quick=args.quick, threads=args.threads or None,
                            progress=args.progress)
    for name in ("seeds", "losses", "rewards"):
        if getattr(args, name) is not None:
            setattr(cfg, name, tuple(getattr(args, name)))
    for name in ("steps", "num_checkpoints", "refresh_every", "workers"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = _PROG + "".join(" " + shlex.quote(a) for a in argv_list)
    try:
        run_length_study(cfg, command=command)
    except ValueError as err:
        print(f"{build_parser().prog}: error: {err}", file=sys.stderr)
        return 2
    return 0
