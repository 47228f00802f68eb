"""Command line: ``python -m dftkern.train [STAGE] [OPTIONS]``.

Without a stage it runs the built-in experiment: one seed of the DFT-vs-SFT study
(:mod:`dftkern.experiments.dft_study.one_seed`; with ``--warmup-steps``/``--steps``/``--num-negatives``
the earlier two-stage experiment of :mod:`.default_run`). Stages: ``generate``,
``ref-logps``, ``train``, ``eval`` (and ``default``, the same as no stage).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from dataclasses import fields, replace

from dftkern._validation import env_flag

from .options import add_arguments, option_names

__all__ = ["build_parser", "main"]

_STAGE_HELP = {
    "generate": "sample K answers per prompt (the negatives) -> JSONL, resumable",
    "ref-logps": "score every row with the reference model once -> cache keyed by data hash",
    "train": "train with dft / dft2 / sft / dpo / ... through dftkern's fused losses",
    "eval": "greedy-decode held-out prompts: task metric + mean log-prob of the answers",
    "default": "the built-in experiment, one seed of the DFT-vs-SFT study (same as giving no stage)",
}


_GROUPS = {
    "optim": "optimization",
    "loss": "loss hyper-parameters",
    "on_policy": "on-policy (fresh samples from the current policy instead of --negatives)",
    "system": "precision / memory / bookkeeping",
    "model": "model / system",
}


def _stage_configs() -> dict[str, type]:
    """The config class of each stage (nested configs bring their own options)."""
    from .default_run import DefaultRunConfig
    from .evaluate import EvalConfig
    from .generate import GenerateConfig
    from .ref_logps import RefLogpsConfig
    from .trainer import TrainConfig

    return {"generate": GenerateConfig, "ref-logps": RefLogpsConfig, "train": TrainConfig, "eval": EvalConfig,
            "default": DefaultRunConfig}


# the default run's size options override the (--quick) sizes only when given; giving any of them runs
# the legacy two-stage experiment instead of the study protocol
_OVERRIDES = {"warmup_steps": None, "steps": None, "num_negatives": None}
# options of the default job that only the study protocol uses (None: not given)
_STUDY_ONLY = {"workers": None}
# command-line defaults that differ from the config's: `generate` uses vLLM when it imports (GenerateConfig: hf)
_CLI_DEFAULTS = {"default": {**_OVERRIDES, **_STUDY_ONLY}, "generate": {"engine": "auto"}}
_LEGACY_FLAGS = "--warmup-steps/--steps/--num-negatives"
# what the default job's options do (the config's help speaks of the legacy experiment)
_DEFAULT_JOB_HELP = {
    "device": "'cpu', 'cuda', 'cuda:N' or 'auto': where every model of the default job runs (a CUDA device this "
              "machine lacks is an error). The committed study ran on the CPU; on another device the numbers "
              "differ (default: cpu)",
    "threads": "torch intra-op threads: per worker process of the study protocol, or of the legacy experiment's "
               "process; 0 = torch's default. 1 is what the committed study used (and fastest for this tiny "
               "model); other values may give other numbers (another floating-point summation order) (default: 1)",
    "progress": "hide progress output: the study protocol's line per finished task (the legacy experiment: "
                "its progress bars); the results table is printed either way",
    "workers": "worker processes of the study protocol (default: {workers}); not used by the legacy "
               f"experiment ({_LEGACY_FLAGS}), which rejects it",
}


def _add_stage_options(parser: argparse.ArgumentParser, stage: str) -> None:
    add_arguments(parser, _stage_configs()[stage], groups=_GROUPS, defaults=_CLI_DEFAULTS.get(stage))
    if stage == "default":
        for action in parser._actions:
            if action.dest in _DEFAULT_JOB_HELP:
                action.help = _DEFAULT_JOB_HELP[action.dest].format(workers=_study_workers())


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated from the stage configs' field declarations (see :mod:`.options`)."""
    parser = argparse.ArgumentParser(
        prog="python -m dftkern.train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            dftkern's reference trainer: (prompt, good answer) data -> K sampled negatives per prompt
            -> reference log-probs (once) -> training with DFT/DFT2/SFT/DPO/... on fused losses -> eval.

            With no stage, runs the built-in experiment (synthetic addition, tiny Llama, CPU by
            default, < 5 minutes): one seed of the DFT-vs-SFT study (docs/dft_study.md) -- a weak
            base model, then sft, sft_mean, dft, dft2 and sft_dpo from it; prints held-out accuracy
            per method. Its options are the first ones below (every one of them is used); every
            stage's options follow."""))
    _add_stage_options(parser, "default")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", title="stages")
    stages = []
    for name in ("generate", "ref-logps", "train", "eval", "default"):
        description = _STAGE_HELP[name] + "."
        if name == "train":
            description += (" Runs under torchrun for FSDP2 (e.g. torchrun --nproc_per_node 8 -m dftkern.train "
                            "train ...).")
        stage = sub.add_parser(name, help=_STAGE_HELP[name], description=description)
        _add_stage_options(stage, name)
        if name != "default":
            stages.append(stage)
    parser.epilog = "\n".join(f"\n{'=' * 100}\n{stage.format_help()}" for stage in stages)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the stage. Input problems (bad data, missing files, invalid settings)
    are reported as one ``error:`` line with exit status 2; set ``DFTKERN_TRACEBACK=1`` for the traceback."""
    from .trainer import NonFiniteLossError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        show_traceback = env_flag("DFTKERN_TRACEBACK")
    except ValueError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    names = option_names(_stage_configs()[args.stage or "default"])
    options = {k: v for k, v in vars(args).items() if k in names}
    try:
        return _run(args.stage, options)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as err:
        if show_traceback:
            raise
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2


def _run(stage: str | None, options: dict) -> int:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # our own tqdm bars are enough
    if stage in (None, "default"):
        return _run_default_job(options)
    if stage == "generate":
        from .generate import GenerateConfig, generate_samples

        path = generate_samples(GenerateConfig(**options))
        print(f"samples: {path}")
    elif stage == "ref-logps":
        from .ref_logps import RefLogpsConfig, compute_ref_logps

        path = compute_ref_logps(RefLogpsConfig(**options))
        print(f"reference log-probs: {path}")
    elif stage == "train":
        from .trainer import TrainConfig, train

        result = train(TrainConfig(**options))
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"run directory: {result.run_dir}\nfinal checkpoint: {result.final_checkpoint}")
    elif stage == "eval":
        import json

        from .evaluate import EvalConfig, run_eval

        result = run_eval(EvalConfig(**options))
        print(json.dumps({k: v for k, v in result.items() if k != "predictions"}, indent=2))
    return 0


def _study_workers() -> int:
    """The study protocol's default worker processes (``DefaultRunConfig.workers``)."""
    return next(f.default for f in fields(_stage_configs()["default"]) if f.name == "workers")


def _check_device(device: str) -> None:
    """A device the study protocol can use; a CUDA device this machine lacks is an error, never a
    silent CPU run."""
    from dftkern.experiments.dft_study.config import resolve_study_device

    try:
        resolve_study_device(device)
    except ValueError as err:
        raise ValueError(f"--device: {err}") from None


def _run_default_job(options: dict) -> int:
    """The default job with every one of its options applied: the study protocol for one seed, or, when
    a legacy size option is given, the legacy two-stage experiment (which rejects ``--workers``)."""
    overrides = {k: v for k in _OVERRIDES if (v := options.pop(k)) is not None}
    workers = options.pop("workers")
    if not overrides or options["device"].startswith("cuda"):
        _check_device(options["device"])
    if not overrides:  # the study protocol, one seed
        from dftkern.experiments.dft_study.one_seed import run_one_seed

        run_one_seed(seed=options["seed"], out=options["out"], quick=options["quick"],
                     workers=_study_workers() if workers is None else workers, device=options["device"],
                     threads=options["threads"], progress=options["progress"])
        return 0
    if workers is not None:
        raise ValueError(f"--workers does not apply to the default job's legacy two-stage experiment "
                         f"(selected by {_LEGACY_FLAGS}): it runs in one process")
    from .default_run import DefaultRunConfig, run_default_experiment

    run_default_experiment(replace(DefaultRunConfig(**options).resolved(), quick=False, **overrides))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
