"""Command line: ``python -m dftkern.experiments.bandit [--quick] [--out DIR] [knobs]``."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .config import QUICK_OVERRIDES, BanditConfig
from .env import REGIMES, REWARDS
from .methods import ALL_METHODS
from .policies import POLICIES
from .report import write_outputs
from .run import run_experiment

__all__ = ["build_parser", "config_from_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    defaults = BanditConfig()
    parser = argparse.ArgumentParser(
        prog="python -m dftkern.experiments.bandit",
        description="Tajwar et al. (2024) 100-action bandit: on-policy / negative-gradient objectives vs "
        "maximum likelihood, every loss from dftkern's loss registry.",
    )
    parser.add_argument("--out", type=Path, default=Path("bandit_out"), help="output folder (default: bandit_out)")
    parser.add_argument("--quick", action="store_true",
                        help=f"CI setting (< 20 s): overrides {QUICK_OVERRIDES} unless given explicitly")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNGs (table and JSON only)")
    parser.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the matrices are tiny, threads only add overhead)")
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, tuple):
            known = {"methods": ALL_METHODS, "regimes": REGIMES, "rewards": tuple(REWARDS)}[name]
            parser.add_argument(flag, nargs="+", default=None, metavar="NAME",
                                help=f"default: {' '.join(value)}; any of: {' '.join(known)}")
        elif name == "policy":
            parser.add_argument(flag, choices=POLICIES, default=None, help=f"default: {value}")
        else:
            parser.add_argument(flag, type=type(value), default=None, help=f"default: {value}")
    return parser


def config_from_args(args: argparse.Namespace) -> BanditConfig:
    """Defaults, then ``--quick`` overrides, then explicit flags."""
    config = BanditConfig()
    if args.quick:
        config = replace(config, **QUICK_OVERRIDES)
    explicit = {}
    for name in asdict(config):
        value = getattr(args, name)
        if value is not None:
            explicit[name] = tuple(value) if isinstance(value, list) else value
    return replace(config, **explicit).validate()


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point; returns ``{"results", "files"}`` for programmatic use."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        progress = None if args.quiet else (lambda line: print(line, flush=True))
        results = run_experiment(config, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python -m dftkern.experiments.bandit" + "".join(" " + shlex.quote(a) for a in argv_list)
    files = write_outputs(results, args.out, command, plots=not args.no_plot)
    if not args.quiet:
        print(f"done in {results['seconds']:.1f} s; wrote " + ", ".join(str(p) for p in files.values()))
    return {"results": results, "files": files}

