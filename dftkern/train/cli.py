"""Command line: ``python -m dftkern.train [STAGE] [OPTIONS]``.

Without a stage it runs the built-in experiment (:mod:`.default_run`). Stages: ``generate``,
``ref-logps``, ``train``, ``eval`` (and ``default``, the same as no stage).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from .objectives import LOSS_NAMES

__all__ = ["build_parser", "main"]

_STAGE_HELP = {
    "generate": "sample K answers per prompt (the negatives) -> JSONL, resumable",
    "ref-logps": "score every row with the reference model once -> cache keyed by data hash",
    "train": "train with dft / dft2 / sft / dpo / ... through dftkern's fused losses",
    "eval": "greedy-decode held-out prompts: task metric + mean log-prob of the answers",
    "default": "the built-in experiment (same as giving no stage)",
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text}")
    return value


def _baseline(text: str):
    if text in ("mean", "none"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'mean', 'none' or a number, got {text!r}") from None


def _add_model_options(parser: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    group = parser.add_argument_group("model / system")
    group.add_argument("--device", default="auto",
                       help="'auto' (CUDA if available, cuda:LOCAL_RANK under torchrun; else CPU), 'cpu', 'cuda:N'")
    group.add_argument("--attn", default="auto", choices=("auto", "flash_attention_2", "sdpa", "eager"),
                       help="attention kernel; auto = flash_attention_2 when flash-attn is importable on CUDA, "
                            "else sdpa (default: auto)")
    if dtype:
        group.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                           help="weights dtype for inference; auto = bfloat16 on CUDA, float32 on CPU")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="allow model/tokenizer code from the model directory (off by default)")
    group.add_argument("--no-chat-template", dest="use_chat_template", action="store_false",
                       help="do not apply the tokenizer's chat template even if it has one")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def _add_generate(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help=_STAGE_HELP["generate"], description=_STAGE_HELP["generate"] + ".")
    p.add_argument("--model", required=True, help="local Hugging Face causal LM directory to sample from")
    p.add_argument("--data", required=True, help="prompts: JSONL/Parquet of {prompt, response} or {messages}")
    p.add_argument("--out", required=True, help="output JSONL (one line per prompt; re-running resumes)")
    p.add_argument("--num-samples", "-k", type=_positive_int, default=4, help="samples per prompt K (default: 4)")
    p.add_argument("--batch-size", type=_positive_int, default=64,
                   help="sequences decoded together (default: 64)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128, help="default: 128")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1.0 = off (default)")
    p.add_argument("--seed", type=int, default=0, help="sample j of prompt p uses seed (seed, p, j) (default: 0)")
    p.add_argument("--reward", default=None, metavar="NAME|MODULE:FUNCTION",
                   help="score samples with reward(prompt, response, reference) -> float (needed by rwr/"
                        "reinforce/rloo): a built-in (exact_match, addition, neg_length, length_peak:MU[:WIDTH]) "
                        "or MODULE:FUNCTION, e.g. dftkern.train.synthetic:addition_reward")
    p.add_argument("--limit", type=_positive_int, default=None, help="only the first N prompts")
    _add_model_options(p)
    return p


def _add_ref_logps(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("ref-logps", help=_STAGE_HELP["ref-logps"], description=_STAGE_HELP["ref-logps"] + ".")
    p.add_argument("--model", required=True, help="the reference model directory (usually the model that sampled)")
    p.add_argument("--data", required=True, help="the training data file (as given to train)")
    p.add_argument("--negatives", required=True, help="the generate stage's output")
    p.add_argument("--out-dir", default=None,
                   help="where ref_logps-<hash>.safetensors goes (default: next to --negatives)")
    p.add_argument("--num-negatives", type=_positive_int, default=None,
                   help="use the first K samples per prompt (default: all); must match train")
    p.add_argument("--max-length", type=_positive_int, default=None, help="truncate rows as train does")
    p.add_argument("--overlong", default="truncate", choices=("truncate", "drop"),
                   help="rows longer than --max-length: truncate them, or drop their examples; as train does "
                        "(default: truncate)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="rows per forward (default: 64)")
    p.add_argument("--packing", default="auto", choices=("auto", "on", "off"),
                   help="packed variable-length batches; auto = on with flash_attention_2 (default: auto)")
    _add_model_options(p)
    return p


def _add_train(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help=_STAGE_HELP["train"], description=_STAGE_HELP["train"] + ". Runs under "
                       "torchrun for FSDP2 (e.g. torchrun --nproc_per_node 8 -m dftkern.train train ...).")
    p.add_argument("--model", required=True, help="initial model directory (policy)")
    p.add_argument("--data", required=True, help="training data: JSONL/Parquet of {prompt, response} or {messages}")
    p.add_argument("--out", required=True, help="run directory (checkpoints/, metrics.jsonl, curves.png)")
    p.add_argument("--loss", default="dft", choices=LOSS_NAMES, help="training objective (default: dft)")
    p.add_argument("--negatives", default=None,
                   help="generate stage output (every loss except sft, unless --on-policy; with --on-policy "
                        "only for --offline-mix)")
    p.add_argument("--ref-logps", default=None,
                   help="reference log-prob cache file, or the directory holding it (default: next to --negatives)")
    p.add_argument("--num-negatives", type=_positive_int, default=None,
                   help="first K samples per prompt (default: all)")
    p.add_argument("--max-length", type=_positive_int, default=None,
                   help="truncate rows to this many tokens (response end cut first)")
    p.add_argument("--overlong", default="truncate", choices=("truncate", "drop"),
                   help="rows longer than --max-length: 'truncate' cuts them, 'drop' skips their whole example; "
                        "the count is printed either way (default: truncate)")
    o = p.add_argument_group("optimization")
    o.add_argument("--batch-size", type=_positive_int, default=8,
                   help="examples (prompts) per micro-batch per process; DFT rows = examples * (1+K) (default: 8)")
    o.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per optimizer step (default: 1)")
    o.add_argument("--max-steps", type=_positive_int, default=None, help="optimizer steps (default: from --epochs)")
    o.add_argument("--epochs", type=float, default=1.0,
                   help="passes over the data if --max-steps is unset (default: 1)")
    o.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default: 1e-5)")
    o.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr (default: 0.1)")
    o.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default: --warmup-ratio)")
    o.add_argument("--warmup-ratio", type=float, default=0.05, help="warmup as a fraction of all steps (default: 0.05)")
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices (default: 0)")
    o.add_argument("--adam-beta1", type=float, default=0.9, help="default: 0.9")
    o.add_argument("--adam-beta2", type=float, default=0.95, help="default: 0.95")
    o.add_argument("--adam-eps", type=float, default=1e-8, help="default: 1e-8")
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default: 1.0)")
    o.add_argument("--seed", type=int, default=0, help="data order seed (default: 0)")
    o.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="visit examples in file order")
    h = p.add_argument_group("loss hyper-parameters")
    h.add_argument("--tau", type=float, default=None, help="DFT temperature (default: dft 1.0, dft2 0.3)")
    h.add_argument("--gamma", type=float, default=None, help="DFT moving-average weight (default: dft 0.85, dft2 0.9)")
    h.add_argument("--dft-u-init", type=float, default=0.0, help="initial DFTState u (default: 0.0)")
    h.add_argument("--beta", type=float, default=0.1,
                   help="dpo/ipo/hinge strength, simpo scale, rwr temperature (default: 0.1)")
    h.add_argument("--simpo-gamma", type=float, default=0.5, help="SimPO margin (default: 0.5)")
    h.add_argument("--unlikelihood-alpha", type=float, default=1.0, help="unlikelihood weight (default: 1.0)")
    h.add_argument("--baseline", type=_baseline, default="mean", help="reinforce baseline: mean | none | a number (default: mean)")
    h.add_argument("--average", action="store_true", help="preference losses: mean token log-prob instead of sum")
    op = p.add_argument_group("on-policy (fresh samples from the current policy instead of --negatives)")
    op.add_argument("--on-policy", action="store_true",
                    help="every --refresh-every steps sample --samples-per-prompt responses per prompt from the "
                         "current policy, score them with --reward; losses: reinforce, rloo, rwr (samples only), "
                         "dft/dft2 (fresh negatives), dpo/ipo/hinge/simpo/unlikelihood (online pairs); the "
                         "reference log-probs are the sampling policy's own")
    op.add_argument("--reward", default=None, metavar="NAME",
                    help="reward(prompt, response, reference) -> float for --on-policy: a built-in "
                         "(exact_match, addition, neg_length = -characters, length_peak:MU[:WIDTH] = "
                         "exp(-((characters-MU)/WIDTH)^2), WIDTH default 2) or MODULE:FUNCTION")
    op.add_argument("--offline-mix", type=_fraction, default=0.0, metavar="FRACTION",
                    help="fraction f in [0, 1) of every micro-batch's examples taken from the offline negatives "
                         "(--negatives, and --ref-logps where the loss needs them) instead of fresh samples: "
                         "floor(f * batch size) per micro-batch (default: 0 = all on-policy)")
    op.add_argument("--samples-per-prompt", type=_positive_int, default=4, help="n samples per prompt (default: 4)")
    op.add_argument("--refresh-every", type=_positive_int, default=1,
                    help="optimizer steps between sampling rounds (default: 1 = fully on-policy)")
    op.add_argument("--sample-max-new-tokens", type=_positive_int, default=128, help="default: 128")
    op.add_argument("--sample-temperature", type=float, default=1.0, help="default: 1.0")
    op.add_argument("--sample-top-k", type=int, default=0, help="0 = off (default)")
    op.add_argument("--sample-top-p", type=float, default=1.0, help="1.0 = off (default)")
    op.add_argument("--generation-batch-size", type=_positive_int, default=64,
                    help="sequences decoded together when sampling (default: 64)")
    s = p.add_argument_group("precision / memory / bookkeeping")
    s.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto = bf16 autocast on CUDA (fp32 master weights), fp32 on CPU (default: auto)")
    s.add_argument("--packing", default="auto", choices=("auto", "on", "off"),
                   help="packed variable-length batches (position_ids/cu_seqlens); auto = on with "
                        "flash_attention_2, padding otherwise (default: auto)")
    s.add_argument("--gradient-checkpointing", action="store_true", help="recompute decoder layers in backward")
    s.add_argument("--log-every", type=_positive_int, default=1, help="metrics.jsonl every N steps (default: 1)")
    s.add_argument("--save-every", type=_positive_int, default=None, help="checkpoint every N steps (and at the end)")
    s.add_argument("--keep-checkpoints", type=_positive_int, default=2, help="newest checkpoints kept (default: 2)")
    s.add_argument("--max-nonfinite-steps", type=_positive_int, default=3, metavar="N",
                   help="an optimizer step with a non-finite loss or gradient norm is skipped (no update, logged "
                        "as skipped); stop with an error after N such steps in a row (default: 3)")
    s.add_argument("--eval-data", default=None, help="held-out data: log eval_pos_logp (mean log-prob of answers)")
    s.add_argument("--eval-every", type=_positive_int, default=None, help="held-out log-prob every N steps")
    s.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from the newest checkpoint in --out (or the given checkpoint directory)")
    s.add_argument("--stop-after", type=_positive_int, default=None, metavar="STEP",
                   help="checkpoint and exit after this step (the schedule still spans --max-steps); continue "
                        "later with --resume, e.g. to fit job time limits")
    s.add_argument("--no-plot", dest="plot", action="store_false", help="skip curves.png")
    _add_model_options(p, dtype=False)
    return p


def _add_eval(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help=_STAGE_HELP["eval"], description=_STAGE_HELP["eval"] + ".")
    p.add_argument("--model", required=True, help="model directory (e.g. a checkpoint)")
    p.add_argument("--data", required=True, help="held-out JSONL/Parquet of {prompt, response} or {messages}")
    p.add_argument("--out", default=None, help="JSON summary path (predictions go to <out stem>.predictions.jsonl)")
    p.add_argument("--metric", default=None, metavar="MODULE:FUNCTION",
                   help="metric(prompt, response, reference) -> float (default: exact match)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="prompts per batch (default: 64)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128, help="default: 128")
    p.add_argument("--max-length", type=_positive_int, default=None, help="truncate answer rows for the log-prob")
    p.add_argument("--overlong", default="truncate", choices=("truncate", "drop"),
                   help="answer rows longer than --max-length: truncate them, or leave them out of the log-prob "
                        "(default: truncate)")
    p.add_argument("--limit", type=_positive_int, default=None, help="only the first N prompts")
    _add_model_options(p)
    return p


def _add_default_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("built-in experiment (no stage, or 'default')")
    g.add_argument("--out", default=None, help="run directory (default: ./runs/default-<timestamp>)")
    g.add_argument("--quick", action="store_true", help="tiny sizes, seconds not minutes (for CI)")
    g.add_argument("--seed", type=int, default=0, help="data, model init and sampling seed (default: 0)")
    g.add_argument("--warmup-steps", type=_positive_int, default=None, help="SFT warm-up steps (default: 800)")
    g.add_argument("--steps", type=_positive_int, default=None, help="DFT and continued-SFT steps (default: 150)")
    g.add_argument("--num-negatives", "-k", type=_positive_int, default=None,
                   help="DFT negatives per prompt (default: 4)")
    g.add_argument("--device", default="cpu", help="default: cpu")
    g.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads; 0 = torch's default (default: 1, fastest for this tiny model)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dftkern.train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            dftkern's reference trainer: (prompt, good answer) data -> K sampled negatives per prompt
            -> reference log-probs (once) -> training with DFT/DFT2/SFT/DPO/... on fused losses -> eval.

            With no stage, runs the built-in experiment (synthetic addition, tiny Llama, CPU, a few
            minutes): SFT warm-up, then DFT and continued SFT from it; prints held-out accuracy.
            Every stage's options are listed below."""))
    _add_default_options(parser)
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", title="stages")
    stages = [_add_generate(sub), _add_ref_logps(sub), _add_train(sub), _add_eval(sub)]
    default = sub.add_parser("default", help=_STAGE_HELP["default"], description=_STAGE_HELP["default"] + ".")
    _add_default_options(default)
    parser.epilog = "\n".join(f"\n{'=' * 100}\n{stage.format_help()}" for stage in stages)
    return parser


