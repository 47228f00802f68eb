"""The synthetic length tasks of Tajwar et al. (2024), in miniature, through dftkern's reference trainer.

Claim under test ("Preference Fine-Tuning of LLMs Should Leverage Suboptimal, On-Policy Data",
synthetic LLM experiments): sampling from the current policy (on-policy) and pushing probability
down on bad samples (a negative gradient) relocate mass faster than learning from samples drawn
once from the reference, most clearly when the reward's optimum lies where the reference puts
little mass.

Setup (``python -m dftkern.experiments.length_study [--quick] [--out DIR]``)
-------------------------------------------------------------------------
1. **Reference model**: the trainer's tiny Llama (:func:`dftkern.train.synthetic.make_tiny_llama`,
   hidden size 128, 4 layers, character tokenizer) after a short SFT warm-up on the built-in addition task with operands of
   1 to ``max_digits`` digits (:func:`dftkern.train.trainer.train`, loss ``sft``). Its answers are
   1-4 characters long; it practically never answers with nothing. Cached in ``<work>/reference``
   and reused when the settings match.
2. **Rewards** (functions ``reward(prompt, response, reference) -> float``; the response's length is
   its number of characters = tokens before EOS, correctness is ignored):

   * ``min_length``: ``-len(response)``. Optimum: the empty response, where the reference has ~no mass.
   * ``mode_length``: ``exp(-((len(response) - mode) / width)^2)``, peaked at the modal response
     length of the reference model (measured on held-out prompts), ``width = 1`` by default.
3. **Arms**, for each reward and each loss in {``dpo``, ``reinforce``}, with the same prompts in the
   same order, the same number of gradient steps ``S``, prompts per step ``B`` and samples per prompt
   ``n`` (hence the same number of samples):

   * ``offline``: ``n`` samples per prompt drawn once from the reference model
     (:func:`dftkern.train.generate.generate_samples`) for ``S * B`` distinct prompts, one epoch;
   * ``on_policy``: ``train --on-policy``: every ``refresh_every`` steps the prompts of the coming
     steps get ``n`` fresh samples from the current policy (:mod:`dftkern.train.onpolicy`).

   The rows a loss sees are built by the same rule in both arms (the trainer's on-policy rule):
   ``reinforce``: the ``n`` samples with their rewards (group-mean baseline); ``dpo``: one pair per
   prompt, chosen = the data's answer (the correct sum) unless a sample has a strictly higher reward
   (then the best sample), rejected = the lowest-reward sample; the DPO reference log-probs are the
   sampling model's (the reference model offline, the current policy on-policy).
4. **Evaluation**: the policy after 0, S/4, S/2, 3S/4 and S steps samples ``eval_samples`` answers
   (temperature 1, fixed seeds) for each of ``eval_prompts`` held-out prompts; reported: mean reward
   and mean response length; mean and spread over the seeds.

Outputs in ``--out`` (default ``docs/length_study``): ``results.md`` (the table), ``results.json``
(every number, the settings, timings), ``reward_vs_steps.png``. The reference model and the scratch
runs go to ``--work`` (default ``runs/length_study``, git-ignored); checkpoints are deleted once evaluated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

__all__ = [
    "LENGTH_REWARDS",
    "LOSSES",
    "ARMS",
    "LengthStudyConfig",
    "response_length",
    "min_length_reward",
    "mode_length_reward",
    "set_mode_length_target",
    "reward_call_count",
    "modal_length",
    "run_length_study",
    "format_table",
    "main",
]

LENGTH_REWARDS = ("min_length", "mode_length")
LOSSES = ("dpo", "reinforce")
ARMS = ("offline", "on_policy")
_MODULE = "dftkern.experiments.length_study"

# ----------------------------------------------------------------------------------------------
# rewards
# ----------------------------------------------------------------------------------------------

_MODE_TARGET: dict[str, float] = {}  # {"mode": int, "width": float} once set
_REWARD_CALLS = Counter()


def response_length(response: str) -> int:
    """Length of a response in characters (with the character tokenizer: tokens before EOS)."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    return len(response)


def min_length_reward(prompt: str, response: str, reference: str | None = None) -> float:
    """``-len(response)``: shorter is better, the empty response is optimal. ``prompt``/``reference`` are ignored."""
    _REWARD_CALLS["min_length"] += 1
    return -float(response_length(response))


