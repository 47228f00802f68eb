"""The built-in experiment (``python -m dftkern.train`` with no subcommand).

A complete, small DFT experiment on a synthetic task, runnable on a 2-core CPU in minutes:

1. data: addition problems with 1-2 digit operands (``"48+37=" -> "85"``), a training set and a disjoint
   held-out set (:mod:`.synthetic`);
2. a character-level tokenizer and a tiny random-init Llama-style model (``<out>/base``);
3. SFT warm-up on the training set (``<out>/warmup``);
4. ``generate``: K answers per DFT prompt sampled from the warm-up model (the negatives);
5. ``ref-logps``: the warm-up model's log-prob of every negative (it is DFT's reference);
6. from the warm-up checkpoint, for the same number of steps, the same prompts, batch size and
   learning rate: DFT (``<out>/dft``) and continued SFT (``<out>/sft``);
7. ``eval``: held-out exact-match accuracy (greedy decoding) and mean log-prob of the correct answers.

Prints a table (warm-up, +SFT, +DFT) and writes it to ``<out>/results.json`` and ``<out>/results.md``.
Nothing was tuned for DFT to win; the numbers are whatever the run produces.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import torch

from . import synthetic
from .evaluate import evaluate_model
from .generate import GenerateConfig, generate_samples
from .model import load_causal_lm, load_tokenizer
from .options import Device, Flag, Integer, Number, Text, option, validate
from .records import read_prompt_records, read_sample_records
from .ref_logps import RefLogpsConfig, compute_ref_logps
from .trainer import TrainConfig, train

__all__ = ["DefaultRunConfig", "run_default_experiment", "format_table"]


QUICK = {"num_train": 256, "num_dft_prompts": 64, "num_heldout": 32, "hidden_size": 64, "num_layers": 2,
         "warmup_steps": 30, "steps": 6, "batch_size": 16, "num_negatives": 2}
"""What ``quick=True`` (``--quick``) changes: a tiny version of the same pipeline (seconds, for tests and CI)."""


def _size(default: int, help: str, **meta):
    quick = f"; --quick: {QUICK[meta.pop('quick')]}" if "quick" in meta else ""
    return option(default, Integer(low=1), help + quick, **meta)


@dataclass
class DefaultRunConfig:
    """Sizes and settings of the built-in experiment; ``quick=True`` shrinks everything for CI.

    Only some are command-line options (``python -m dftkern.train --help``); ``--warmup-steps``,
    ``--steps`` and ``--num-negatives`` override the (quick) sizes when given.
    """

    out: str | None = option(None, Text(optional=True), "run directory",
                             default_text="./runs/default-<timestamp>")
    quick: bool = option(False, Flag(), "tiny sizes, seconds not minutes (for CI)")
    seed: int = option(0, Integer(low=0), "data, model init and sampling seed")
    max_digits: int = _size(2, "operand digits of the addition task", cli=False)
    num_train: int = _size(3000, "training problems", cli=False, quick="num_train")
    num_dft_prompts: int = _size(1000, "prompts with sampled negatives", cli=False, quick="num_dft_prompts")
    num_heldout: int = _size(1000, "held-out problems", cli=False, quick="num_heldout")
    hidden_size: int = _size(128, "model width", cli=False, quick="hidden_size")
    num_layers: int = _size(4, "decoder layers", cli=False, quick="num_layers")
    warmup_steps: int = _size(800, "legacy two-stage experiment (SFT warm-up, then DFT vs continued SFT; giving "
                              "any of --warmup-steps/--steps/--num-negatives runs it instead of the study "
                              "protocol): SFT warm-up steps", quick="warmup_steps")
    warmup_lr: float = option(2e-3, Number(low=0, low_open=True), "SFT warm-up learning rate", cli=False)
    steps: int = _size(150, "legacy two-stage experiment: DFT and continued-SFT steps", quick="steps")
    lr: float = option(3e-4, Number(low=0, low_open=True), "DFT/SFT learning rate", cli=False)
    batch_size: int = _size(32, "prompts per step", cli=False, quick="batch_size")
    num_negatives: int = _size(4, "legacy two-stage experiment: DFT negatives per prompt", aliases=("-k",),
                               quick="num_negatives")
    sample_temperature: float = option(1.0, Number(low=0, low_open=True), "temperature of the negatives", cli=False)
    device: str = option("cpu", Device(), "'cpu', 'cuda' or 'cuda:N'")
    threads: int | None = option(1, Integer(low=0, optional=True), "torch intra-op threads; 0 = torch's default "
                                 "(1 is fastest for this tiny model)")
    progress: bool = option(True, Flag(), "hide progress bars", flag="--no-progress")
    workers: int = option(2, Integer(low=1), "worker processes of the study protocol (1 torch thread each)")

    def __post_init__(self):
        validate(self)

    def resolved(self) -> DefaultRunConfig:
        """Apply ``quick`` (see :data:`QUICK`)."""
        if not self.quick:
            return self
        return DefaultRunConfig(**{**asdict(self), **QUICK})


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def format_table(rows: list[tuple[str, dict]]) -> str:
    """A Markdown table of held-out accuracy and positive log-probs per model."""
    lines = ["| model | held-out exact match | mean log p(answer) | mean log p per token |",
             "|---|---|---|---|"]
    for name, result in rows:
        correct = round(result["task_metric"] * result["num_prompts"])
        lines.append(f"| {name} | {100 * result['task_metric']:.1f}% ({correct}/{result['num_prompts']}) "
                     f"| {result['pos_logp']:.3f} | {result['pos_logp_per_token']:.3f} |")
    return "\n".join(lines)


def run_default_experiment(cfg: DefaultRunConfig) -> dict:
    """Run the whole pipeline; returns ``{"run_dir", "table", "results", "seconds", "config"}``.

    ``cfg.threads`` sets torch's intra-op threads for the run (restored afterwards): the model is
    so small that one thread is as fast as two on an idle 2-core machine and much faster on a busy
    one, where a descheduled OpenMP worker stalls every small operation.
    """
    cfg = cfg.resolved()
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: DefaultRunConfig) -> dict:
    started = time.perf_counter()
    stage_seconds: dict[str, float] = {}
    out = Path(cfg.out or f"runs/default-{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"[dftkern.train] default experiment in {out}")

    def timed(name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        value = fn(*args, **kwargs)
        stage_seconds[name] = round(time.perf_counter() - t0, 1)
        return value

    # 1-2. data, tokenizer, base model
    data = out / "data"
    data.mkdir(exist_ok=True)
    train_records = synthetic.make_addition_records(cfg.num_train, max_digits=cfg.max_digits, seed=cfg.seed,
                                                    id_prefix="train")
    seen = {tuple(map(int, r["prompt"][:-1].split("+"))) for r in train_records}
    heldout_records = synthetic.make_addition_records(cfg.num_heldout, max_digits=cfg.max_digits,
                                                      seed=cfg.seed + 1, id_prefix="heldout", exclude=seen)
    _write_jsonl(data / "train.jsonl", train_records)
    _write_jsonl(data / "dft_prompts.jsonl", train_records[:cfg.num_dft_prompts])
    _write_jsonl(data / "heldout.jsonl", heldout_records)
    tokenizer = synthetic.build_char_tokenizer()
    synthetic.make_tiny_llama(tokenizer, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                              num_heads=4, max_positions=4 * cfg.max_digits + 8, seed=cfg.seed,
                              save_dir=out / "base")
    max_new = cfg.max_digits + 2  # answer digits + EOS
    common = dict(device=cfg.device, progress=cfg.progress, seed=cfg.seed)

    # 3. SFT warm-up
    print(f"[1/5] SFT warm-up: {cfg.warmup_steps} steps")
    warm = timed("warm-up", train, TrainConfig(
        model=str(out / "base"), data=str(data / "train.jsonl"), out=str(out / "warmup"), loss="sft",
        max_steps=cfg.warmup_steps, batch_size=cfg.batch_size, lr=cfg.warmup_lr, warmup_ratio=0.05,
        weight_decay=0.01, keep_checkpoints=1, **common))
    warm_model = str(warm.final_checkpoint)

    # 4-5. negatives from the warm-up model, scored by it (the reference)
    print(f"[2/5] generate: {cfg.num_negatives} samples for each of {cfg.num_dft_prompts} prompts")
    negatives = timed("generate", generate_samples, GenerateConfig(
        model=warm_model, data=str(data / "dft_prompts.jsonl"), out=str(out / "negatives.jsonl"),
        num_samples=cfg.num_negatives, max_new_tokens=max_new, temperature=cfg.sample_temperature,
        reward="dftkern.train.synthetic:addition_reward", batch_size=256, device=cfg.device, seed=cfg.seed,
        progress=cfg.progress))
    rewards = [r for s in read_sample_records(negatives).values() for r in s.rewards]
    negatives_correct = sum(rewards) / len(rewards)
    print(f"      {100 * negatives_correct:.1f}% of the sampled negatives are correct answers")
    print("[3/5] ref-logps with the warm-up model")
    timed("ref-logps", compute_ref_logps, RefLogpsConfig(
        model=warm_model, data=str(data / "dft_prompts.jsonl"), negatives=str(negatives), device=cfg.device,
        progress=cfg.progress, batch_size=256))

    # 6. continued SFT and DFT from the warm-up checkpoint, same prompts, steps, batch and learning rate
    runs = {}
    for number, loss in ((4, "sft"), (5, "dft")):
        print(f"[{number}/5] {loss.upper()} from the warm-up checkpoint: {cfg.steps} steps")
        result = timed(loss, train, TrainConfig(
            model=warm_model, data=str(data / "dft_prompts.jsonl"),
            negatives=str(negatives) if loss == "dft" else None, out=str(out / loss), loss=loss,
            max_steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_ratio=0.05, keep_checkpoints=1,
            **common))
        runs[loss] = str(result.final_checkpoint)

    # 7. held-out evaluation
    heldout = read_prompt_records(data / "heldout.jsonl")
    results = {}
    t0 = time.perf_counter()
    for name, model_dir in (("warm-up (SFT)", warm_model), ("+SFT", runs["sft"]), ("+DFT", runs["dft"])):
        model = load_causal_lm(model_dir, attn="sdpa", device=torch.device(cfg.device))
        result = evaluate_model(model, load_tokenizer(model_dir), heldout, metric=synthetic.addition_reward,
                                max_new_tokens=max_new, batch_size=256)
        results[name] = {k: v for k, v in result.items() if k != "predictions"}
        results[name]["model"] = model_dir
    stage_seconds["eval"] = round(time.perf_counter() - t0, 1)
    table = format_table(list(results.items()))
    seconds = time.perf_counter() - started
    summary = {"run_dir": str(out), "table": table, "results": results, "seconds": round(seconds, 1),
               "stage_seconds": stage_seconds, "negatives_correct": negatives_correct, "config": asdict(cfg)}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nwall time {seconds:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in stage_seconds.items())
          + f"); run directory: {out.resolve()}")
    return summary
