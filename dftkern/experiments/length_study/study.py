"""Running the study: every (reward, loss, arm, seed) through the reference trainer, then evaluation."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from dftkern.train import plotting

from .config import ARMS, LengthStudyConfig
from .models import addition_operands, build_reference, sample_lengths, write_jsonl
from .offline import build_offline_files, score_lengths
from .report import format_table, plot_curves
from .rewards import _REWARD_CALLS, _REWARD_FUNCTIONS, modal_length, set_mode_length_target

__all__ = ["run_length_study"]

#: where the trainer imports the rewards from (``MODULE:FUNCTION``)
_MODULE = "dftkern.experiments.length_study"


def _summaries(values: Sequence[float]) -> dict:
    mean, sd = plotting.mean_sd(values)
    return {"mean": mean, "min": min(values), "max": max(values), "std": sd, "values": list(values)}


def run_length_study(cfg: LengthStudyConfig) -> dict:
    """Run the study; writes ``results.md``, ``results.json`` and ``reward_vs_steps.png`` into ``cfg.out``.

    Returns the ``results.json`` content: ``{"table", "reference", "runs", "summary", "seconds", "config"}``;
    ``runs`` holds one entry per (reward, loss, arm, seed) with ``reward``/``length`` per checkpoint step
    and ``samples_scored`` (reward evaluations during training: ``0`` offline; on-policy ``S * B * n``,
    plus ``S * B`` for DPO, whose pair rule also scores the data's answer).
    """
    cfg = cfg.resolved()
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        return _run(cfg)
    finally:
        torch.set_num_threads(previous_threads)
        set_mode_length_target(None)


def _run(cfg: LengthStudyConfig) -> dict:
    from dftkern.train import synthetic
    from dftkern.train.checkpoint import checkpoint_dir
    from dftkern.train.generate import GenerateConfig, generate_samples
    from dftkern.train.ref_logps import RefLogpsConfig, compute_ref_logps
    from dftkern.train.trainer import TrainConfig, train

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

    # held-out prompts; the reference's length distribution and mode on them
    warm = synthetic.make_addition_records(cfg.num_warmup_records, max_digits=cfg.max_digits, seed=1234)
    seen = {addition_operands(r["prompt"]) for r in warm}
    eval_records = synthetic.make_addition_records(cfg.eval_prompts, max_digits=cfg.max_digits, seed=99,
                                                   id_prefix="eval", exclude=seen)
    seen |= {addition_operands(r["prompt"]) for r in eval_records}
    eval_prompts = [r["prompt"] for r in eval_records]
    eval_kwargs = dict(samples_per_prompt=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens)
    ref_lengths = sample_lengths(reference, eval_prompts, **eval_kwargs)
    mode = modal_length(ref_lengths)
    set_mode_length_target(mode, cfg.mode_width)
    histogram = dict(sorted(Counter(ref_lengths).items()))
    log(f"reference length histogram {histogram}; mode {mode}")
    reference_info = {"model": str(reference), "mode_length": mode, "length_histogram": histogram,
                      "mean_length": statistics.fmean(ref_lengths),
                      "reward": {r: score_lengths(r, ref_lengths) for r in cfg.rewards}}

    checkpoints = cfg.checkpoint_steps()
    save_every = math.gcd(*checkpoints[1:])
    num_prompts = cfg.steps * cfg.prompts_per_step
    runs = []
    t_train = time.perf_counter()
    for seed in cfg.seeds:
        seed_dir = work / f"seed-{seed}"
        prompts = synthetic.make_addition_records(num_prompts, max_digits=cfg.max_digits, seed=10_000 + seed,
                                                  id_prefix=f"s{seed}", exclude=seen)
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
                    common = dict(out=str(run_dir / "train"), loss=loss, max_steps=cfg.steps,
                                  batch_size=cfg.prompts_per_step, lr=cfg.lr[loss], warmup_steps=0,
                                  min_lr_ratio=1.0, beta=cfg.dpo_beta, seed=seed, save_every=save_every,
                                  keep_checkpoints=None, device="cpu", use_chat_template=False, plot=False,
                                  progress=cfg.progress)
                    if arm == "offline":
                        data_file, negatives_file = build_offline_files(loss, reward, prompts_file, samples_file,
                                                                        run_dir / "data")
                        if loss == "dpo":
                            compute_ref_logps(RefLogpsConfig(model=str(reference), data=str(data_file),
                                                             negatives=str(negatives_file), batch_size=512,
                                                             device="cpu", use_chat_template=False,
                                                             progress=False))
                        train_cfg = TrainConfig(model=str(reference), data=str(data_file),
                                                negatives=str(negatives_file), **common)
                    else:
                        train_cfg = TrainConfig(model=str(reference), data=str(prompts_file), on_policy=True,
                                                reward=f"{_MODULE}:{_REWARD_FUNCTIONS[reward].__name__}",
                                                samples_per_prompt=cfg.samples_per_prompt,
                                                refresh_every=cfg.refresh_every,
                                                sample_max_new_tokens=cfg.max_new_tokens, sample_temperature=1.0,
                                                generation_batch_size=512, **common)
                    calls_before = _REWARD_CALLS[reward]
                    t0 = time.perf_counter()
                    result = train(train_cfg)
                    train_seconds = time.perf_counter() - t0
                    samples_scored = _REWARD_CALLS[reward] - calls_before
                    curve_reward, curve_length = {}, {}
                    for step in checkpoints:
                        lengths = ref_lengths if step == 0 else sample_lengths(
                            checkpoint_dir(run_dir / "train", step), eval_prompts, **eval_kwargs)
                        curve_reward[step] = score_lengths(reward, lengths)
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
    table = format_table(summary, checkpoints, reference_info)
    seconds = time.perf_counter() - started
    timings["total"] = seconds
    results = {"table": table, "reference": reference_info, "runs": runs, "summary": summary,
               "checkpoint_steps": checkpoints, "seconds": {k: round(v, 1) for k, v in timings.items()},
               "config": asdict(cfg), "torch_threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")
    plot_curves(summary, checkpoints, out / "reward_vs_steps.png", reference_info)
    print("\n" + table)
    log(f"done in {seconds:.0f} s; outputs in {out.resolve()}")
    return results

