"""Stage 3, ``train``: a plain PyTorch loop over dftkern's fused losses.

Per optimizer step: ``grad_accum`` micro-batches, each a forward of :class:`PolicyWithLoss`
(backbone -> last hidden state -> fused loss with the LM-head weight, no logits) and a backward of
``loss / grad_accum``; then gradient clipping, AdamW, and the warmup + cosine LR schedule. bf16
autocast on GPU, optional gradient checkpointing, FSDP2 under torchrun (:mod:`.distributed`).
Examples come from an :class:`~.onpolicy.ExampleSource`: the offline set, or fresh samples
(``on_policy``).

Non-finite steps: an optimizer step whose loss or gradient norm is not finite (on any process) is
skipped — no weight or optimizer update (the schedule and the data position still advance), a
``"skipped": true`` line in ``metrics.jsonl`` with the non-finite values as ``null`` and listed
under ``"nonfinite"``; ``max_nonfinite_steps`` such steps in a row stop training with
:class:`NonFiniteLossError`.

Resuming (``resume="auto"`` or a checkpoint path) restores weights, optimizer, scheduler, RNG,
DFTState, the data position and the on-policy window; on CPU a resumed run ends with exactly the
weights of an uninterrupted one. The checkpoint is checked completely first and a damaged newest
one is skipped for the newest intact one (:mod:`.resume`); stale ``.tmp-*`` directories of a
killed save are removed at start.

Output in ``out``: ``checkpoints/``, ``metrics.jsonl`` (one line per logged step), ``curves.png``,
``train_config.json`` (every option by its flat name as given, so they rebuild the config, plus what the run
derived, e.g. ``attn_kernel``: the attention kernel actually run).
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

import dftkern

from .batching import (
    OVERLONG_CHOICES,
    ExampleOrder,
    OverlongReport,
    TrainExample,
    attach_token_values,
    build_examples,
    collate,
    examples_fingerprint,
)
from .checkpoint import (
    capture_rng_state,
    checkpoint_candidates,
    latest_checkpoint,
    remove_stale_temporaries,
    restore_rng_state,
    write_checkpoint,
)
from .distributed import (
    DistContext,
    full_model_state_dict,
    full_optimizer_state_dict,
    gather_objects,
    init_distributed,
    load_optimizer_state,
    shard_model,
)
from .model import (
    PACKING_CHOICES,
    ModelConfig,
    PolicyWithLoss,
    load_causal_lm,
    load_tokenizer,
    progress_option,
    score_rows,
    token_logps_rows,
    use_packing,
    vocab_size,
)
from .objectives import LOSS_NAMES, POLICY_LOSS_NAMES, Objective, ObjectiveConfig
from .onpolicy import (
    ON_POLICY_LOSSES,
    ExampleSource,
    NegativeSchedule,
    OfflineExamples,
    OnPolicyConfig,
    OnPolicyExamples,
    PolicySampler,
    PromptSet,
    RowScorer,
    offline_layout,
)
from .options import Choice, FlatKeywords, Flag, Integer, Number, Text, flat_values, nested, option, validate
from .prefix_sharing import (
    SHARED_PROMPT_ATTENTION,
    SharedPromptUnsupported,
    check_attention_support,
    collate_shared,
    prepare_shared_prompt_model,
)
from .records import DataError, pool_stats, read_prompt_records, read_sample_records
from .ref_logps import RefLogpsPool, attach_ref_logps, cache_path, read_ref_logps
from .resume import load_resume_point
from .rewards import resolve_reward
from .util import atomic_write_json, note
from .vllm_engine import resolve_engine

__all__ = ["OptimConfig", "TrainConfig", "TrainResult", "NonFiniteLossError", "train", "warmup_cosine",
           "load_training_examples"]

PRECISION_CHOICES = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class OptimConfig:
    """Optimization: batches, AdamW, the warmup + cosine schedule, clipping, the data order."""

    batch_size: int = option(8, Integer(low=1), "examples (prompts) per micro-batch per process; DFT rows = "
                             "examples * (1+K)", group="optim")
    grad_accum: int = option(1, Integer(low=1), "micro-batches per optimizer step", group="optim")
    max_steps: int | None = option(None, Integer(low=1, optional=True), "optimizer steps", group="optim",
                                   default_text="from --epochs")
    epochs: float = option(1.0, Number(low=0, low_open=True), "passes over the data if --max-steps is unset",
                           group="optim")
    lr: float = option(1e-5, Number(low=0, low_open=True), "peak learning rate", group="optim")
    min_lr_ratio: float = option(0.1, Number(low=0, high=1), "cosine floor as a fraction of --lr", group="optim")
    warmup_steps: int | None = option(None, Integer(low=0, optional=True), "linear warmup steps", group="optim",
                                      default_text="from --warmup-ratio")
    warmup_ratio: float = option(0.05, Number(low=0, high=1, high_open=True), "warmup as a fraction of all steps",
                                 group="optim")
    weight_decay: float = option(0.0, Number(low=0), "AdamW weight decay on matrices", group="optim")
    adam_beta1: float = option(0.9, Number(low=0, high=1, high_open=True), "AdamW beta1", group="optim")
    adam_beta2: float = option(0.95, Number(low=0, high=1, high_open=True), "AdamW beta2", group="optim")
    adam_eps: float = option(1e-8, Number(low=0, low_open=True), "AdamW epsilon", group="optim")
    max_grad_norm: float = option(1.0, Number(low=0, low_open=True), "gradient clipping norm", group="optim")
    seed: int = option(0, Integer(low=0), "data order seed", group="optim")
    shuffle: bool = option(True, Flag(), "visit examples in file order", flag="--no-shuffle", group="optim")

    def __post_init__(self):
        validate(self)


@dataclass(init=False)
class TrainConfig(FlatKeywords):
    """Options of the train stage (``python -m dftkern.train train --help`` lists them).

    Composed of a :class:`~.model.ModelConfig` (``model``), an :class:`~.objectives.ObjectiveConfig`
    (``objective``: the loss and its hyper-parameters), an :class:`OptimConfig` (``optim``) and an
    optional :class:`~.onpolicy.OnPolicyConfig` (``on_policy``; None = offline training). Their
    options are also accepted flat, as before the split::

        TrainConfig(model="m", data="d.jsonl", out="run", loss="dpo", lr=1e-4, on_policy=True, reward="addition")
    """

    model: ModelConfig = nested(ModelConfig, help_for={"model": "initial model directory (policy)"})
    data: str = option(spec=Text(), help="training data: JSONL/Parquet of {prompt, response} or {messages}")
    out: str = option(spec=Text(), help="run directory (checkpoints/, metrics.jsonl, curves.png)")
    negatives: str | None = option(None, Text(optional=True), "generate stage output (every loss except sft, "
                                   "unless --on-policy; with --on-policy only for --offline-mix)")
    ref_logps: str | None = option(None, Text(optional=True), "reference log-prob cache file, or the directory "
                                   "holding it (the cache of exactly these rows, else the whole pool's: ref-logps "
                                   "without --num-negatives)", default_text="next to --negatives")
    num_negatives: int | None = option(None, Integer(low=1, optional=True), "K negatives per example: the first K "
                                       "samples per prompt, or with --rotate-negatives / --filter-negatives K of "
                                       "the prompt's pool (its M samples) per epoch", metavar="K",
                                       default_text="all")
    rotate_negatives: bool = option(False, Flag(), "take fresh negatives each epoch: epoch e trains on pool samples "
                                    "(e*K + j) mod n, j < K, of each prompt's n candidates (deterministic, "
                                    "resumable); needs --num-negatives K and reference log-probs of the whole pool "
                                    "(ref-logps without --num-negatives)")
    filter_negatives: bool = option(False, Flag(), "drop negatives the verifier marks correct (the rewards of "
                                    "generate --reward, see --correct-threshold) or equal to the good answer; a "
                                    "prompt left with none keeps its whole pool (counted); needs --num-negatives K")
    correct_threshold: float | None = option(None, Number(optional=True), "a negative counts as correct when its "
                                             "reward >= this (--filter-negatives, the neg_frac_correct metric)",
                                             default_text="the good answer's own reward (positive_reward)",
                                             metavar="REWARD")
    max_length: int | None = option(None, Integer(low=2, optional=True), "truncate rows to this many tokens "
                                    "(response end cut first)")
    overlong: str = option("truncate", Choice(OVERLONG_CHOICES), "rows longer than --max-length: 'truncate' cuts "
                           "them, 'drop' skips their whole example; the count is printed either way")
    objective: ObjectiveConfig = nested(ObjectiveConfig, default_factory=ObjectiveConfig)
    optim: OptimConfig = nested(OptimConfig, default_factory=OptimConfig)
    on_policy: OnPolicyConfig | None = nested(
        OnPolicyConfig, optional=True, group="on_policy",
        help="every --refresh-every steps sample --samples-per-prompt responses per prompt from the current policy, "
             "score them with --reward; losses: reinforce, rloo, rwr (samples only), dft/dft2 (fresh negatives), "
             "dpo/ipo/hinge/simpo/unlikelihood (online pairs; their reference log-probs are the sampling policy's "
             "own, or the initial model's with --on-policy-reference initial), ppo/grpo/dapo/dr_grpo (token level: group advantages, the sampler's per-token log-probs as the "
             "ratio's denominator, the initial model as the KL reference)",
        unused_hint=" (offline group losses take their rewards from generate --reward)")
    precision: str = option("auto", Choice(PRECISION_CHOICES), "auto = bf16 autocast on CUDA (fp32 master "
                            "weights), fp32 on CPU", group="system")
    packing: str = option("auto", Choice(PACKING_CHOICES), "packed variable-length batches (position_ids/"
                          "cu_seqlens); auto = on with flash_attention_2, padding otherwise", group="system")
    gradient_checkpointing: bool = option(False, Flag(), "recompute decoder layers in backward", group="system")
    share_prompt: bool | None = option(
        None, Flag(optional=True), "run the backbone over each group's prompt once (docs/prefix_sharing.md); needs "
        "sdpa, eager or flex_attention (--share-prompt with --attn auto loads sdpa). Neither flag: on when a prompt "
        "has several rows and the model passes the exactness probe, off otherwise (printed); --no-share-prompt: "
        "off", group="system")
    log_every: int = option(1, Integer(low=1), "metrics.jsonl every N steps", group="system")
    save_every: int | None = option(None, Integer(low=1, optional=True), "checkpoint every N steps (and at the end)",
                                    group="system")
    keep_checkpoints: int | None = option(2, Integer(low=1, optional=True), "newest checkpoints kept",
                                          group="system")
    max_nonfinite_steps: int = option(3, Integer(low=1), "an optimizer step with a non-finite loss or gradient "
                                      "norm is skipped (no update, logged as skipped); stop with an error after N "
                                      "such steps in a row", metavar="N", group="system")
    eval_data: str | None = option(None, Text(optional=True), "held-out data: log eval_pos_logp (mean log-prob of "
                                   "answers)", group="system")
    eval_every: int | None = option(None, Integer(low=1, optional=True), "held-out log-prob every N steps "
                                    "(unset: at the last step only; needs --eval-data)", group="system")
    resume: str | None = option(None, Text(optional=True), "continue from the newest intact checkpoint in --out "
                                "(or the given checkpoint directory)", nargs="?", const="auto", group="system")
    stop_after: int | None = option(None, Integer(low=1, optional=True), "checkpoint and exit after this step (the "
                                    "schedule still spans --max-steps); continue later with --resume, e.g. to fit "
                                    "job time limits", metavar="STEP", group="system")
    plot: bool = option(True, Flag(), "skip curves.png", flag="--no-plot", group="system")
    progress: bool = progress_option()

    def __post_init__(self):
        validate(self)
        if self.eval_every is not None and self.eval_data is None:
            raise ValueError("eval_every (--eval-every) needs eval_data (--eval-data): there is nothing to evaluate")
        self._check_negative_selection()
        sampling = self.on_policy
        policy = self.objective.spec.family == "policy"
        if sampling is None:
            if policy:
                raise ValueError(f"loss={self.objective.loss!r} (--loss) is an on-policy RL loss: it needs the "
                                 f"sampler's per-token log-probs, so pass on_policy=True (--on-policy) and a reward "
                                 f"(--reward); offline, loss must be one of {LOSS_NAMES}")
            return
        if self.overlong == "drop":
            raise ValueError("overlong='drop' (--overlong drop) is not supported with on_policy: sampled rows cannot "
                             "be dropped without changing the group size; use 'truncate' (the default), which "
                             "counts and reports every cut row")
        if self.objective.loss not in ON_POLICY_LOSSES:
            raise ValueError(f"on_policy supports the losses {ON_POLICY_LOSSES}, not {self.objective.loss!r}")
        spec = self.objective.spec
        if spec.family in ("group", "policy") and sampling.samples_per_prompt < spec.min_rows_per_group:
            raise ValueError(f"loss {spec.name!r} needs at least {spec.min_rows_per_group} samples per prompt, "
                             f"got samples_per_prompt={sampling.samples_per_prompt} (--samples-per-prompt)")
        resolve_reward(sampling.reward, what="reward (--reward)")  # unknown names fail here, not after loading
        resolve_engine(sampling.sample_engine)  # --sample-engine vllm without vLLM fails here, not after loading
        if sampling.reference != "sampler" and not spec.needs_ref_logps:
            kl = " (the policy losses' KL reference, --kl-beta, is always the initial model)" if policy else ""
            raise ValueError(f"on_policy_reference={sampling.reference!r} (--on-policy-reference) chooses the "
                             f"reference log-probs of the losses that take one (dft, dpo, ipo, hinge); "
                             f"loss={spec.name!r} takes none{kl}")
        if sampling.ppo_epochs > 1 and not policy:
            raise ValueError(f"ppo_epochs={sampling.ppo_epochs} (--ppo-epochs) reuses each window of samples; only "
                             f"the policy losses {POLICY_LOSS_NAMES} correct for that (importance ratio to the "
                             f"sampler), not loss={spec.name!r}")
        if policy and sampling.offline_mix > 0:
            raise ValueError(f"offline_mix={sampling.offline_mix} (--offline-mix) is not supported with the policy "
                             f"loss {spec.name!r}: the offline negatives have no sampler per-token log-probs for "
                             f"its importance ratio")
        if sampling.offline_mix > 0:
            if not self.negatives:
                raise ValueError(f"offline_mix={sampling.offline_mix} (--offline-mix) takes part of every batch from "
                                 f"the offline negatives, but there is no offline source: pass negatives "
                                 f"(--negatives, the generate stage's output)")
            sampling.offline_per_batch(self.optim.batch_size)
        elif self.negatives or self.ref_logps:
            raise ValueError("on_policy samples its own negatives and uses the sampler's log-probs as the "
                             "reference: drop negatives/ref_logps (--negatives/--ref-logps), or set "
                             "offline_mix (--offline-mix) > 0 to mix them in")

    @property
    def selects_negatives(self) -> bool:
        """Whether the offline negatives are chosen from each prompt's pool (rotation and/or filter)."""
        return self.rotate_negatives or self.filter_negatives

    def _check_negative_selection(self) -> None:
        chosen = [f"{name}=True (--{name.replace('_', '-')})" for name in ("rotate_negatives", "filter_negatives")
                  if getattr(self, name)]
        if not chosen:
            if self.correct_threshold is not None:
                raise ValueError(f"correct_threshold={self.correct_threshold} (--correct-threshold) is only used "
                                 f"with rotate_negatives or filter_negatives (--rotate-negatives, --filter-negatives)")
            return
        what = " and ".join(chosen)
        if self.on_policy is not None:
            raise ValueError(f"{what} selects the offline negatives of offline training; with on_policy the "
                             f"negatives are fresh samples (and --offline-mix takes the first ones)")
        if not self.objective.spec.needs_negatives:
            raise ValueError(f"{what}: loss={self.objective.loss!r} (--loss) trains on the good answers only, it "
                             f"takes no negatives")
        if self.num_negatives is None:
            raise ValueError(f"{what} needs num_negatives (--num-negatives K): how many of each prompt's pool of M "
                             f"samples a step trains on (the paper: K=2 of 12-16)")

    def objective_config(self) -> ObjectiveConfig:
        """The loss settings (same as ``self.objective``; kept for older callers)."""
        return self.objective

    def on_policy_config(self) -> OnPolicyConfig | None:
        """The sampling settings (same as ``self.on_policy``; kept for older callers)."""
        return self.on_policy


