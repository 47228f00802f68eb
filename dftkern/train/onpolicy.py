"""Where the trainer's examples come from: a fixed offline set, or fresh samples from the policy.

``train --on-policy --reward NAME``: every ``refresh_every`` optimizer steps, the
prompts of the next ``refresh_every`` steps get ``n = samples_per_prompt`` fresh responses sampled
from the *current* policy, scored by ``reward(prompt, response, reference) -> float`` (a built-in
name or ``module:function``, see :mod:`.rewards`). The
reference log-probs that DFT/DPO/IPO/hinge need are the sampling policy's own (computed right
after sampling, with the same weights), so no reference model is ever loaded. Per loss:

==============================  ================================================================
loss                            rows of one example
==============================  ================================================================
ppo, grpo, dapo, dr_grpo        the n samples, with their rewards, the sampler's per-token
                                log-probs (``old_token_logps``) and, with ``kl_beta > 0``, the
                                initial model's (``ref_token_logps``)
reinforce, rloo, rwr            the n samples, with their rewards (plain policy gradient)
dft, dft2                       the good answer from the data, then the n samples as negatives
dpo, ipo, hinge, simpo,         one pair: chosen = the data's answer, unless a sample has a strictly
unlikelihood                    higher reward (then the best sample); rejected = the lowest-reward
                                sample (online DPO)
==============================  ================================================================

**Policy losses** (token level, importance ratios). Right after sampling, each sample's per-token
log-probs are recorded by a forward of the same weights through the training wrapper in eval mode,
at the *training* logit transform (temperature 1, the model's soft-cap): ``old_logps``, the
ratio's denominator ``pi_old(y_t | x, y_<t)``. Sampling itself may use ``--sample-temperature``
and top-k/top-p, so the samples come from a sharpened or flattened ``pi_old``; the ratio corrects
for the policy moving between sampling and update (``--refresh-every``, ``--grad-accum``,
``--ppo-epochs``), not for the sampling temperature (as TRL's GRPO does when the loss is given no
temperature). With one update per fresh window (``--ppo-epochs 1 --refresh-every 1
--grad-accum 1``) the ratio is 1 up to float rounding. With ``kl_beta > 0`` a frozen copy of the
*initial* model (``--model``, loaded once; on every rank under FSDP2, not sharded) scores each new
window the same way: ``ref_token_logps``, the KL's reference. Both are kept in the window and
saved with it.

``--ppo-epochs E``: each window (the samples of ``--refresh-every W`` steps' prompts) is trained on
``E`` times: steps ``s .. s + W*E - 1`` visit the window's ``W * grad_accum`` micro-batches ``E``
times over, in the same order (:meth:`OnPolicyConfig.first_micro_batch`), with the
``old_logps`` fixed at sampling time, so the ratio moves away from 1 in the later passes.

Sample j of prompt p at step s uses a generator seeded from ``(seed, s, p, j)``; the current window
of samples is saved in checkpoints, so resuming stays bit-exact. Under FSDP2 every rank samples its
own prompts through the sharded wrapper, in lockstep (same number of forward calls on every rank).

``offline_mix = f > 0`` (``--offline-mix``): in every micro-batch of ``B`` examples, ``floor(f * B)``
positions (chosen by a generator seeded from ``(seed, micro-batch number)``, the same on every rank)
take the example from the offline negatives (the ``--negatives`` file, as in offline training) and
only the other positions are sampled fresh. Offline examples are cut to the on-policy layout:
dft/dft2 the good answer then the first n negatives (cached reference log-probs), group losses the
first n negatives with the rewards stored by ``generate --reward``, pairwise losses the pair (good
answer, first negative).

The pieces, each usable on its own (the length study reuses the rules):

* :class:`ExampleSource` — the protocol the training loop uses; :class:`OfflineExamples` and
  :class:`OnPolicyExamples` implement it;
* :class:`Sampler` — the protocol for "sample responses from the current policy and score rows
  with it"; :class:`PolicySampler` implements it through the (possibly FSDP-sharded) training
  wrapper; :class:`RowScorer` scores rows (sequence or per-token log-probs) through any wrapper
  (the policy's, or the frozen reference's);
* :func:`online_pair` (the online-DPO pair rule), :func:`on_policy_example` (the rows of one
  example per loss family) and :func:`offline_layout` (which rows of an offline example match the
  on-policy layout) — plain functions, no model involved.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from .batching import (
    ExampleOrder,
    OverlongReport,
    TrainExample,
    collate,
    encode_prompt,
    encode_response,
    has_chat_template,
    make_row,
)
from .distributed import DistContext
from .generate import SamplingConfig, decode, eos_token_ids
from .model import score_rows, token_logps_rows
from .objectives import LOSS_SPECS, POLICY_LOSS_SPECS
from .options import Function, Integer, Number, option, validate
from .records import PromptRecord
from .rewards import RewardFn, resolve_reward
from .util import derive_seed

__all__ = ["ON_POLICY_FAMILIES", "ON_POLICY_LOSSES", "OnPolicyConfig", "ExampleSource", "Sampler", "Sample",
           "RowScorer", "PolicySampler", "PromptSet", "online_pair", "on_policy_example", "offline_layout",
           "OfflineExamples", "OnPolicyExamples"]

ON_POLICY_FAMILIES = ("group", "dft", "pairwise", "policy")
"""Loss families with an on-policy row rule (:func:`on_policy_example`)."""
ON_POLICY_LOSSES = tuple(name for name, spec in {**LOSS_SPECS, **POLICY_LOSS_SPECS}.items()
                         if spec.family in ON_POLICY_FAMILIES)


@dataclass(frozen=True)
class OnPolicyConfig:
    """Sampling settings of ``--on-policy`` training (``reward``: a :data:`~.rewards.RewardFn` or its name)."""

    reward: RewardFn | str = option(spec=Function(), help="reward(prompt, response, reference) "
                                           "-> float for --on-policy: a built-in (exact_match, addition, neg_length "
                                           "= -characters, length_peak:MU[:WIDTH] = exp(-((characters-MU)/WIDTH)^2), "
                                           "WIDTH default 2) or MODULE:FUNCTION", metavar="NAME", group="on_policy")
    samples_per_prompt: int = option(4, Integer(low=1), "n samples per prompt", group="on_policy")
    refresh_every: int = option(1, Integer(low=1), "optimizer steps between sampling rounds (1 = fully on-policy)",
                                group="on_policy")
    max_new_tokens: int = option(128, Integer(low=1), "longest sample, in tokens", group="on_policy",
                                 name="sample_max_new_tokens")
    temperature: float = option(1.0, Number(low=0, low_open=True), "sampling temperature", group="on_policy",
                                name="sample_temperature", why="on-policy sampling needs temperature > 0")
    top_k: int = option(0, Integer(low=0), "keep the k most likely tokens; 0 = off", group="on_policy",
                        name="sample_top_k")
    top_p: float = option(1.0, Number(low=0, high=1, low_open=True), "nucleus sampling mass; 1.0 = off",
                          group="on_policy", name="sample_top_p")
    generation_batch_size: int = option(64, Integer(low=1), "sequences decoded together when sampling",
                                        group="on_policy")
    ppo_epochs: int = option(1, Integer(low=1), "policy losses (ppo/grpo/dapo/dr_grpo): updates per sampled "
                             "window; each window of samples is trained on E times, the ratio to the sampler's "
                             "log-probs correcting for the reuse (--max-steps counts every update)", metavar="E",
                             group="on_policy")
    offline_mix: float = option(0.0, Number(low=0, high=1, high_open=True, text="a number in [0, 1)"),
                                "fraction f in [0, 1) of every micro-batch's examples taken from the offline "
                                "negatives (--negatives, and --ref-logps where the loss needs them) instead of "
                                "fresh samples: floor(f * batch size) per micro-batch (0 = all on-policy)",
                                metavar="FRACTION", group="on_policy", label="offline_mix (--offline-mix)")

    def __post_init__(self):
        if self.reward is None or (isinstance(self.reward, str) and not self.reward.strip()):
            raise ValueError("on_policy needs reward='module:function' or a built-in reward name such as "
                             "'exact_match' (--reward) to score the samples")
        validate(self)

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.max_new_tokens, self.temperature, self.top_k, self.top_p)

    def first_micro_batch(self, step: int, grad_accum: int) -> int:
        """The data micro-batch (:class:`~.batching.ExampleOrder` number) of optimizer step ``step``'s
        first micro-batch: ``step * grad_accum`` with ``ppo_epochs`` 1; with ``E`` epochs the
        ``W = refresh_every`` steps of a window's pass are repeated ``E`` times, so step ``s`` of
        window ``w = s // (W * E)`` reads micro-batches ``((w * W) + s % W) * grad_accum ...``."""
        window, offset = divmod(step, self.refresh_every * self.ppo_epochs)
        return (window * self.refresh_every + offset % self.refresh_every) * grad_accum

    def offline_per_batch(self, batch_size: int) -> int:
        """How many of a micro-batch's ``batch_size`` examples come from the offline negatives."""
        count = math.floor(self.offline_mix * batch_size)
        if self.offline_mix > 0 and count == 0:
            raise ValueError(f"offline_mix={self.offline_mix} of batch_size={batch_size} examples rounds down to "
                             f"0 offline examples per micro-batch: raise --offline-mix to at least "
                             f"{1 / batch_size:g} or the batch size")
        return count


