"""Running the study: every (reward, loss, arm, seed) through the reference trainer, then evaluation."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from dftkern.train import plotting

from .config import ARMS, MAXIMUM_LIKELIHOOD, LengthStudyConfig
from .models import addition_operands, build_reference, sample_lengths, write_jsonl
from .offline import build_offline_files, score_lengths
from .report import format_paired, format_table, plot_curves
from .rewards import length_reward, modal_length

__all__ = ["run_length_study", "paired_comparisons"]

_DEFAULT_COMMAND = "python -m dftkern.experiments.length_study"


class _CountedReward:
    """A reward that counts its calls (``calls``): how many samples a training run scored."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, prompt: str, response: str, reference: str | None = None) -> float:
        self.calls += 1
        return self.fn(prompt, response, reference)

    def __repr__(self) -> str:
        return f"counted({self.fn!r})"


def _summaries(values: Sequence[float]) -> dict:
    mean, sd = plotting.mean_sd(values)
    return {"mean": mean, "min": min(values), "max": max(values), "std": sd, "values": list(values)}


def run_length_study(cfg: LengthStudyConfig, command: str | None = None) -> dict:
    """Run the study; writes ``results.md``, ``results.json`` and ``reward_vs_steps.png`` into ``cfg.out``.

    Args:
        command: the command line recorded in the outputs (default: the plain module command).

    Returns the ``results.json`` content: ``{"command", "table", "paired", "reference", "runs",
    "summary", "checkpoint_steps", "seconds", "config", "torch_threads"}``; ``runs`` holds one entry
    per (reward, loss, arm, seed) with ``reward``/``length`` per checkpoint step and
    ``samples_scored`` (reward evaluations during training: ``0`` offline; on-policy ``S * B * n``,
    plus ``S * B`` for DPO, whose pair rule also scores the data's answer).
    """
    cfg = cfg.resolved()
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        return _run(cfg, command or _DEFAULT_COMMAND)
    finally:
        torch.set_num_threads(previous_threads)


def _evaluation_set(cfg: LengthStudyConfig, reference: Path, log: Callable[[str], None]):
    """Held-out prompts, the prompts already used (warm-up + held-out), the reference's lengths on them,
    its summary, and the study's reward functions (``mode_length`` peaked at the reference's mode)."""
    from dftkern.train import synthetic

    warm = synthetic.make_addition_records(cfg.num_warmup_records, max_digits=cfg.max_digits, seed=1234)
    seen = {addition_operands(r["prompt"]) for r in warm}
    eval_records = synthetic.make_addition_records(cfg.eval_prompts, max_digits=cfg.max_digits, seed=99,
                                                   id_prefix="eval", exclude=seen)
    seen |= {addition_operands(r["prompt"]) for r in eval_records}
    eval_prompts = [r["prompt"] for r in eval_records]
    ref_lengths = sample_lengths(reference, eval_prompts, samples_per_prompt=cfg.eval_samples,
                                 max_new_tokens=cfg.max_new_tokens)
    mode = modal_length(ref_lengths)
    rewards = {name: length_reward(name, mode, cfg.mode_width) for name in cfg.rewards}
    histogram = dict(sorted(Counter(ref_lengths).items()))
    log(f"reference length histogram {histogram}; mode {mode}")
    info = {"model": str(reference), "mode_length": mode, "length_histogram": histogram,
            "mean_length": statistics.fmean(ref_lengths),
            "reward": {name: score_lengths(fn, ref_lengths) for name, fn in rewards.items()}}
    return eval_prompts, seen, ref_lengths, info, rewards