@dataclass
class TrainResult:
    run_dir: Path
    final_checkpoint: Path
    steps: int
    last_metrics: dict = field(default_factory=dict)


class NonFiniteLossError(RuntimeError):
    """Training stopped: too many optimizer steps in a row had a non-finite loss or gradient norm."""


def warmup_cosine(total_steps: int, warmup_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup from ~0 to 1 over ``warmup_steps``, then cosine down to ``min_lr_ratio``."""
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return multiplier


def _param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases, or other 1-D parameters)."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _optimizer_order(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters in the order the optimizer's state dict numbers them."""
    return [p for group in _param_groups(module, 0.0) for p in group["params"]]


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _with_finite_values(record: dict) -> dict:
    """``record`` with every non-finite float replaced by None and listed under ``"nonfinite"`` (strict JSON)."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return record
    return {**{k: None if k in bad else v for k, v in record.items()}, "nonfinite": bad}


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl`` (main process only); on resume drops lines past the checkpoint."""

    def __init__(self, path: Path, *, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines(keepends=True)
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(kept))
        elif enabled and resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


def _attach_reference(examples: list[TrainExample], path: Path) -> None:
    """The cache made for exactly these rows, or else a pool cache that scored all of them (e.g. every
    sample of the pool, when training takes K of them): looked up by row content (:class:`RefLogpsPool`)."""
    try:
        attach_ref_logps(examples, path)
    except DataError:
        raise
    except ValueError as err:  # other rows: maybe a superset of these
        try:
            RefLogpsPool(path).attach(examples)
        except (DataError, ValueError) as pool_err:
            raise ValueError(f"{err}; nor can it serve as a pool cache: {pool_err}") from None


def _find_reference(cfg: TrainConfig, examples: list[TrainExample], *, loss: str, pooled: bool,
                    pool: Callable[[], list[TrainExample]]) -> None:
    """Attach the reference log-probs of ``examples`` from the ``ref-logps`` cache.

    ``--ref-logps FILE``: that file (:func:`_attach_reference`). Otherwise, in ``--ref-logps DIR`` or
    next to ``--negatives``: the cache named by the fingerprint of exactly these rows, else -- when
    ``--num-negatives K`` takes the first K of each prompt's samples -- the whole-pool cache (``ref-logps``
    without ``--num-negatives``) of the same data, negatives, tokenization and ``--max-length``:
    ``pool()`` rebuilds the whole-pool examples, whose fingerprint names that file and is checked against
    the file's own (:func:`~.ref_logps.read_ref_logps`) before any row is looked up in it by content.
    A cache for other rows is never used: the error says which files were looked for.
    """
    location = Path(cfg.ref_logps) if cfg.ref_logps else Path(cfg.negatives).parent
    if not location.is_dir():
        if not location.exists():
            raise FileNotFoundError(f"loss {loss!r} needs reference log-probs, but {location} (ref_logps, "
                                    f"--ref-logps) does not exist: {_ref_logps_hint(cfg, pooled)}")
        _attach_reference(examples, location)
        return
    path = cache_path(location, examples_fingerprint(examples))
    if path.exists():
        _attach_reference(examples, path)
        return
    looked = [str(path)]
    if not pooled and cfg.num_negatives is not None:  # the first K: a whole-pool cache scored them too
        pool_examples = pool()
        pool_path = cache_path(location, examples_fingerprint(pool_examples))
        if pool_path != path:
            if pool_path.exists():
                read_ref_logps(pool_path, pool_examples)  # the pool these rows come from, or an error naming it
                RefLogpsPool(pool_path).attach(examples)
                return
            looked.append(f"{pool_path} (the whole pool)")
    raise FileNotFoundError(f"loss {loss!r} needs reference log-probs, but no cache for these rows exists: looked "
                            f"for {' and '.join(looked)}; {_ref_logps_hint(cfg, pooled)}")


def _ref_logps_hint(cfg: TrainConfig, pooled: bool) -> str:
    """What to run to make the reference cache the trainer looks for."""
    how = ("without --num-negatives (the whole pool: --rotate-negatives/--filter-negatives draw from all of it)"
           if pooled else "without --num-negatives (the whole pool, scored once, serves any --num-negatives and "
           "--rotate-negatives) or with the same --num-negatives")
    return (f"run `python -m dftkern.train ref-logps --model REF --data {cfg.data} --negatives {cfg.negatives}` "
            f"first ({how}, and the same --max-length), or name its file with --ref-logps")


def load_training_examples(cfg: TrainConfig, tokenizer, objective: Objective, *, vocab_size: int | None = None,
                           report: OverlongReport | None = None) -> list[TrainExample]:
    """Tokenized examples with negatives, reference log-probs and rewards as the loss needs them.

    ``vocab_size``: the model's; token ids outside ``[0, vocab_size)`` are a :class:`DataError`.
    ``report`` counts the rows longer than ``cfg.max_length`` (see :func:`build_examples`).
    With ``rotate_negatives`` / ``filter_negatives`` the examples hold every prompt's whole pool
    (what a step trains on is cut from them by :class:`~.onpolicy.NegativeSchedule`).
    """
    return _load_offline(cfg, tokenizer, objective, vocab_size=vocab_size, report=report)[0]


def _load_offline(cfg: TrainConfig, tokenizer, objective: Objective, *, vocab_size: int | None,
                  report: OverlongReport | None) -> tuple[list[TrainExample], NegativeSchedule | None, dict | None]:
    """:func:`load_training_examples`, the :class:`~.onpolicy.NegativeSchedule` of ``rotate_negatives``
    / ``filter_negatives`` (else None) and then the pool's :func:`~.records.pool_stats` (else None)."""
    spec, loss = objective.spec, objective.spec.name
    if spec.needs_negatives and not cfg.negatives:
        raise ValueError(f"loss {loss!r} needs sampled negatives: pass --negatives (the generate stage's output)")
    records = read_prompt_records(cfg.data)
    samples = read_sample_records(cfg.negatives, vocab_size=vocab_size) if spec.needs_negatives else None
    pooled = cfg.selects_negatives  # the whole pool; each step takes K of it
    examples = build_examples(tokenizer, records, samples, num_negatives=None if pooled else cfg.num_negatives,
                              max_length=cfg.max_length, use_chat_template=cfg.model.use_chat_template,
                              overlong=cfg.overlong, vocab_size=vocab_size, report=report)
    if spec.needs_ref_logps:
        _find_reference(cfg, examples, loss=loss, pooled=pooled, pool=lambda: build_examples(
            tokenizer, records, samples, num_negatives=None, max_length=cfg.max_length,
            use_chat_template=cfg.model.use_chat_template, overlong=cfg.overlong, vocab_size=vocab_size,
            report=OverlongReport()))
    if spec.needs_rewards and any(e.rewards is None for e in examples):
        raise ValueError(f"loss {loss!r} needs rewards: generate the negatives with --reward module:function")
    if not pooled:
        return examples, None, None
    kept = {e.prompt_id for e in examples}  # --overlong drop may have skipped some
    records = [r for r in records if r.prompt_id in kept]
    schedule = NegativeSchedule.build(examples, records, samples, k=cfg.num_negatives, rotate=cfg.rotate_negatives,
                                      filtered=cfg.filter_negatives, correct_threshold=cfg.correct_threshold)
    return examples, schedule, pool_stats(records, samples, correct_threshold=cfg.correct_threshold)


def _negatives_line(cfg: TrainConfig, schedule: NegativeSchedule, stats: dict) -> str:
    """One line for the user: the pool, what a step takes of it, and what the filter drops."""
    pool = len(schedule.equal[0]) if len({len(e) for e in schedule.equal}) == 1 else "M"
    how = ("rotating each epoch (epoch e: candidates (e*K + j) mod n)" if cfg.rotate_negatives
           else "the same ones every epoch")
    text = (f"negatives: K={schedule.k} of a pool of {pool} per prompt, {how}; "
            f"{stats['frac_equal_positive']:.1%} of the pool equal the good answer")
    if "frac_correct" in stats:
        text += f", {stats['frac_correct']:.1%} are correct ({stats['correct_rule']})"
    elif cfg.filter_negatives:
        text += "; no rewards (generate without --reward): only the equality filter applies"
    if cfg.filter_negatives:
        dropped = stats.get("frac_filtered", stats["frac_equal_positive"])
        text += (f"; --filter-negatives drops {dropped:.1%} of the pool, {schedule.unfilterable} of "
                 f"{len(schedule.candidates)} prompts have nothing left and keep their whole pool")
    small = sum(len(c) < schedule.k for c in schedule.candidates)
    if small:
        text += f"; {small} prompts have fewer than K candidates (an epoch repeats some)"
    return text


def _reference_scorer(cfg: TrainConfig, ctx: DistContext, *, packed: bool, autocast_dtype, pad_token_id: int
                      ) -> RowScorer:
    """Log-probs of the *initial* model (``cfg.model.path``): per token, the KL reference of the policy
    losses; per row (sequence), the reference of dft/dpo/ipo/hinge with ``--on-policy-reference initial``.

    A frozen float32 copy (eval mode, no gradients), loaded once, scores each new window of samples;
    under FSDP2 every rank keeps a whole copy on its device (not sharded: fine for models that fit
    twice; it is never trained, so its memory is the weights alone). On resume it is loaded from
    ``cfg.model.path`` again, not from the checkpoint, so it stays the initial model.
    """
    m = cfg.model
    reference = load_causal_lm(m.path, attn=m.attn, device=ctx.device, dtype=torch.float32,
                               trust_remote_code=m.trust_remote_code).eval().requires_grad_(False)
    wrapper = PolicyWithLoss(reference, token_logps_rows, autocast_dtype=autocast_dtype)
    return RowScorer(wrapper, pad_token_id=pad_token_id, device=ctx.device,
                     batch_size=cfg.on_policy.generation_batch_size, packed=packed)


def _rows_per_example(cfg: TrainConfig, objective: Objective, offline: OfflineExamples | None) -> int:
    """Rows of every training example: what the prompt-shared layout would share one prompt between."""
    if cfg.on_policy is not None:
        return len(offline_layout(objective.spec.family, cfg.on_policy.samples_per_prompt))
    if objective.rows is not None:
        return len(objective.rows)
    return offline.rows_per_example


def _share_prompt(cfg: TrainConfig, causal_lm, rows_per_example: int) -> tuple[bool, str]:
    """Whether the training batches use the prompt-shared layout, and why (``share_prompt`` None = automatic).

    Automatic: on when an example has several rows, the attention kernel takes a custom mask (no
    sliding window that a row of ``max_length`` could exceed, no FlexAttention backward on CPU) and
    :func:`~.prefix_sharing.prepare_shared_prompt_model`'s probe proves the model exact; otherwise
    off, with the reason. ``share_prompt=True`` shares even one-row examples, leaves the sliding
    window to the per-batch check of the forward, and raises
    :class:`~.prefix_sharing.SharedPromptUnsupported` (a ValueError naming the cause) instead of
    turning itself off.
    """
    if cfg.share_prompt is False:
        return False, "off (--no-share-prompt)"
    if cfg.share_prompt is None:
        if rows_per_example < 2:
            return False, "off (one row per prompt: nothing to share)"
        impl = causal_lm.config._attn_implementation
        if impl not in SHARED_PROMPT_ATTENTION:
            return False, f"off: attention {impl!r} takes no custom mask (needs one of {SHARED_PROMPT_ATTENTION})"
    # static checks first (no probe forward for a kernel that cannot train the layout, e.g. FlexAttention on CPU);
    # automatic: rows up to max_length must fit a sliding window; explicit: checked per batch in the forward
    longest = SimpleNamespace(max_row_length=cfg.max_length or sys.maxsize) if cfg.share_prompt is None else None
    try:
        check_attention_support(causal_lm, longest)
        kernel = prepare_shared_prompt_model(causal_lm)
    except SharedPromptUnsupported as err:
        if cfg.share_prompt:
            raise SharedPromptUnsupported(f"share_prompt=True (--share-prompt): {err}") from err
        return False, f"off: {err}"
    return True, f"on ({kernel})"


@torch.no_grad()
def _heldout_pos_logp(wrapper, examples, ctx: DistContext, *, batch_size: int, pad_token_id: int,
                      packed: bool) -> float:
    """Mean sequence log-prob of the good answers of held-out examples (sharded over ranks)."""
    total, count = 0.0, 0
    local = examples[ctx.rank::ctx.world_size]
    was_training = wrapper.training
    wrapper.eval()
    steps = math.ceil(len(examples) / ctx.world_size / batch_size)  # same number of forwards on every rank
    for i in range(steps):
        chunk = local[i * batch_size:(i + 1) * batch_size] or examples[:1]  # keep collectives in step
        batch = collate(chunk, pad_token_id=pad_token_id, packed=packed, rows=[0]).to(ctx.device)
        scores = wrapper(batch, loss_fn=score_rows)
        if local[i * batch_size:(i + 1) * batch_size]:
            total += float(scores.sum())
            count += len(chunk)
    wrapper.train(was_training)
    return ctx.sum(total) / max(1.0, ctx.sum(count))


def train(cfg: TrainConfig, *, on_step_end: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run the train stage. ``on_step_end(step, metrics)`` is called after every optimizer step
    (after any checkpoint of that step), e.g. to stop early or to log elsewhere."""
    ctx = init_distributed(cfg.model.device)
    try:
        with contextlib.ExitStack() as resources:  # e.g. the vLLM engine of --sample-engine vllm
            return _train(cfg, ctx, on_step_end, resources)
    finally:
        ctx.shutdown()


def _vllm_policy_sampler(cfg: TrainConfig, ctx: DistContext, resources: contextlib.ExitStack, scorer: RowScorer,
                         causal_lm, tokenizer, autocast_dtype):
    """``--sample-engine vllm``: rollouts from a vLLM engine colocated in this process (docs/vllm.md).

    Only the decoding moves to vLLM: every row is still scored by ``scorer`` (the training
    wrapper's forward), so the policy losses' ``old_logps`` and the online losses' sequence
    log-probs are the trainer's own numbers at the training logit transform, never vLLM's."""
    if ctx.distributed:
        raise ValueError("sample_engine='vllm' (--sample-engine vllm) runs one colocated engine in a single "
                         "process; under torchrun use --sample-engine hf")
    from .vllm_engine import VLLMPolicySampler, VLLMSampler

    memory = cfg.on_policy.vllm_gpu_memory_utilization
    engine = resources.enter_context(VLLMSampler(
        cfg.model.path, dtype=autocast_dtype or torch.float32, seed=cfg.optim.seed,
        trust_remote_code=cfg.model.trust_remote_code,
        gpu_memory_utilization=memory if memory is not None else (0.3 if ctx.device.type == "cuda" else None)))
    return VLLMPolicySampler(engine, scorer, causal_lm, tokenizer, sampling=cfg.on_policy.sampling,
                             eos_ids=engine.eos_token_ids(tokenizer))


def _train(cfg: TrainConfig, ctx: DistContext, on_step_end, resources: contextlib.ExitStack) -> TrainResult:
    run_dir, device, optim = Path(cfg.out), ctx.device, cfg.optim
    settings = flat_values(cfg)
    if cfg.model.attn == "flex_attention" and device.type != "cuda" and cfg.share_prompt is not True:
        # (with --share-prompt the prefix-sharing probe reports the same, as SharedPromptUnsupported)
        raise ValueError(f"--attn flex_attention: FlexAttention has no backward on {device.type} in torch "
                         f"{torch.__version__}, so it cannot train here; use --attn auto, sdpa or eager")
    earlier = checkpoint_candidates(run_dir) if cfg.resume is None else []
    if earlier:
        # a fresh run here would mix its checkpoints with the earlier run's (pruning keeps the highest step
        # numbers, and a later --resume would load the other run's weights)
        raise ValueError(f"--out {run_dir} already holds checkpoints of an earlier run (newest {earlier[0].name}): "
                         f"pass --resume to continue it, or choose a new --out")
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir)  # .tmp-*/.old-* left by a save that was killed
    ctx.barrier()

    # -- model (from the newest intact checkpoint when resuming) ---------------------------------
    def load(path: str, strict: bool = True):
        # under FSDP2 every rank loads on CPU, shards, then moves only its shard to the device
        m = cfg.model
        attn = "sdpa" if cfg.share_prompt and m.attn == "auto" else m.attn  # the shared layout needs a custom mask
        causal_lm = load_causal_lm(path, attn=attn, device="cpu" if ctx.distributed else device,
                                   attn_device=device, dtype=torch.float32, trust_remote_code=m.trust_remote_code,
                                   strict=strict)
        return load_tokenizer(path, trust_remote_code=m.trust_remote_code), causal_lm

    resume = load_resume_point(cfg.resume, run_dir, ctx, settings=settings, load=load, param_order=_optimizer_order)
    torch.manual_seed(optim.seed)
    tokenizer, causal_lm = (resume.tokenizer, resume.causal_lm) if resume else load(cfg.model.path, strict=False)
    autocast_dtype = None
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"
                                   and torch.cuda.is_bf16_supported()):
        autocast_dtype = torch.bfloat16
    packed = use_packing(cfg.packing, causal_lm.config._attn_implementation)
    if cfg.gradient_checkpointing:
        if hasattr(causal_lm, "activation_checkpointing_enable"):  # transformers >= 5.x name
            causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    causal_lm.train()

    # -- data ------------------------------------------------------------------------------------
    family = cfg.objective.spec.family
    objective = Objective(cfg.objective, positive_first=not (cfg.on_policy and family in ("group", "policy")),
                          max_tokens=cfg.on_policy.max_new_tokens if cfg.on_policy else None)
    vocab = vocab_size(causal_lm)
    overlong = OverlongReport()
    offline = None  # the offline training set (with on-policy sampling only for the offline mix)
    examples, schedule, pool = None, None, None
    if cfg.on_policy is None or cfg.on_policy.offline_mix > 0:
        examples, schedule, pool = _load_offline(cfg, tokenizer, objective, vocab_size=vocab, report=overlong)
    records = read_prompt_records(cfg.data) if cfg.on_policy else None
    num_examples = len(records) if records is not None else len(examples)
    order = ExampleOrder(num_examples, optim.batch_size, seed=optim.seed, rank=ctx.rank, world_size=ctx.world_size,
                         shuffle=optim.shuffle)
    if examples is not None:
        offline = OfflineExamples(examples, negatives=schedule, order=order, grad_accum=optim.grad_accum)
        if schedule is not None and ctx.is_main:
            note(_negatives_line(cfg, schedule, pool))
    heldout = None
    if cfg.eval_data:
        heldout = build_examples(tokenizer, read_prompt_records(cfg.eval_data), max_length=cfg.max_length,
                                 use_chat_template=cfg.model.use_chat_template, overlong=cfg.overlong,
                                 vocab_size=vocab, report=overlong)
    if ctx.is_main:
        note(overlong.message("train"))
    state = dftkern.DFTState(num_examples, init=cfg.objective.dft_u_init).to(device) if family == "dft" else None

    # -- prompt sharing (before FSDP sharding: the probe runs on the whole model) ------------------
    share, share_reason = _share_prompt(cfg, causal_lm, _rows_per_example(cfg, objective, offline))
    share = ctx.all_true(share)
    if ctx.is_main and share_reason.startswith("off:"):  # automatic, and the model or kernel cannot share
        note(f"--share-prompt {share_reason}")

    # -- model wrapper, optimizer, schedule, example source ------------------------------------------
    wrapper = PolicyWithLoss(causal_lm, objective, autocast_dtype=autocast_dtype)
    if ctx.distributed:
        shard_model(wrapper, causal_lm)
        wrapper.to(device)
    optimizer = torch.optim.AdamW(_param_groups(wrapper, optim.weight_decay), lr=optim.lr,
                                  betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps)
    ppo_epochs = cfg.on_policy.ppo_epochs if cfg.on_policy else 1  # every sampled window is trained on E times
    total_steps = optim.max_steps or ppo_epochs * max(1, math.ceil(optim.epochs * order.batches_per_epoch
                                                                   / optim.grad_accum))
    warmup = optim.warmup_steps if optim.warmup_steps is not None else round(optim.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup, optim.min_lr_ratio))
    source: ExampleSource = offline
    if cfg.on_policy:
        sampler = PolicySampler(wrapper, causal_lm, tokenizer, ctx, sampling=cfg.on_policy.sampling,
                                batch_size=cfg.on_policy.generation_batch_size, packed=packed)
        if resolve_engine(cfg.on_policy.sample_engine) == "vllm":
            sampler = _vllm_policy_sampler(cfg, ctx, resources, sampler.scorer, causal_lm, tokenizer,
                                           autocast_dtype)
        prompts = PromptSet.encode(tokenizer, records, use_chat_template=cfg.model.use_chat_template,
                                   max_length=cfg.max_length)
        initial = objective.uses_reference or (objective.spec.needs_ref_logps
                                               and cfg.on_policy.reference == "initial")
        reference = _reference_scorer(cfg, ctx, packed=packed, autocast_dtype=autocast_dtype,
                                      pad_token_id=tokenizer.pad_token_id) if initial else None
        source = OnPolicyExamples(cfg.on_policy, prompts, sampler, order, family=family,
                                  needs_ref_logps=objective.spec.needs_ref_logps, grad_accum=optim.grad_accum,
                                  total_steps=total_steps, seed=optim.seed, offline=offline, reference=reference)

    # -- resume ------------------------------------------------------------------------------------
    step, micro_batch, nonfinite_run = 0, 0, 0
    if resume:
        saved = resume.state
        if saved.get("num_examples", num_examples) != num_examples:
            raise ValueError(f"{resume.checkpoint} was written for {saved['num_examples']} training examples, the "
                             f"data now gives {num_examples}; resume with the same data, or train into a new --out")
        load_optimizer_state(wrapper, optimizer, saved["optimizer"], ctx)
        scheduler.load_state_dict(saved["scheduler"])
        if state is not None:
            state.load_state_dict(saved["dft_state"])
        restore_rng_state(saved["rng"][ctx.rank], source=resume.checkpoint)
        source.load_state_dict(saved["source"][ctx.rank])
        step, micro_batch = saved["step"], saved["micro_batch"]
        nonfinite_run = int(saved.get("nonfinite_run", 0))
        if cfg.stop_after is not None and cfg.stop_after <= step:
            raise ValueError(f"--stop-after {cfg.stop_after} is at or before the step of the checkpoint resumed from "
                             f"({step}, {resume.checkpoint}): nothing to train; pass a later step")
    if ctx.is_main:
        atomic_write_json(run_dir / "train_config.json",
                          dict(settings, world_size=ctx.world_size, packed=packed,
                               share_prompt_active=share, share_prompt_reason=share_reason,
                               attn_kernel=causal_lm.config._attn_implementation, total_steps=total_steps,
                               num_examples=num_examples, negatives_pool=pool,
                               dftkern_version=getattr(dftkern, "__version__", None)))
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=ctx.is_main, resume_step=step if resume else None)

    def save(at_step: int) -> Path:
        model_state = full_model_state_dict(wrapper, ctx)
        optim_state = full_optimizer_state_dict(wrapper, optimizer, ctx)
        rng_states = gather_objects(capture_rng_state(), ctx)
        source_states = gather_objects(source.state_dict(), ctx)
        path = None
        if ctx.is_main:
            trainer_state = {"step": at_step, "micro_batch": micro_batch, "nonfinite_run": nonfinite_run,
                             "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rng_states,
                             "source": source_states, "world_size": ctx.world_size, "num_examples": num_examples,
                             "dft_state": state.state_dict() if state is not None else None, "config": settings}
            path = write_checkpoint(run_dir, at_step, causal_lm=causal_lm, model_state=model_state,
                                    tokenizer=tokenizer, trainer_state=trainer_state, keep_last=cfg.keep_checkpoints)
        ctx.barrier()
        return path or latest_checkpoint(run_dir)

    # -- the loop ----------------------------------------------------------------------------------
    collate_kwargs = dict(pad_token_id=tokenizer.pad_token_id, rows=objective.rows,
                          with_ref_logps=objective.spec.needs_ref_logps, with_rewards=objective.spec.needs_rewards)
    token_values = dict(old_logps=family == "policy", ref_token_logps=objective.uses_reference)

    def make_batch(examples: list[TrainExample]):
        """A micro-batch on the device: prompt-shared (one sequence per group), or padded/packed rows."""
        if share:
            attn = causal_lm.config._attn_implementation
            batch = collate_shared(examples, pack_groups=attn == "flex_attention", **collate_kwargs)
            attach_token_values(batch.loss_batch, examples, objective.rows, **token_values)
            return batch.to(device)
        return collate(examples, packed=packed, with_old_logps=token_values["old_logps"],
                       with_ref_token_logps=token_values["ref_token_logps"], **collate_kwargs).to(device)
    bar = tqdm(total=total_steps, initial=step, desc=f"train {cfg.objective.loss}", unit="step",
               disable=not (cfg.progress and ctx.is_main))
    last_metrics: dict = {}
    final_checkpoint = resume.checkpoint if resume else None
    while step < total_steps:
        started = time.perf_counter()
        # the step's data micro-batches: step * grad_accum ... (with --ppo-epochs a window's are visited E times)
        micro_batch = cfg.on_policy.first_micro_batch(step, optim.grad_accum) if cfg.on_policy \
            else step * optim.grad_accum
        sampling_stats = source.before_step(step, micro_batch)  # on-policy: fresh samples when a window starts
        losses, step_stats, tokens = [], {}, 0
        for _ in range(optim.grad_accum):
            batch = make_batch(source.examples(order.batch(micro_batch)))
            micro_batch += 1
            loss, stats = wrapper(batch, state=state)
            (loss / optim.grad_accum).backward()
            losses.append(loss.detach())
            for key, value in stats.items():
                step_stats.setdefault(key, []).append(value.detach().float())
            tokens += batch.num_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(wrapper.parameters(), optim.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        # a non-finite loss or gradient on any process: skip the update (weights and moments unchanged)
        finite = ctx.all_true(bool(torch.isfinite(torch.stack(losses)).all()) and math.isfinite(grad_norm))
        lr = scheduler.get_last_lr()[0]
        if finite:
            optimizer.step()
            scheduler.step()
            nonfinite_run = 0
        else:
            nonfinite_run += 1
            with warnings.catch_warnings():  # torch warns when the very first optimizer step was skipped
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - started

        local = {"loss": torch.stack(losses).mean(), **sampling_stats}
        local.update({k: torch.stack(v).max() if k.endswith("_max") else torch.stack(v).mean()
                      for k, v in step_stats.items()})
        record = {"step": step, **ctx.reduce(local), "lr": lr, "grad_norm": grad_norm,
                  "epoch": micro_batch / order.batches_per_epoch,
                  "tokens_per_s": ctx.sum(tokens) / elapsed, "peak_mem_mb": _peak_memory_mb(device)}
        if not finite:
            record["skipped"] = True
        if heldout is not None and (step == total_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            record["eval_pos_logp"] = _heldout_pos_logp(wrapper, heldout, ctx, batch_size=optim.batch_size,
                                                        pad_token_id=tokenizer.pad_token_id, packed=packed)
        record = _with_finite_values(record)
        if step % cfg.log_every == 0 or step == total_steps or "eval_pos_logp" in record or not finite:
            log.write(record)
        bar.set_postfix(loss="skipped" if record["loss"] is None else f"{record['loss']:.4f}", lr=f"{lr:.2e}")
        bar.update(1)
        last_metrics = record
        if nonfinite_run >= cfg.max_nonfinite_steps:
            bar.close()
            raise NonFiniteLossError(
                f"train: {nonfinite_run} optimizer step(s) in a row ({step - nonfinite_run + 1}-{step}) had a "
                f"non-finite loss or gradient norm and were skipped (--max-nonfinite-steps {cfg.max_nonfinite_steps}); "
                f"stopping. The weights were not updated by them; metrics.jsonl marks them 'skipped'. Look for "
                f"bad data or reference log-probs, lower --lr, or resume from the newest checkpoint")
        stopping = cfg.stop_after is not None and step >= cfg.stop_after
        if step == total_steps or stopping or (cfg.save_every and step % cfg.save_every == 0):
            final_checkpoint = save(step)
        if on_step_end is not None:
            on_step_end(step, record)
        if stopping:
            break
    bar.close()
    if ctx.is_main and isinstance(source, OnPolicyExamples):
        note(source.overlong.message("train (on-policy samples)"))
    if final_checkpoint is None:  # nothing left to do (resumed at the end): keep the checkpoint we have
        final_checkpoint = latest_checkpoint(run_dir)
    if ctx.is_main and cfg.plot and (run_dir / "metrics.jsonl").exists():
        from .plotting import plot_metrics

        plot_metrics(run_dir / "metrics.jsonl", run_dir / "curves.png",
                     title=f"{run_dir.name} (loss {cfg.objective.loss})")
    return TrainResult(run_dir, Path(final_checkpoint), step, last_metrics)