# ---------------------------------------------------------------------------------------------
# protocols
# ---------------------------------------------------------------------------------------------


class ExampleSource(Protocol):
    """Where the training loop gets its examples (an offline set or fresh samples)."""

    @property
    def num_examples(self) -> int:
        """Examples in the training set (the ids of :class:`~dftkern.DFTState` and of ``indices``)."""

    def before_step(self, step: int, first_micro_batch: int) -> dict[str, float]:
        """Called before optimizer step ``step`` (0-based) whose first micro-batch is ``first_micro_batch``;
        returns metrics to log with the step."""

    def examples(self, indices: Sequence[int]) -> list[TrainExample]:
        """The examples of the next micro-batch, in the order of ``indices`` (``order.batch(m)``)."""

    def state_dict(self) -> dict:
        """Plain data (and registered records) that :meth:`load_state_dict` restores on resume."""

    def load_state_dict(self, state: dict) -> None:
        ...


@dataclass(frozen=True)
class Sample:
    """One sampled response: its exact token ids (>= 1 token, EOS included when it finished) and its text."""

    token_ids: list[int]
    text: str


class Sampler(Protocol):
    """The model side of on-policy training: sample responses from the current policy, score rows with it."""

    def sample(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int]) -> list[Sample]:
        """One response per prompt row (token ids), row ``i`` drawn from a generator seeded with ``seeds[i]``."""

    def sequence_logps(self, examples: Sequence[TrainExample]) -> list[list[float]]:
        """The current policy's sequence log-prob of every row of every example (no gradient)."""

    def token_logps(self, examples: Sequence[TrainExample]) -> list[list[torch.Tensor]]:
        """The current policy's per-token log-probs of every row of every example (no gradient): per row
        a float32 tensor with one value per label position (needed by the policy losses only)."""