def _train_config(cfg: LengthStudyConfig, *, reference: Path, run_dir: Path, loss: str, arm: str, reward,
                  seed: int, prompts_file: Path, samples_file: Path, save_every: int):
    """The trainer's configuration of one arm (building the offline arm's files on the way);
    ``reward``: the reward function (a callable, passed to the trainer as it is on-policy)."""
    from dftkern.train.ref_logps import RefLogpsConfig, compute_ref_logps
    from dftkern.train.trainer import TrainConfig

    beta = cfg.dpo_beta if loss == "dpo" else cfg.rwr_beta  # unused by reinforce
    common = dict(out=str(run_dir / "train"), loss=loss, max_steps=cfg.steps, batch_size=cfg.prompts_per_step,
                  lr=cfg.lr[loss], warmup_steps=0, min_lr_ratio=1.0, beta=beta, seed=seed, save_every=save_every,
                  keep_checkpoints=None, device="cpu", use_chat_template=False, plot=False, progress=cfg.progress)
    if arm == "offline":
        data_file, negatives_file = build_offline_files(loss, reward, prompts_file, samples_file, run_dir / "data")
        if loss == "dpo":
            compute_ref_logps(RefLogpsConfig(model=str(reference), data=str(data_file),
                                             negatives=str(negatives_file), batch_size=512, device="cpu",
                                             use_chat_template=False, progress=False))
        return TrainConfig(model=str(reference), data=str(data_file), negatives=str(negatives_file), **common)
    return TrainConfig(model=str(reference), data=str(prompts_file), on_policy=True,
                       reward=reward,
                       samples_per_prompt=cfg.samples_per_prompt, refresh_every=cfg.refresh_every,
                       sample_max_new_tokens=cfg.max_new_tokens, sample_temperature=1.0,
                       generation_batch_size=512, **common)


def _run(cfg: LengthStudyConfig, command: str) -> dict:
    from dftkern.train import synthetic
    from dftkern.train.checkpoint import checkpoint_dir
    from dftkern.train.generate import GenerateConfig, generate_samples
    from dftkern.train.trainer import train

    started = time.perf_counter()
    out = Path(cfg.out)
    work = Path(cfg.work or "runs/length_study")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def log(message: str) -> None:
        print(f"[length_study {time.perf_counter() - started:6.1f} s] {message}", flush=True)

    t0 = time.perf_counter()
    reference = build_reference(cfg, work, log)
    timings["reference"] = time.perf_counter() - t0
    eval_prompts, seen, ref_lengths, reference_info, reward_fns = _evaluation_set(cfg, reference, log)

    checkpoints = cfg.checkpoint_steps()
    save_every = math.gcd(*checkpoints[1:])
    runs = []
    t_train = time.perf_counter()
    for seed in cfg.seeds:
        seed_dir = work / f"seed-{seed}"
        prompts = synthetic.make_addition_records(cfg.steps * cfg.prompts_per_step, max_digits=cfg.max_digits,
                                                  seed=10_000 + seed, id_prefix=f"s{seed}", exclude=seen)
        prompts_file = seed_dir / "prompts.jsonl"
        write_jsonl(prompts_file, prompts)
        samples_file = seed_dir / "reference_samples.jsonl"
        samples_file.unlink(missing_ok=True)
        generate_samples(GenerateConfig(model=str(reference), data=str(prompts_file), out=str(samples_file),
                                        num_samples=cfg.samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
                                        temperature=1.0, seed=seed, batch_size=512, device="cpu",
                                        use_chat_template=False, progress=cfg.progress))
        for reward in cfg.rewards:
            for loss in cfg.losses:
                for arm in ARMS:
                    run_dir = seed_dir / f"{reward}-{loss}-{arm}"
                    shutil.rmtree(run_dir, ignore_errors=True)
                    counted = _CountedReward(reward_fns[reward])  # scored during training (on-policy only)
                    train_cfg = _train_config(cfg, reference=reference, run_dir=run_dir, loss=loss, arm=arm,
                                              reward=counted if arm == "on_policy" else reward_fns[reward],
                                              seed=seed, prompts_file=prompts_file, samples_file=samples_file,
                                              save_every=save_every)
                    t0 = time.perf_counter()
                    result = train(train_cfg)
                    train_seconds = time.perf_counter() - t0
                    samples_scored = counted.calls
                    curve_reward, curve_length = {}, {}
                    for step in checkpoints:
                        lengths = ref_lengths if step == 0 else sample_lengths(
                            checkpoint_dir(run_dir / "train", step), eval_prompts,
                            samples_per_prompt=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens)
                        curve_reward[step] = score_lengths(reward_fns[reward], lengths)
                        curve_length[step] = statistics.fmean(lengths)
                    runs.append({"reward": reward, "loss": loss, "arm": arm, "seed": seed,
                                 "reward_at_step": curve_reward, "length_at_step": curve_length,
                                 "final_reward": curve_reward[cfg.steps], "final_length": curve_length[cfg.steps],
                                 "samples_scored": samples_scored, "train_seconds": round(train_seconds, 2),
                                 "final_loss": result.last_metrics.get("loss")})
                    log(f"seed {seed} {reward:11s} {loss:9s} {arm:9s}: reward {curve_reward[0]:+.3f} -> "
                        f"{curve_reward[cfg.steps]:+.3f}, length {curve_length[0]:.2f} -> "
                        f"{curve_length[cfg.steps]:.2f} ({train_seconds:.1f} s)")
                    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints are evaluated; keep the disk clean
    timings["train_and_eval"] = time.perf_counter() - t_train

    summary = []
    for reward in cfg.rewards:
        for loss in cfg.losses:
            for arm in ARMS:
                mine = [r for r in runs if (r["reward"], r["loss"], r["arm"]) == (reward, loss, arm)]
                summary.append({"reward": reward, "loss": loss, "arm": arm,
                                "reward_at_step": {s: _summaries([r["reward_at_step"][s] for r in mine])
                                                   for s in checkpoints},
                                "length_at_step": {s: _summaries([r["length_at_step"][s] for r in mine])
                                                   for s in checkpoints}})
    paired = paired_comparisons(runs, cfg)
    table = format_table(summary, checkpoints, reference_info)
    seconds = time.perf_counter() - started
    timings["total"] = seconds
    results = {"command": command, "table": table, "paired": paired, "reference": reference_info, "runs": runs,
               "summary": summary, "checkpoint_steps": checkpoints,
               "seconds": {k: round(v, 1) for k, v in timings.items()}, "config": asdict(cfg),
               "torch_threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = (f"Command: `{command}`\n\nWall time: {seconds:.0f} s ({torch.get_num_threads()} torch thread(s)); "
            f"{len(cfg.seeds)} seed(s); ± is the sd over seeds.\n\n{table}\n")
    if paired:
        text += "\n" + format_paired(paired, len(cfg.seeds)) + "\n"
    (out / "results.md").write_text(text)
    plot_curves(summary, checkpoints, out / "reward_vs_steps.png", reference_info)
    print("\n" + text)
    log(f"done in {seconds:.0f} s; outputs in {out.resolve()}")
    return results


