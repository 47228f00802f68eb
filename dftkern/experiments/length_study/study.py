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

from .config import ARMS, MAXIMUM_LIKELIHOOD, VARIANTS, LengthStudyConfig, arms_of, trainer_loss
from .models import addition_operands, build_reference, sample_lengths, write_jsonl
from .offline import build_offline_files, score_lengths
from .report import format_paired, format_steps_to_optimum, format_table, format_train_metrics, plot_curves
from .rewards import length_reward, modal_length

__all__ = ["run_length_study", "paired_comparisons", "steps_to_optimum", "OPTIMUM_TOLERANCE"]

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

    Returns the ``results.json`` content: ``{"command", "table", "paired", "steps_to_optimum",
    "reference", "runs", "summary", "checkpoint_steps", "seconds", "config", "torch_threads",
    "workers"}``; ``runs`` holds one entry per (reward, loss, arm, seed) — arms per loss as
    :func:`~.config.arms_of` says — with ``reward``/``length`` per checkpoint step and
    ``samples_scored`` (reward evaluations during training: ``0`` offline; on-policy ``S * B * n``,
    plus ``S * B`` for ``dpo``/``dpo_sampler``, whose pair rule also scores the data's answer; half
    of ``S * B * n`` for ``ppo_2ep``, which trains twice on each window) and ``train_metrics``.
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
    ``reward``: the reward function (a callable, passed to the trainer as it is on-policy).

    ``dpo`` takes the initial (reference) model as its DPO reference in both arms (offline: the
    ``ref-logps`` cache of the reference model; on-policy: ``--on-policy-reference initial``);
    ``dpo_sampler`` is on-policy DPO with ``--on-policy-reference sampler``; ``ppo``/``grpo`` use the
    trainer's defaults (clip 0.2; KL 0 / 0.04 to the initial model; one update per window);
    ``ppo_2ep`` is ``ppo`` with ``ppo_epochs=2`` (:data:`~.config.VARIANTS`).
    """
    from dftkern.train.ref_logps import RefLogpsConfig, compute_ref_logps
    from dftkern.train.trainer import TrainConfig

    name = trainer_loss(loss)
    if arm not in arms_of(loss):
        raise ValueError(f"loss {loss!r} has no {arm!r} arm (its arms: {arms_of(loss)})")
    common = dict(out=str(run_dir / "train"), loss=name, max_steps=cfg.steps, batch_size=cfg.prompts_per_step,
                  lr=cfg.lr[loss], warmup_steps=0, min_lr_ratio=1.0, seed=seed, save_every=save_every,
                  keep_checkpoints=None, device="cpu", use_chat_template=False, plot=False, progress=cfg.progress)
    if name == "dpo":
        common["beta"] = cfg.dpo_beta
    elif name == "rwr":
        common["beta"] = cfg.rwr_beta
    if arm == "offline":
        data_file, negatives_file = build_offline_files(loss, reward, prompts_file, samples_file, run_dir / "data")
        if name == "dpo":
            compute_ref_logps(RefLogpsConfig(model=str(reference), data=str(data_file),
                                             negatives=str(negatives_file), batch_size=512, device="cpu",
                                             use_chat_template=False, progress=False))
        return TrainConfig(model=str(reference), data=str(data_file), negatives=str(negatives_file), **common)
    if loss == "dpo":
        common["on_policy_reference"] = "initial"
    common.update(VARIANTS.get(loss, (name, {}))[1])
    return TrainConfig(model=str(reference), data=str(prompts_file), on_policy=True,
                       reward=reward,
                       samples_per_prompt=cfg.samples_per_prompt, refresh_every=cfg.refresh_every,
                       sample_max_new_tokens=cfg.max_new_tokens, sample_temperature=1.0,
                       generation_batch_size=512, **common)


def _jobs(cfg: LengthStudyConfig) -> list[tuple[int, str, str, str]]:
    """Every ``(seed, reward, loss, arm)`` of the study, in the order of the results."""
    return [(seed, reward, loss, arm) for seed in cfg.seeds for reward in cfg.rewards for loss in cfg.losses
            for arm in arms_of(loss)]


def _run_one(cfg: LengthStudyConfig, job: tuple[int, str, str, str], *, reference: Path, work: Path, mode: int,
             eval_prompts: Sequence[str], ref_lengths: Sequence[int]) -> dict:
    """Train one ``(seed, reward, loss, arm)`` run, evaluate its checkpoints, delete them; its ``runs`` entry.

    Runs in the study's process (``workers == 1``) or in a worker process: everything it needs is an argument.
    """
    from dftkern.train.checkpoint import checkpoint_dir
    from dftkern.train.trainer import train

    seed, reward, loss, arm = job
    checkpoints = cfg.checkpoint_steps()
    seed_dir = work / f"seed-{seed}"
    run_dir = seed_dir / f"{reward}-{loss}-{arm}"
    shutil.rmtree(run_dir, ignore_errors=True)
    fn = length_reward(reward, mode, cfg.mode_width)
    counted = _CountedReward(fn)  # scored during training (on-policy only)
    train_cfg = _train_config(cfg, reference=reference, run_dir=run_dir, loss=loss, arm=arm,
                              reward=counted if arm == "on_policy" else fn, seed=seed,
                              prompts_file=seed_dir / "prompts.jsonl",
                              samples_file=seed_dir / "reference_samples.jsonl",
                              save_every=math.gcd(*checkpoints[1:]))
    t0 = time.perf_counter()
    result = train(train_cfg)
    train_seconds = time.perf_counter() - t0
    curve_reward, curve_length = {}, {}
    for step in checkpoints:
        lengths = ref_lengths if step == 0 else sample_lengths(
            checkpoint_dir(run_dir / "train", step), eval_prompts,
            samples_per_prompt=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens)
        curve_reward[step] = score_lengths(fn, lengths)
        curve_length[step] = statistics.fmean(lengths)
    metrics = _train_metrics(run_dir / "train" / "metrics.jsonl")
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints are evaluated; keep the disk clean
    return {"reward": reward, "loss": loss, "arm": arm, "seed": seed,
            "reward_at_step": curve_reward, "length_at_step": curve_length,
            "final_reward": curve_reward[cfg.steps], "final_length": curve_length[cfg.steps],
            "samples_scored": counted.calls, "train_seconds": round(train_seconds, 2),
            "seconds": round(time.perf_counter() - t0, 2), "final_loss": result.last_metrics.get("loss"),
            "train_metrics": metrics}


#: per-step training metrics summarised in each run's ``train_metrics`` (those the run logged)
TRAIN_METRICS = ("margin_mean", "clip_fraction_low", "clip_fraction_high", "ratio_mean", "kl_mean", "entropy_mean")


def _train_metrics(path: Path) -> dict:
    """``{metric: {"mean", "last"}}`` of :data:`TRAIN_METRICS` in a run's ``metrics.jsonl``: the mean over
    every logged step and over the last tenth of them."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "step" in r and "loss" in r]
    out = {}
    for key in TRAIN_METRICS:
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        if values:
            tail = values[-max(1, len(values) // 10):]
            out[key] = {"mean": statistics.fmean(values), "last": statistics.fmean(tail)}
    return out


def _worker_init(threads: int | None) -> None:
    """A worker process: ``threads`` torch threads, no progress bars from transformers."""
    import transformers

    if threads:
        torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()


def _run(cfg: LengthStudyConfig, command: str) -> dict:
    from dftkern.train import synthetic
    from dftkern.train.generate import GenerateConfig, generate_samples

    started = time.perf_counter()
    out = Path(cfg.out)
    work = Path(cfg.work or "runs/length_study").resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def log(message: str) -> None:
        print(f"[length_study {time.perf_counter() - started:6.1f} s] {message}", flush=True)

    t0 = time.perf_counter()
    reference = build_reference(cfg, work, log)
    timings["reference"] = time.perf_counter() - t0
    eval_prompts, seen, ref_lengths, reference_info, _ = _evaluation_set(cfg, reference, log)

    checkpoints = cfg.checkpoint_steps()
    t_train = time.perf_counter()
    for seed in cfg.seeds:  # the prompts and the offline arm's reference samples of each seed
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
    jobs = _jobs(cfg)
    kwargs = dict(reference=reference, work=work, mode=reference_info["mode_length"], eval_prompts=eval_prompts,
                  ref_lengths=ref_lengths)

    def done(run: dict) -> None:
        log(f"seed {run['seed']} {run['reward']:11s} {run['loss']:11s} {run['arm']:9s}: reward "
            f"{run['reward_at_step'][0]:+.3f} -> {run['final_reward']:+.3f}, length "
            f"{run['length_at_step'][0]:.2f} -> {run['final_length']:.2f} ({run['train_seconds']:.1f} s training)")

    if cfg.workers == 1:
        runs = []
        for job in jobs:
            runs.append(_run_one(cfg, job, **kwargs))
            done(runs[-1])
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # the on-policy runs take longest: start them first
        order = sorted(range(len(jobs)), key=lambda i: jobs[i][3] != "on_policy")
        by_job = {}
        with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init, initargs=(cfg.threads,)) as pool:
            futures = {pool.submit(_run_one, cfg, jobs[i], **kwargs): jobs[i] for i in order}
            for future in as_completed(futures):
                by_job[futures[future]] = future.result()
                done(by_job[futures[future]])
        runs = [by_job[job] for job in jobs]
    timings["train_and_eval"] = time.perf_counter() - t_train

    summary = []
    for reward in cfg.rewards:
        for loss in cfg.losses:
            for arm in arms_of(loss):
                mine = [r for r in runs if (r["reward"], r["loss"], r["arm"]) == (reward, loss, arm)]
                summary.append({"reward": reward, "loss": loss, "arm": arm,
                                "reward_at_step": {s: _summaries([r["reward_at_step"][s] for r in mine])
                                                   for s in checkpoints},
                                "length_at_step": {s: _summaries([r["length_at_step"][s] for r in mine])
                                                   for s in checkpoints}})
    paired = paired_comparisons(runs, cfg)
    reached = steps_to_optimum(runs, cfg)
    table = format_table(summary, checkpoints, reference_info)
    seconds = time.perf_counter() - started
    timings["total"] = seconds
    results = {"command": command, "table": table, "paired": paired, "steps_to_optimum": reached,
               "reference": reference_info, "runs": runs, "summary": summary, "checkpoint_steps": checkpoints,
               "seconds": {k: round(v, 1) for k, v in timings.items()}, "config": asdict(cfg),
               "torch_threads": cfg.threads or torch.get_num_threads(), "workers": cfg.workers}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    threads = cfg.threads or torch.get_num_threads()
    text = (f"Command: `{command}`\n\nWall time: {seconds:.0f} s ({cfg.workers} worker process(es) × {threads} "
            f"torch thread(s)); {len(runs)} runs, {len(cfg.seeds)} seed(s); ± is the sd over seeds.\n\n{table}\n")
    if paired:
        text += "\n" + format_paired(paired, len(cfg.seeds)) + "\n"
    text += "\n" + format_steps_to_optimum(reached) + "\n"
    diagnostics = format_train_metrics(runs, cfg.seeds)
    if diagnostics:
        text += "\n" + diagnostics + "\n"
    (out / "results.md").write_text(text)
    plot_curves(summary, checkpoints, out / "reward_vs_steps.png", reference_info)
    print("\n" + text)
    log(f"done in {seconds:.0f} s; outputs in {out.resolve()}")
    return results


#: a run has reached the optimum when its held-out reward is within this of it (min_length: 0, mode_length: 1)
OPTIMUM_TOLERANCE = {"min_length": (0.0, 0.1), "mode_length": (1.0, 0.02)}


def steps_to_optimum(runs: Sequence[dict], cfg: LengthStudyConfig) -> list[dict]:
    """Per (reward, loss, arm): the first checkpoint step at which each seed's held-out reward is within
    :data:`OPTIMUM_TOLERANCE` of the reward's optimum (``None``: never within ``cfg.steps``), in seed order."""
    rows = []
    for reward in cfg.rewards:
        optimum, tolerance = OPTIMUM_TOLERANCE[reward]
        for loss in cfg.losses:
            for arm in arms_of(loss):
                per_seed = []
                for seed in cfg.seeds:
                    run = next(r for r in runs if (r["reward"], r["loss"], r["arm"], r["seed"]) ==
                               (reward, loss, arm, seed))
                    steps = sorted(run["reward_at_step"], key=int)
                    per_seed.append(next((int(s) for s in steps if run["reward_at_step"][s] >= optimum - tolerance),
                                         None))
                rows.append({"reward": reward, "loss": loss, "arm": arm, "threshold": optimum - tolerance,
                             "steps": per_seed})
    return rows


def paired_comparisons(runs: Sequence[dict], cfg: LengthStudyConfig) -> list[dict]:
    """Seed-by-seed differences of the held-out reward (a seed fixes the prompts, the offline samples
    and the data order for every loss and arm).

    Rows: ``loss - rwr`` within an arm both ran (``vs = "rwr"``; only when the maximum-likelihood
    arm ran), ``dpo - dpo_sampler`` on-policy (``vs = "dpo_sampler"``: fixed vs moving DPO
    reference, when both ran), and ``on_policy - offline`` for each loss run in both arms
    (``vs = None``). Each carries :func:`dftkern.train.plotting.paired_difference` (``n, mean, sd,
    wins, t, p``) of the final reward (``"final"``) and of the mean reward over the checkpoints, step
    0 included (``"auc"``: a speed measure, higher = the reward rose earlier).
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
                    if loss != MAXIMUM_LIKELIHOOD and arm in arms_of(loss):
                        rows.append({"reward": reward, "arm": arm, "loss": loss, "vs": MAXIMUM_LIKELIHOOD,
                                     **compare((reward, loss, arm), (reward, MAXIMUM_LIKELIHOOD, arm))})
        if "dpo" in cfg.losses and "dpo_sampler" in cfg.losses:
            rows.append({"reward": reward, "arm": "on_policy", "loss": "dpo", "vs": "dpo_sampler",
                         **compare((reward, "dpo", "on_policy"), (reward, "dpo_sampler", "on_policy"))})
        for loss in cfg.losses:
            if arms_of(loss) == ARMS:
                rows.append({"reward": reward, "arm": "on_policy - offline", "loss": loss, "vs": None,
                             **compare((reward, loss, "on_policy"), (reward, loss, "offline"))})
    return rows