def set_mode_length_target(mode: int | None, width: float = 1.0) -> None:
    """Set the peak (``mode``, in characters) and ``width`` of :func:`mode_length_reward`; ``None`` clears it.

    The trainer loads rewards by name (``MODULE:FUNCTION``), so the peak is module state. Outside this
    process set the environment variables ``DFTKERN_LENGTH_MODE`` (and optionally ``DFTKERN_LENGTH_WIDTH``).
    """
    if mode is None:
        _MODE_TARGET.clear()
        return
    if isinstance(mode, bool) or not isinstance(mode, int) or mode < 0:
        raise ValueError(f"mode must be an integer >= 0, got {mode!r}")
    if not (isinstance(width, (int, float)) and width > 0 and math.isfinite(width)):
        raise ValueError(f"width must be a finite number > 0, got {width!r}")
    _MODE_TARGET.update(mode=mode, width=float(width))


def _mode_target() -> tuple[int, float]:
    if _MODE_TARGET:
        return int(_MODE_TARGET["mode"]), float(_MODE_TARGET["width"])
    if "DFTKERN_LENGTH_MODE" in os.environ:
        return int(os.environ["DFTKERN_LENGTH_MODE"]), float(os.environ.get("DFTKERN_LENGTH_WIDTH", "1.0"))
    raise ValueError("mode_length_reward has no target: call set_mode_length_target(mode) or set "
                     "DFTKERN_LENGTH_MODE")


def mode_length_reward(prompt: str, response: str, reference: str | None = None) -> float:
    """``exp(-((len(response) - mode) / width)^2)`` in (0, 1], 1 at the target length (see :func:`set_mode_length_target`)."""
    mode, width = _mode_target()
    _REWARD_CALLS["mode_length"] += 1
    return math.exp(-((response_length(response) - mode) / width) ** 2)


_REWARD_FUNCTIONS: dict[str, Callable[..., float]] = {"min_length": min_length_reward,
                                                      "mode_length": mode_length_reward}


def reward_call_count(name: str | None = None) -> int:
    """How many times the reward ``name`` (or any length reward) has been evaluated in this process."""
    if name is None:
        return sum(_REWARD_CALLS.values())
    if name not in LENGTH_REWARDS:
        raise ValueError(f"name must be one of {LENGTH_REWARDS} or None, got {name!r}")
    return _REWARD_CALLS[name]


def modal_length(lengths: Sequence[int]) -> int:
    """The most frequent length (the smallest one on ties)."""
    if len(lengths) == 0:
        raise ValueError("lengths is empty")
    counts = Counter(int(v) for v in lengths)
    top = max(counts.values())
    return min(v for v, c in counts.items() if c == top)


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