class RowScorer:
    """Scores training rows through a :class:`~.model.PolicyWithLoss` wrapper in eval mode, no gradient:
    sequence log-probs (:func:`~.model.score_rows`) or per-token log-probs at the training logit
    transform (:func:`~.model.token_logps_rows`). Rows are collated unshared (padded, or packed when
    ``packed``), ``batch_size`` rows per forward; under FSDP2 every rank makes the same number of
    forward calls when it scores the same number of examples.
    """

    def __init__(self, wrapper, *, pad_token_id: int, device, batch_size: int, packed: bool):
        self.wrapper, self.pad_token_id, self.device = wrapper, pad_token_id, device
        self.batch_size, self.packed = batch_size, packed

    @torch.no_grad()
    def _score(self, examples: Sequence[TrainExample], loss_fn, read) -> list:
        was_training = self.wrapper.training
        self.wrapper.eval()
        try:
            out = []
            per_batch = max(1, self.batch_size // len(examples[0].rows))
            for start in range(0, len(examples), per_batch):
                chunk = examples[start:start + per_batch]
                batch = collate(chunk, pad_token_id=self.pad_token_id, packed=self.packed).to(self.device)
                out += read(chunk, batch, self.wrapper(batch, loss_fn=loss_fn))
        finally:
            self.wrapper.train(was_training)
        return out

    def sequence_logps(self, examples: Sequence[TrainExample]) -> list[list[float]]:
        """Sum of the response-token log-probs of every row of every example."""
        return self._score(examples, score_rows,
                           lambda chunk, batch, seq: seq.float().cpu().view(len(chunk), -1).tolist())

    def token_logps(self, examples: Sequence[TrainExample]) -> list[list[torch.Tensor]]:
        """Per row, float32 ``[label positions]``: the log-prob of each response token, in order."""
        def read(chunk, batch, logp):
            values = logp.reshape(-1).float().cpu()[batch.valid_positions]
            counts = [row.num_label_positions for e in chunk for row in e.rows]
            rows = list(values.split(counts))
            n = len(chunk[0].rows)
            return [rows[i * n:(i + 1) * n] for i in range(len(chunk))]

        return self._score(examples, token_logps_rows, read)


class PolicySampler:
    """:class:`Sampler` through the training wrapper (:class:`~.model.PolicyWithLoss`), so that under
    FSDP2 the sharded weights are gathered as in training; all ranks decode in lockstep.

    Args:
        sampling: the decoding settings; ``batch_size``: sequences decoded (or rows scored) together.
    """

    def __init__(self, wrapper, causal_lm, tokenizer, ctx: DistContext, *, sampling: SamplingConfig,
                 batch_size: int, packed: bool):
        self.wrapper, self.causal_lm, self.tokenizer, self.ctx = wrapper, causal_lm, tokenizer, ctx
        self.sampling, self.batch_size, self.packed = sampling, batch_size, packed
        self.eos_ids = eos_token_ids(causal_lm, tokenizer)
        self.scorer = RowScorer(wrapper, pad_token_id=tokenizer.pad_token_id, device=ctx.device,
                                batch_size=batch_size, packed=packed)

    @torch.no_grad()
    def sample(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int]) -> list[Sample]:
        was_training = self.wrapper.training
        self.wrapper.eval()
        try:
            outputs = []
            for start in range(0, len(prompts), self.batch_size):  # same number of chunks on every rank
                outputs += decode(self.causal_lm, prompts[start:start + self.batch_size], sampling=self.sampling,
                                  eos_ids=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id,
                                  seeds=seeds[start:start + self.batch_size],
                                  forward=lambda **kw: self.wrapper(lm_inputs=kw), all_done=self.ctx.all_true)
        finally:
            self.wrapper.train(was_training)
        return [Sample(tokens, self.tokenizer.decode(tokens, skip_special_tokens=True)) for tokens, _ in outputs]

    def sequence_logps(self, examples: Sequence[TrainExample]) -> list[list[float]]:
        return self.scorer.sequence_logps(examples)

    def token_logps(self, examples: Sequence[TrainExample]) -> list[list[torch.Tensor]]:
        return self.scorer.token_logps(examples)


