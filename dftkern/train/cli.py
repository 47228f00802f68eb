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
from dataclasses import replace

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


# the default run's size options override the (--quick) sizes only when given
_OVERRIDES = {"warmup_steps": None, "steps": None, "num_negatives": None}
# command-line defaults that differ from the config's: `generate` uses vLLM when it imports (GenerateConfig: hf)
_CLI_DEFAULTS = {"default": _OVERRIDES, "generate": {"engine": "auto"}}


def _add_stage_options(parser: argparse.ArgumentParser, stage: str) -> None:
    add_arguments(parser, _stage_configs()[stage], groups=_GROUPS, defaults=_CLI_DEFAULTS.get(stage))


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated from the stage configs' field declarations (see :mod:`.options`)."""
    parser = argparse.ArgumentParser(
        prog="python -m dftkern.train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            dftkern's reference trainer: (prompt, good answer) data -> K sampled negatives per prompt
            -> reference log-probs (once) -> training with DFT/DFT2/SFT/DPO/... on fused losses -> eval.

            With no stage, runs the built-in experiment (synthetic addition, tiny Llama, CPU, < 5
            minutes): one seed of the DFT-vs-SFT study (docs/dft_study.md) -- a weak base model,
            then sft, sft_mean, dft, dft2 and sft_dpo from it; prints held-out accuracy per method.
            Every stage's options are listed below."""))
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
        overrides = {k: v for k in _OVERRIDES if (v := options.pop(k)) is not None}
        if not overrides:  # the study protocol, one seed
            from dftkern.experiments.dft_study.one_seed import run_one_seed

            run_one_seed(seed=options["seed"], out=options["out"], quick=options["quick"], workers=options["workers"])
            return 0
        from .default_run import DefaultRunConfig, run_default_experiment

        run_default_experiment(replace(DefaultRunConfig(**options).resolved(), quick=False, **overrides))
        return 0
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