@dataclass
class LengthStudyConfig:
    """Sizes and settings; ``quick=True`` shrinks everything for CI (see :meth:`resolved`).

    ``steps`` (S), ``prompts_per_step`` (B) and ``samples_per_prompt`` (n) are shared by every arm.
    Learning rates are per loss (their gradients have different scales) and equal across arms.
    """

    out: str = "docs/length_study"
    work: str | None = None  # reference model + scratch runs; default: runs/length_study (git-ignored)
    quick: bool = False
    seeds: tuple[int, ...] = (0, 1)
    # reference model
    max_digits: int = 3
    num_warmup_records: int = 3000
    hidden_size: int = 128
    num_layers: int = 4
    warmup_steps: int = 300
    warmup_lr: float = 2e-3
    warmup_batch_size: int = 32
    # the study
    steps: int = 40
    prompts_per_step: int = 16
    samples_per_prompt: int = 4
    refresh_every: int = 1
    lr: dict = field(default_factory=lambda: {"dpo": 1e-4, "reinforce": 1e-4})
    dpo_beta: float = 0.1
    mode_width: float = 1.0
    max_new_tokens: int | None = None  # default: max_digits + 3
    eval_prompts: int = 128
    eval_samples: int = 4
    num_checkpoints: int = 4
    rewards: tuple[str, ...] = LENGTH_REWARDS
    losses: tuple[str, ...] = LOSSES
    threads: int | None = 1
    progress: bool = False

    def resolved(self) -> LengthStudyConfig:
        """Apply ``quick`` (a smaller model, fewer steps, one seed) and the derived defaults; validate."""
        cfg = self
        if cfg.quick:
            cfg = replace(cfg, quick=False, seeds=cfg.seeds[:1], num_warmup_records=512, hidden_size=64,
                          num_layers=2, warmup_steps=60, steps=4, prompts_per_step=8, eval_prompts=32,
                          eval_samples=2, num_checkpoints=2)
        if cfg.max_new_tokens is None:
            cfg = replace(cfg, max_new_tokens=cfg.max_digits + 3)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        for name in ("max_digits", "num_warmup_records", "hidden_size", "num_layers", "warmup_steps",
                     "warmup_batch_size", "steps", "prompts_per_step", "samples_per_prompt", "refresh_every",
                     "eval_prompts", "eval_samples", "num_checkpoints", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2 (pairs and groups need two samples), "
                             f"got {self.samples_per_prompt}")
        if self.num_checkpoints > self.steps:
            raise ValueError(f"num_checkpoints ({self.num_checkpoints}) must be <= steps ({self.steps})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty sequence of distinct integers, got {self.seeds!r}")
        bad = [r for r in self.rewards if r not in LENGTH_REWARDS]
        if bad or not self.rewards:
            raise ValueError(f"rewards must be a non-empty subset of {LENGTH_REWARDS}, got {self.rewards!r}")
        bad = [loss for loss in self.losses if loss not in LOSSES]
        if bad or not self.losses:
            raise ValueError(f"losses must be a non-empty subset of {LOSSES}, got {self.losses!r}")
        missing = [loss for loss in self.losses if not (isinstance(self.lr.get(loss), (int, float))
                                                         and self.lr[loss] > 0)]
        if missing:
            raise ValueError(f"lr must map every loss to a learning rate > 0; missing or invalid: {missing}")
        for name in ("warmup_lr", "dpo_beta", "mode_width"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4 (the number of heads), got {self.hidden_size}")

    def checkpoint_steps(self) -> list[int]:
        """The steps at which the policy is evaluated (0 = the reference), S included."""
        return [0] + [round(self.steps * (i + 1) / self.num_checkpoints) for i in range(self.num_checkpoints)]

    def reference_key(self) -> dict:
        """The settings that determine the reference model (a cached one is reused when they match)."""
        return {k: getattr(self, k) for k in ("max_digits", "num_warmup_records", "hidden_size", "num_layers",
                                              "warmup_steps", "warmup_lr", "warmup_batch_size")}


# ----------------------------------------------------------------------------------------------
# pieces
# ----------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _operands(prompt: str) -> tuple[int, int]:
    a, b = prompt[:-1].split("+")
    return int(a), int(b)


def build_reference(cfg: LengthStudyConfig, work: Path, log: Callable[[str], None]) -> Path:
    """SFT warm-up of the tiny default model on addition (or reuse a cached one); returns its directory."""
    from dftkern.train import synthetic
    from dftkern.train.trainer import TrainConfig, train

    ref_dir = work / "reference"
    meta = ref_dir / "reference.json"
    if meta.exists():
        saved = json.loads(meta.read_text())
        if saved.get("key") == cfg.reference_key() and Path(saved["model"]).is_dir():
            log(f"reusing the reference model {saved['model']}")
            return Path(saved["model"])
    shutil.rmtree(ref_dir, ignore_errors=True)
    records = synthetic.make_addition_records(cfg.num_warmup_records, max_digits=cfg.max_digits, seed=1234,
                                              id_prefix="warmup")
    _write_jsonl(ref_dir / "warmup.jsonl", records)
    tokenizer = synthetic.build_char_tokenizer()
    synthetic.make_tiny_llama(tokenizer, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=4,
                              max_positions=4 * cfg.max_digits + 12, seed=0, save_dir=ref_dir / "base")
    log(f"SFT warm-up of the reference model: {cfg.warmup_steps} steps")
    result = train(TrainConfig(model=str(ref_dir / "base"), data=str(ref_dir / "warmup.jsonl"),
                               out=str(ref_dir / "warmup"), loss="sft", max_steps=cfg.warmup_steps,
                               batch_size=cfg.warmup_batch_size, lr=cfg.warmup_lr, weight_decay=0.01,
                               keep_checkpoints=1, device="cpu", plot=False, progress=cfg.progress))
    meta.write_text(json.dumps({"key": cfg.reference_key(), "model": str(result.final_checkpoint)}, indent=2))
    return Path(result.final_checkpoint)


@torch.no_grad()
def sample_lengths(model_dir: str | Path, prompts: Sequence[str], *, samples_per_prompt: int, max_new_tokens: int,
                   seed: int = 0) -> list[int]:
    """Sample ``samples_per_prompt`` answers per prompt (temperature 1, fixed seeds); their lengths, prompt-major."""
    from dftkern.train.data import PromptRecord, encode_prompt
    from dftkern.train.generate import SamplingConfig, decode, eos_token_ids
    from dftkern.train.model import load_causal_lm, load_tokenizer
    from dftkern.train.util import derive_seed

    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), attn="sdpa", device="cpu", dtype=torch.float32)
    rows, seeds = [], []
    for p, prompt in enumerate(prompts):
        ids = encode_prompt(tokenizer, PromptRecord(prompt_id=str(p), response="", prompt=prompt),
                            use_chat_template=False)
        for j in range(samples_per_prompt):
            rows.append(ids)
            seeds.append(derive_seed("length-study-eval", seed, p, j))
    lengths = []
    for start in range(0, len(rows), 512):
        outputs = decode(model, rows[start:start + 512], sampling=SamplingConfig(max_new_tokens, 1.0),
                         eos_ids=eos_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                         seeds=seeds[start:start + 512])
        lengths += [response_length(tokenizer.decode(tokens, skip_special_tokens=True)) for tokens, _ in outputs]
    return lengths