# ---------------------------------------------------------------------------------------------
# the example builder: rows per loss family (no model involved)
# ---------------------------------------------------------------------------------------------


def online_pair(rewards: Sequence[float], positive_reward: float) -> tuple[int | None, int]:
    """The online-DPO pair rule: ``(chosen, rejected)`` sample indices.

    ``chosen`` is the best sample (the first among equals) if its reward is strictly higher than
    ``positive_reward`` (the data's answer), else None, meaning the data's answer;
    ``rejected`` is the lowest-reward sample (the first among equals).
    """
    if not rewards:
        raise ValueError("online_pair needs at least one sample reward")
    best = max(range(len(rewards)), key=lambda j: (rewards[j], -j))
    worst = min(range(len(rewards)), key=lambda j: (rewards[j], j))
    return (best if rewards[best] > positive_reward else None), worst


def on_policy_example(family: str, index: int, prompt_id: str, prompt_ids: Sequence[int], answer_ids: Sequence[int],
                      samples: Sequence[Sequence[int]], rewards: Sequence[float], *,
                      positive_reward: float | None = None, max_length: int | None = None,
                      report: OverlongReport | None = None) -> TrainExample:
    """The rows one loss family trains on, from ``n`` samples of one prompt and their rewards.

    ``group`` and ``policy``: the samples with their rewards; ``dft``: the data's answer (reward 1.0), then the
    samples; ``pairwise``: ``(chosen, rejected)`` by :func:`online_pair` (``positive_reward``, the
    answer's reward, is required). Rows longer than ``max_length`` are truncated and counted in ``report``.
    """
    def row(response_ids):
        if report is not None:
            report.rows += 1
            report.truncated += max_length is not None and len(prompt_ids) + len(response_ids) > max_length
        return make_row(prompt_ids, response_ids, max_length)

    if family in ("group", "policy"):
        return TrainExample(index, prompt_id, [row(s) for s in samples], rewards=list(rewards))
    if family == "dft":
        return TrainExample(index, prompt_id, [row(answer_ids)] + [row(s) for s in samples],
                            rewards=[1.0] + list(rewards))
    if family != "pairwise":
        raise ValueError(f"no on-policy rows for the loss family {family!r}")
    if positive_reward is None:
        raise ValueError("pairwise on-policy examples need positive_reward (the data answer's reward)")
    chosen, rejected = online_pair(rewards, positive_reward)
    chosen_ids, chosen_reward = (answer_ids, positive_reward) if chosen is None else (samples[chosen], rewards[chosen])
    return TrainExample(index, prompt_id, [row(chosen_ids), row(samples[rejected])],
                        rewards=[chosen_reward, rewards[rejected]])