def _stage_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The options of the chosen stage only (the top-level and stage parsers share some names)."""
    if args.stage is not None:
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = subparsers.choices[args.stage]
    dests = {action.dest for action in parser._actions
             if action.dest not in ("help", "stage") and not isinstance(action, argparse._SubParsersAction)}
    return {k: v for k, v in vars(args).items() if k in dests}


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the stage. Input problems (bad data, missing files, invalid settings)
    are reported as one ``error:`` line with exit status 2; set ``DFTKERN_TRACEBACK=1`` for the traceback."""
    from .trainer import NonFiniteLossError

    parser = build_parser()
    args = parser.parse_args(argv)
    options = _stage_options(parser, args)
    try:
        return _run(args.stage, options)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as err:
        if os.environ.get("DFTKERN_TRACEBACK") == "1":
            raise
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2


def _run(stage: str | None, options: dict) -> int:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # our own tqdm bars are enough
    if stage in (None, "default"):
        from .default_run import DefaultRunConfig, run_default_experiment

        cfg = DefaultRunConfig(out=options["out"], quick=options["quick"], seed=options["seed"],
                               device=options["device"], threads=options["threads"] or None,
                               progress=options["progress"])
        resolved = cfg.resolved()
        overrides = {"warmup_steps": options["warmup_steps"], "steps": options["steps"],
                     "num_negatives": options["num_negatives"]}
        for key, value in overrides.items():
            if value is not None:
                setattr(resolved, key, value)
        resolved.quick = False  # already applied
        run_default_experiment(resolved)
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