def _score_lengths(reward: str, lengths: Sequence[int]) -> float:
    fn = _REWARD_FUNCTIONS[reward]
    before = _REWARD_CALLS[reward]
    value = statistics.fmean(fn("", "1" * n) for n in lengths)
    _REWARD_CALLS[reward] = before  # evaluation is not training: keep the sample counter for training only
    return value


def build_offline_files(loss: str, reward: str, prompts_file: Path, samples_file: Path, out_dir: Path) -> tuple[Path, Path]:
    """Turn reference samples into the trainer's offline inputs, rows chosen by the on-policy rule.

    ``reinforce``: data answer := sample 0, negatives := samples 1..n-1 (so the group is the n samples
    with their rewards). ``dpo``: data answer := chosen (the correct sum unless a sample is strictly
    better), one negative := the lowest-reward sample. Returns ``(data_file, negatives_file)``.
    """
    from dftkern.train.data import read_prompt_records, read_sample_records

    fn = _REWARD_FUNCTIONS[reward]
    before = _REWARD_CALLS[reward]
    records = read_prompt_records(prompts_file)
    samples = read_sample_records(samples_file)
    data, negatives = [], []
    for record in records:
        sample = samples[record.prompt_id]
        rewards = [fn(record.prompt_text(), text, record.response) for text in sample.responses]
        if loss == "reinforce":
            first = sample.responses[0]
            data.append({"id": record.prompt_id, "prompt": record.prompt, "response": first})
            negatives.append({"prompt_id": record.prompt_id, "responses": list(sample.responses[1:]),
                              "response_token_ids": [list(t) for t in sample.response_token_ids[1:]],
                              "rewards": rewards[1:], "positive_reward": rewards[0]})
        else:
            positive_reward = fn(record.prompt_text(), record.response, record.response)
            best = max(range(len(rewards)), key=lambda j: (rewards[j], -j))
            worst = min(range(len(rewards)), key=lambda j: (rewards[j], j))
            chosen = sample.responses[best] if rewards[best] > positive_reward else record.response
            data.append({"id": record.prompt_id, "prompt": record.prompt, "response": chosen})
            negatives.append({"prompt_id": record.prompt_id, "responses": [sample.responses[worst]],
                              "response_token_ids": [list(sample.response_token_ids[worst])],
                              "rewards": [rewards[worst]]})
    _REWARD_CALLS[reward] = before
    data_file, negatives_file = out_dir / "data.jsonl", out_dir / "negatives.jsonl"
    _write_jsonl(data_file, data)
    _write_jsonl(negatives_file, negatives)
    return data_file, negatives_file


# ----------------------------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------------------------


