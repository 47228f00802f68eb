"""The study's protocol for one seed, at fixed learning rates: the built-in main job.

``python -m dftkern.experiments.dft_study.one_seed [--seed S] [--out DIR] [--quick] [--workers N]
[--device D] [--threads N] [--no-progress]`` (and ``python -m dftkern.train`` with no stage, which
passes the same options) builds the seed's base model,
samples its negatives, trains every method and ablation once from it with the learning rate that
the multi-seed study selected on validation (:data:`STUDY_LRS`), and prints one table. One seed is
an anecdote: the table is followed by a pointer to the study (``docs/dft_study.md``), whose numbers
are means ± sd over seeds with paired tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from dftkern.train.plotting import markdown_table

from .config import ABLATIONS, METHODS, StudyConfig, resolve_study_device

__all__ = ["STUDY_LRS", "one_seed_config", "run_one_seed", "format_one_seed_table", "study_pointer", "main"]

#: learning rates selected on validation by the committed study (docs/dft_study/results.json)
STUDY_LRS = {"sft": 1e-3, "sft_mean": 1e-3, "dft": 3e-4, "dft2": 1e-3, "exact_sampling": 1e-3, "filtered": 1e-3,
             "sft_dpo": 1e-5}

_STUDY_DOC = "docs/dft_study.md"
_STUDY_RESULTS = Path(__file__).resolve().parents[3] / "docs" / "dft_study" / "results.json"


def one_seed_config(seed: int = 0, *, quick: bool = False, workers: int = 2, device: str = "cpu",
                    threads: int = 1) -> StudyConfig:
    """The study's configuration with one seed and a one-value grid per arm (:data:`STUDY_LRS`), run by
    ``workers`` processes with ``threads`` torch threads each (0 = torch's default) on ``device``."""
    base = StudyConfig.quick_preset() if quick else StudyConfig()
    return replace(base, seeds=(seed,), workers=workers, device=device, threads=threads,
                   lr_grid={name: (lr,) for name, lr in STUDY_LRS.items()})


def format_one_seed_table(results: dict) -> str:
    """One row per method and ablation (and the base model) for a single seed."""
    header = ["method", "lr", "test accuracy", "pass@1 (T=0.7)", "log p(answer)", "log p(wrong sample)",
              "negatives correct", "steps"]
    entries = [(m, results["methods"][m]) for m in METHODS] + [(f"ablation: {a}", results["ablations"][a])
                                                                for a in ABLATIONS]
    rows = []
    for name, entry in entries:
        negatives = entry["frac_negatives_correct"][0]
        rows.append([name, f"{entry['lr']:g}", f"{100 * entry['accuracy'][0]:.1f}%", f"{100 * entry['pass1'][0]:.1f}%",
                     f"{entry['answer_logp'][0]:.3f}", f"{entry['wrong_logp'][0]:.3f}",
                     "—" if negatives is None else f"{100 * negatives:.1f}%", entry["steps"][0]])
    base = results["base"]
    rows.append(["base model (start of every run)", "—", f"{100 * base['accuracy'][0]:.1f}%",
                 f"{100 * base['pass1'][0]:.1f}%", f"{base['answer_logp'][0]:.3f}", f"{base['wrong_logp'][0]:.3f}",
                 "—", base["steps"][0]])
    return markdown_table(header, rows)


def study_pointer(results_path: Path = _STUDY_RESULTS) -> str:
    """Where the multi-seed result is, with its dft − sft line when the committed results are present."""
    text = (f"One seed is not a result. The study — every method from the same base over several seeds, "
            f"lr chosen on validation, paired tests — is {_STUDY_DOC} "
            f"(`python -m dftkern.experiments.dft_study`).")
    if results_path.exists():
        study = json.loads(results_path.read_text())
        test = study["methods"]["dft"].get("vs_sft", {}).get("accuracy", {}).get("t_test")
        if test:
            text += (f"\nStudy ({len(study['seeds'])} seeds): dft − sft = {100 * test['mean_diff']:+.1f} ± "
                     f"{100 * test['sd_diff']:.1f} test-accuracy points (mean ± sd of the paired differences, "
                     f"paired t-test p = {test['p']:.2g}).")
    return text


def run_one_seed(*, seed: int = 0, out: str | Path | None = None, quick: bool = False, workers: int = 2,
                 device: str = "cpu", threads: int | None = 1, progress: bool = True, log=print) -> dict:
    """Run the protocol for one seed in ``out`` (default ``runs/default-<timestamp>``); print and return
    ``{"run_dir", "table", "results"}`` (``results`` has the schema of the study's ``results.json``).

    Args:
        workers: worker processes; ``threads``: torch intra-op threads in each (0 or None: torch's
            default). The committed study used 1 thread per worker on the CPU; other threads or
            another device give other floating-point results.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``; a CUDA device this machine does not
            have is a ValueError before anything runs.
        progress: print one line per finished task (base model, each arm, ...) while it runs; the
            table and the summary are printed either way.
    """
    from .study import run_study

    threads = 0 if threads is None else threads
    cfg = one_seed_config(seed, quick=quick, workers=workers, device=device, threads=threads)
    out = Path(out or f"runs/default-{datetime.now():%Y%m%d-%H%M%S}")
    results = run_study(cfg, work=out, out=out, log=log if progress else _quiet,
                        command=f"run_one_seed(seed={seed}, quick={quick}, workers={workers}, device={device!r}, "
                                f"threads={threads})")
    table = format_one_seed_table(results)
    base = results["base"]
    log(f"\nbase model: {100 * base['accuracy'][0]:.1f}% test accuracy after {base['steps'][0]} pretraining steps "
        f"on problems disjoint from the training prompts; {100 * base['train_samples_correct'][0]:.1f}% of its "
        f"T=0.7 samples on the training prompts are correct.\n")
    log(table)
    log(f"\nwall time {results['config']['wall_seconds']:.0f} s; run directory: {out.resolve()}")
    log(study_pointer())
    return {"run_dir": str(out), "table": table, "results": results}


def _quiet(*_args, **_kwargs) -> None:
    """A ``log`` that prints nothing."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dftkern.experiments.dft_study.one_seed",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="base init, sampling and data-order seed (default: 0)")
    parser.add_argument("--out", default=None, help="run directory (default: runs/default-<timestamp>)")
    parser.add_argument("--quick", action="store_true", help="toy sizes, seconds (for CI)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--device", default="cpu",
                        help="'cpu', 'cuda', 'cuda:N' or 'auto' (default: cpu, as the committed study; other devices "
                             "give other numbers)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per worker process, 0 = torch's default (default: 1, as the committed "
                             "study)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no line per finished task (the table is printed either way)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    try:
        resolve_study_device(args.device)
    except ValueError as err:  # a CUDA device this machine does not have, or not a device
        parser.error(f"--device: {err}")
    run_one_seed(seed=args.seed, out=args.out, quick=args.quick, workers=args.workers, device=args.device,
                 threads=args.threads, progress=args.progress)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