def offline_layout(family: str, samples_per_prompt: int) -> list[int]:
    """Which rows of an offline example (answer, neg_1..neg_K) take the place of an on-policy one."""
    if family == "pairwise":
        return [0, 1]  # (good answer, first negative)
    if family in ("group", "policy"):
        return list(range(1, 1 + samples_per_prompt))  # the negatives only, like the n on-policy samples
    return list(range(0, 1 + samples_per_prompt))  # good answer, then n negatives


@dataclass(frozen=True)
class PromptSet:
    """The training prompts, tokenized once: ``prompt_ids[i]`` and ``answer_ids[i]`` (the good answer)
    of ``records[i]``; rows are cut to ``max_length``."""

    records: list[PromptRecord]
    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]
    max_length: int | None = None

    @classmethod
    def encode(cls, tokenizer, records: Sequence[PromptRecord], *, use_chat_template: bool = True,
               max_length: int | None = None) -> PromptSet:
        template = use_chat_template and has_chat_template(tokenizer)
        return cls(list(records), [encode_prompt(tokenizer, r, use_chat_template=template) for r in records],
                   [encode_response(tokenizer, r, use_chat_template=template) for r in records], max_length)


# ---------------------------------------------------------------------------------------------
# the sources
# ---------------------------------------------------------------------------------------------