def paired_comparisons(runs: Sequence[dict], cfg: LengthStudyConfig) -> list[dict]:
    """Seed-by-seed differences of the held-out reward (a seed fixes the prompts, the offline samples
    and the data order for every loss and arm).

    Rows: ``loss - rwr`` within a (reward, arm) (``vs = "rwr"``; only when the maximum-likelihood arm
    ran), and ``on_policy - offline`` for each (reward, loss) (``vs = None``). Each carries
    :func:`dftkern.train.plotting.paired_difference` (``n, mean, sd, wins, t, p``) of the final reward
    (``"final"``) and of the mean reward over the checkpoints, step 0 included (``"auc"``: a speed
    measure, higher = the reward rose earlier).
    """
    measures = {}
    for run in runs:
        curve = [run["reward_at_step"][s] for s in sorted(run["reward_at_step"], key=int)]
        per_seed = measures.setdefault((run["reward"], run["loss"], run["arm"]), {})
        per_seed[run["seed"]] = {"final": run["final_reward"], "auc": statistics.fmean(curve)}

    def compare(key_a, key_b) -> dict:
        return {part: plotting.paired_difference([measures[key_a][seed][part] for seed in cfg.seeds],
                                                 [measures[key_b][seed][part] for seed in cfg.seeds])
                for part in ("final", "auc")}

    rows = []
    for reward in cfg.rewards:
        if MAXIMUM_LIKELIHOOD in cfg.losses:
            for arm in ARMS:
                for loss in cfg.losses:
                    if loss != MAXIMUM_LIKELIHOOD:
                        rows.append({"reward": reward, "arm": arm, "loss": loss, "vs": MAXIMUM_LIKELIHOOD,
                                     **compare((reward, loss, arm), (reward, MAXIMUM_LIKELIHOOD, arm))})
        for loss in cfg.losses:
            rows.append({"reward": reward, "arm": "on_policy - offline", "loss": loss, "vs": None,
                         **compare((reward, loss, "on_policy"), (reward, loss, "offline"))})
    return rows