def _summaries(values: Sequence[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": list(values)}


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
    seen = {_operands(r["prompt"]) for r in warm}
    eval_records = synthetic.make_addition_records(cfg.eval_prompts, max_digits=cfg.max_digits, seed=99,
                                                   id_prefix="eval", exclude=seen)
    seen |= {_operands(r["prompt"]) for r in eval_records}
    eval_prompts = [r["prompt"] for r in eval_records]
    eval_kwargs = dict(samples_per_prompt=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens)
    ref_lengths = sample_lengths(reference, eval_prompts, **eval_kwargs)
    mode = modal_length(ref_lengths)
    set_mode_length_target(mode, cfg.mode_width)
    histogram = dict(sorted(Counter(ref_lengths).items()))
    log(f"reference length histogram {histogram}; mode {mode}")
    reference_info = {"model": str(reference), "mode_length": mode, "length_histogram": histogram,
                      "mean_length": statistics.fmean(ref_lengths),
                      "reward": {r: _score_lengths(r, ref_lengths) for r in cfg.rewards}}

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
        _write_jsonl(prompts_file, prompts)
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
                        curve_reward[step] = _score_lengths(reward, lengths)
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


def format_table(summary: Sequence[dict], checkpoints: Sequence[int], reference: dict) -> str:
    """Markdown: per (reward, loss, arm) the mean held-out reward at each checkpoint (± std over seeds)
    and the final mean length."""
    head = " | ".join(f"reward @ {s}" for s in checkpoints)
    lines = [f"Reference model: modal length {reference['mode_length']}, mean length "
             f"{reference['mean_length']:.2f}, length histogram {reference['length_histogram']}.", "",
             f"| reward | loss | data | {head} | final length |",
             "|---|---|---|" + "---|" * len(checkpoints) + "---|"]
    for row in summary:
        cells = []
        for s in checkpoints:
            stats = row["reward_at_step"][s]
            cells.append(f"{stats['mean']:+.3f}" + (f" ± {stats['std']:.3f}" if len(stats["values"]) > 1 else ""))
        length = row["length_at_step"][checkpoints[-1]]
        length_cell = f"{length['mean']:.2f}" + (f" ± {length['std']:.2f}" if len(length["values"]) > 1 else "")
        lines.append(f"| {row['reward']} | {row['loss']} | {row['arm'].replace('_', '-')} | "
                     + " | ".join(cells) + f" | {length_cell} |")
    return "\n".join(lines)


def plot_curves(summary: Sequence[dict], checkpoints: Sequence[int], path: Path, reference: dict) -> None:
    """One panel per reward: mean held-out reward vs training step per (loss, arm), band = min..max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = list(dict.fromkeys(row["reward"] for row in summary))
    fig, axes = plt.subplots(1, len(rewards), figsize=(5.5 * len(rewards), 4), squeeze=False)
    styles = {("dpo", "offline"): ("tab:blue", "--"), ("dpo", "on_policy"): ("tab:blue", "-"),
              ("reinforce", "offline"): ("tab:red", "--"), ("reinforce", "on_policy"): ("tab:red", "-")}
    for ax, reward in zip(axes[0], rewards):
        for row in (r for r in summary if r["reward"] == reward):
            color, line = styles[(row["loss"], row["arm"])]
            means = [row["reward_at_step"][s]["mean"] for s in checkpoints]
            ax.plot(checkpoints, means, line, color=color, marker="o", label=f"{row['loss']} {row['arm']}")
            ax.fill_between(checkpoints, [row["reward_at_step"][s]["min"] for s in checkpoints],
                            [row["reward_at_step"][s]["max"] for s in checkpoints], color=color, alpha=0.12)
        title = "reward = -length" if reward == "min_length" else \
            f"reward peaked at the reference mode (length {reference['mode_length']})"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("gradient step")
        ax.set_ylabel("mean reward of held-out samples")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {_MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed, seconds (for CI)")
    parser.add_argument("--out", default="docs/length_study",
                        help="output directory: results.md, results.json, reward_vs_steps.png "
                             "(default: docs/length_study)")
    parser.add_argument("--work", default=None,
                        help="where the reference model (reused when its settings match) and the scratch runs "
                             "go (default: runs/length_study)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: 0 1)")
    parser.add_argument("--steps", type=int, default=None, help="gradient steps S per run (default: 40)")
    parser.add_argument("--refresh-every", type=int, default=None,
                        help="on-policy: steps between sampling rounds (default: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0 = torch's default (default: 1)")
    parser.add_argument("--progress", action="store_true", help="show the trainer's progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = LengthStudyConfig(out=args.out, work=args.work, quick=args.quick, threads=args.threads or None, progress=args.progress)
    if args.seeds is not None:
        cfg.seeds = tuple(args.seeds)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.refresh_every is not None:
        cfg.refresh_every = args.refresh_every
    try:
        run_length_study(cfg)
    except ValueError as err:
        print(f"{build_parser().prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    # run the imported module, not this __main__ copy: the trainer loads the rewards by name from
    # dftkern.experiments.length_study, and the reward peak and call counter must live there
    from dftkern.experiments.length_study import main as _main

    sys.exit(_main())