class OfflineExamples:
    """:class:`ExampleSource` over the fixed training set (negatives sampled beforehand by the generate stage)."""

    def __init__(self, examples: list[TrainExample]):
        self._examples = examples

    @property
    def num_examples(self) -> int:
        return len(self._examples)

    def before_step(self, step: int, first_micro_batch: int) -> dict[str, float]:
        return {}

    def examples(self, indices: Sequence[int]) -> list[TrainExample]:
        return [self._examples[i] for i in indices]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class OnPolicyExamples:
    """:class:`ExampleSource` of fresh samples: for the prompts of the next ``refresh_every`` steps.

    Args:
        cfg: the sampling settings and the reward.
        prompts: the training prompts, tokenized.
        sampler: draws the samples and scores the rows (the reference log-probs) with the current policy.
        order: which examples the coming micro-batches hold; ``grad_accum`` micro-batches per step,
            ``total_steps`` steps.
        family: the loss family (``"dft"``, ``"pairwise"``, ``"group"`` or ``"policy"``) and
            ``needs_ref_logps``: which rows to build, and whether to score them (sequence log-probs
            by the sampler). The ``"policy"`` family also records every sample's per-token log-probs
            under the sampling weights (``old_token_logps``, via ``sampler.token_logps``).
        reference: scores the per-token reference log-probs of every new window
            (``ref_token_logps``): the initial model's :class:`RowScorer`, or None.
        offline: the offline training set (same data file, negatives from the generate stage) that
            ``cfg.offline_mix`` draws from; required when ``cfg.offline_mix > 0``.
    """

    def __init__(self, cfg: OnPolicyConfig, prompts: PromptSet, sampler: Sampler, order: ExampleOrder, *,
                 family: str, needs_ref_logps: bool, grad_accum: int, total_steps: int, seed: int,
                 offline: OfflineExamples | None = None, reference: RowScorer | None = None):
        self.cfg, self.prompts, self.sampler, self.order = cfg, prompts, sampler, order
        self.family, self.needs_ref_logps, self.reference = family, needs_ref_logps, reference
        self.grad_accum, self.total_steps, self.seed = grad_accum, total_steps, seed
        self.reward_fn = resolve_reward(cfg.reward, what="--reward")
        self.overlong = OverlongReport(prompts.max_length)  # sampled rows cut to max_length
        self.window: dict[int, TrainExample] = {}
        self.window_reward = 0.0
        self.offline_per_batch = cfg.offline_per_batch(order.examples_per_batch)
        self.offline: list[TrainExample] | None = None
        if self.offline_per_batch:
            if offline is None:
                raise ValueError(f"offline_mix={cfg.offline_mix} needs an offline source: pass the generate "
                                 f"stage's output as --negatives (and --ref-logps where the loss needs them)")
            self.offline = self._offline_in_on_policy_layout(offline)
        elif offline is not None:
            raise ValueError("an offline source was given but offline_mix is 0: set --offline-mix > 0 or drop it")
        self._next_micro_batch: int | None = None  # set by before_step; examples() walks the micro-batches

    @property
    def num_examples(self) -> int:
        return len(self.prompts.records)

    # -- offline mix -----------------------------------------------------------------------------
    def _offline_in_on_policy_layout(self, offline: OfflineExamples) -> list[TrainExample]:
        """The offline examples cut to the rows an on-policy example of this loss has (see the module doc)."""
        examples = offline.examples(range(offline.num_examples))
        records = self.prompts.records
        if len(examples) != len(records) or any(
                e.index != i or e.prompt_id != r.prompt_id for i, (e, r) in enumerate(zip(examples, records))):
            raise ValueError("the offline examples for --offline-mix must come from the same --data file as the "
                             "on-policy prompts (same prompts, same order)")
        n = self.cfg.samples_per_prompt
        keep = offline_layout(self.family, n)
        available = len(examples[0].rows) - 1
        if max(keep) > available:
            raise ValueError(f"--offline-mix with --samples-per-prompt {n} needs {max(keep)} negatives per prompt in "
                             f"--negatives, but the offline examples have {available} (see --num-negatives)")
        if self.family == "group" and any(e.rewards is None for e in examples):
            raise ValueError("--offline-mix with a group loss needs rewards for the offline negatives: generate "
                             "them with --reward")
        return [replace(e, rows=[e.rows[r] for r in keep],
                        ref_logps=None if e.ref_logps is None else [e.ref_logps[r] for r in keep],
                        rewards=None if e.rewards is None else [e.rewards[r] for r in keep])
                for e in examples]

    def offline_positions(self, micro_batch: int) -> set[int]:
        """Positions (0-based, within the micro-batch) whose example comes from the offline negatives.

        Drawn from a generator seeded from ``(seed, micro_batch)`` only, so every rank takes the same
        number of offline examples and a resumed run makes the same choice.
        """
        if not self.offline_per_batch:
            return set()
        rng = random.Random(derive_seed(self.seed, "offline-mix", micro_batch))
        return set(rng.sample(range(self.order.examples_per_batch), self.offline_per_batch))

    def examples(self, indices: Sequence[int]) -> list[TrainExample]:
        """The examples of the next micro-batch (``indices`` = ``order.batch(m)`` for consecutive m).

        With an offline mix, calls must follow the trainer's order: the first call after
        :meth:`before_step` is micro-batch ``first_micro_batch``, the next one the following, and so on.
        """
        if not self.offline_per_batch:
            return [self.window[i] for i in indices]
        if self._next_micro_batch is None:
            raise RuntimeError("examples() called before before_step(): the micro-batch number is unknown")
        micro_batch = self._next_micro_batch
        if list(indices) != self.order.batch(micro_batch):
            raise RuntimeError(f"examples() expected the indices of micro-batch {micro_batch}, got {list(indices)}")
        self._next_micro_batch += 1
        offline = self.offline_positions(micro_batch)
        return [self.offline[i] if p in offline else self.window[i] for p, i in enumerate(indices)]

    def state_dict(self) -> dict:
        return {"window": self.window, "window_reward": self.window_reward}

    def load_state_dict(self, state: dict) -> None:
        self.window = dict(state["window"])
        self.window_reward = float(state["window_reward"])

    # -- sampling --------------------------------------------------------------------------------
    def before_step(self, step: int, first_micro_batch: int) -> dict[str, float]:
        """Refresh the samples when a window starts (or none is loaded).

        A window lasts ``refresh_every * ppo_epochs`` steps; ``first_micro_batch`` is
        :meth:`OnPolicyConfig.first_micro_batch` of ``step``. Returns ``{"sample_reward": mean
        reward of the current window's samples}``.
        """
        self._next_micro_batch = first_micro_batch
        if not self.window or step % (self.cfg.refresh_every * self.cfg.ppo_epochs) == 0:
            end = self.cfg.first_micro_batch(self.total_steps - 1, self.grad_accum) + self.grad_accum
            last = min(first_micro_batch + self.cfg.refresh_every * self.grad_accum, end)
            indices = []  # only the positions that are not taken from the offline negatives
            for m in range(first_micro_batch, last):
                offline = self.offline_positions(m)
                indices += [i for p, i in enumerate(self.order.batch(m)) if p not in offline]
            self._refresh(step, indices)
        return {"sample_reward": self.window_reward}

    def _refresh(self, step: int, indices: list[int]) -> None:
        """Sample n responses for every prompt in ``indices`` (duplicates kept: equal work on every rank)."""
        n, prompts = self.cfg.samples_per_prompt, self.prompts
        rows = [prompts.prompt_ids[i] for i in indices for _ in range(n)]
        seeds = [derive_seed(self.seed, "on-policy", step, prompts.records[i].prompt_id, j)
                 for i in indices for j in range(n)]
        samples = self.sampler.sample(rows, seeds)
        window, rewards_seen = {}, []
        for k, index in enumerate(indices):
            record = prompts.records[index]
            mine = samples[k * n:(k + 1) * n]
            rewards = [float(self.reward_fn(record.prompt_text(), s.text, record.response)) for s in mine]
            rewards_seen += rewards
            positive_reward = None
            if self.family == "pairwise":
                positive_reward = float(self.reward_fn(record.prompt_text(), record.response, record.response))
            window[index] = on_policy_example(self.family, index, record.prompt_id, prompts.prompt_ids[index],
                                              prompts.answer_ids[index], [s.token_ids for s in mine], rewards,
                                              positive_reward=positive_reward, max_length=prompts.max_length,
                                              report=self.overlong)
        examples = [window[i] for i in indices]  # duplicates kept: equal work on every rank
        if self.needs_ref_logps:  # the reference log-probs are the sampling policy's own
            for example, values in zip(examples, self.sampler.sequence_logps(examples)):
                example.ref_logps = values
        if self.family == "policy":  # the ratio's denominator: same weights, training transform
            for example, values in zip(examples, self.sampler.token_logps(examples)):
                example.old_token_logps = values
        if self.reference is not None:  # the KL's reference: the initial model
            for example, values in zip(examples, self.reference.token_logps(examples)):
                example.ref_token_logps = values
        self.window = window
        self.window_reward = sum(rewards_seen) / max(1, len(rewards_seen))
