"""Command line of the study: ``python -m dftkern.experiments.dft_study [--quick] [--seeds ...] [--workers N]``."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .config import StudyConfig

__all__ = ["build_parser", "main"]

_PROG = "python -m dftkern.experiments.dft_study"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG, description="DFT vs SFT as the DFT paper runs it (one stage from a weak base model, negatives "
                                "sampled at T=0.7 and fresh each epoch), over several seeds, with the learning "
                                "rate of every method chosen on a validation split. See docs/dft_study.md.")
    parser.add_argument("--quick", action="store_true", help="toy sizes, 2 seeds, seconds (for CI)")
    parser.add_argument("--out", default=None,
                        help="where results.json / results.md / accuracy.png go (default: docs/dft_study; "
                             "with --quick: <work>/results)")
    parser.add_argument("--work", default=None,
                        help="scratch directory for models and runs; an interrupted study resumes from it "
                             "(default: runs/dft_study, with --quick runs/dft_study-quick)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="study seeds (default: 0 1 2 3 4)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, 1 torch thread each (default: 2)")
    parser.add_argument("--fresh", action="store_true", help="delete the work directory first (no resuming)")
    parser.add_argument("--keep-models", action="store_true", help="keep every run's final weights")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        print(f"{_PROG}: error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    overrides = {"workers": args.workers, "keep_models": args.keep_models}
    if args.seeds is not None:
        overrides["seeds"] = tuple(args.seeds)
    try:
        cfg = StudyConfig.quick_preset(**overrides) if args.quick else StudyConfig(**overrides)
    except ValueError as err:
        print(f"{_PROG}: error: {err}", file=sys.stderr)
        return 2
    work = Path(args.work or ("runs/dft_study-quick" if args.quick else "runs/dft_study"))
    out = Path(args.out) if args.out else (work / "results" if args.quick else Path("docs/dft_study"))
    if args.fresh and work.exists():
        shutil.rmtree(work)
    from .study import format_table, run_study

    results = run_study(cfg, work=work, out=out, command=" ".join([_PROG, *argv]))
    print("\n" + format_table(results))
    print(f"\nwall time {results['config']['wall_seconds'] / 60:.1f} min; results in {out.resolve()}")
    return 0
