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
reinforce, rloo, rwr            the n samples, with their rewards (plain policy gradient)
dft, dft2                       the good answer from the data, then the n samples as negatives
dpo, ipo, hinge, simpo,         one pair: chosen = the data's answer, unless a sample has a strictly
unlikelihood                    higher reward (then the best sample); rejected = the lowest-reward
                                sample (online DPO)
==============================  ================================================================

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
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

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
from .records import PromptRecord
from .distributed import DistContext
from .generate import SamplingConfig, decode, eos_token_ids
from .model import score_rows
from .objectives import Objective
from .options import Function, Integer, Number, option, validate
from .rewards import RewardFn, resolve_reward
from .util import derive_seed

__all__ = ["ON_POLICY_LOSSES", "OnPolicyConfig", "OfflineExamples", "OnPolicyExamples"]

ON_POLICY_LOSSES = ("reinforce", "rloo", "rwr", "dft", "dft2", "dpo", "ipo", "hinge", "simpo", "unlikelihood")


@dataclass(frozen=True)
class OnPolicyConfig:
    """Sampling settings of ``--on-policy`` training."""

    reward: RewardFn | str = option(spec=Function(), help="reward(prompt, response, reference) -> float for "
                                    "--on-policy: a built-in (exact_match, addition, neg_length = -characters, "
                                    "length_peak:MU[:WIDTH] = exp(-((characters-MU)/WIDTH)^2), WIDTH default 2) or "
                                    "MODULE:FUNCTION", metavar="NAME", group="on_policy")
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
    offline_mix: float = option(0.0, Number(low=0, high=1, high_open=True, text="a number in [0, 1)"),
                                "fraction f in [0, 1) of every micro-batch's examples taken from the offline "
                                "negatives (--negatives, and --ref-logps where the loss needs them) instead of "
                                "fresh samples: floor(f * batch size) per micro-batch (0 = all on-policy)",
                                metavar="FRACTION", group="on_policy", label="offline_mix (--offline-mix)")

    def __post_init__(self):
        validate(self)

    def offline_per_batch(self, batch_size: int) -> int:
        """How many of a micro-batch's ``batch_size`` examples come from the offline negatives."""
        count = math.floor(self.offline_mix * batch_size)
        if self.offline_mix > 0 and count == 0:
            raise ValueError(f"offline_mix={self.offline_mix} of batch_size={batch_size} examples rounds down to "
                             f"0 offline examples per micro-batch: raise --offline-mix to at least "
                             f"{1 / batch_size:g} or the batch size")
        return count


class OfflineExamples:
    """The fixed training set (negatives sampled beforehand by the generate stage)."""

    def __init__(self, examples: list[TrainExample]):
        self._examples = examples

    @property
    def num_examples(self) -> int:
        return len(self._examples)

    def before_step(self, step: int, first_micro_batch: int) -> dict:
        return {}

    def examples(self, indices: Sequence[int]) -> list[TrainExample]:
        return [self._examples[i] for i in indices]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class OnPolicyExamples:
    """Fresh samples from the current policy for the prompts of the next ``refresh_every`` steps.

    Args:
        records: the prompts (and their good answers) of the training set.
        order / grad_accum / total_steps: which examples the coming micro-batches hold.
        wrapper: the (possibly FSDP-sharded) :class:`~dftkern.train.model.PolicyWithLoss`; sampling
            and scoring go through its forward.
        offline: the offline training set (same data file, negatives from the generate stage) that
            ``cfg.offline_mix`` draws from; required when ``cfg.offline_mix > 0``.
    """

    def __init__(self, cfg: OnPolicyConfig, records: Sequence[PromptRecord], tokenizer, objective: Objective,
                 order: ExampleOrder, *, grad_accum: int, total_steps: int, seed: int, max_length: int | None,
                 use_chat_template: bool, wrapper, causal_lm, ctx: DistContext, packed: bool,
                 offline: OfflineExamples | None = None):
        self.cfg, self.records, self.tokenizer, self.objective = cfg, list(records), tokenizer, objective
        self.order, self.grad_accum, self.total_steps, self.seed = order, grad_accum, total_steps, seed
        self.max_length, self.packed = max_length, packed
        self.wrapper, self.causal_lm, self.ctx = wrapper, causal_lm, ctx
        self.reward_fn = resolve_reward(cfg.reward, what="--reward")
        self.sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
        self.use_template = use_chat_template and has_chat_template(tokenizer)
        self.prompt_ids = [encode_prompt(tokenizer, r, use_chat_template=self.use_template) for r in self.records]
        self.eos_ids = eos_token_ids(causal_lm, tokenizer)
        self.overlong = OverlongReport(max_length)  # sampled rows cut to max_length
        self.window: dict[int, TrainExample] = {}
        self.window_reward = 0.0
        self.family = objective.spec.family
        if objective.spec.name not in ON_POLICY_LOSSES:
            raise ValueError(f"--on-policy supports the losses {ON_POLICY_LOSSES}, not {objective.spec.name!r}")
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
        return len(self.records)

    # -- offline mix -----------------------------------------------------------------------------
    def _offline_in_on_policy_layout(self, offline: OfflineExamples) -> list[TrainExample]:
        """The offline examples cut to the rows an on-policy example of this loss has (see the module doc)."""
        examples = offline.examples(range(offline.num_examples))
        if len(examples) != len(self.records) or any(
                e.index != i or e.prompt_id != r.prompt_id for i, (e, r) in enumerate(zip(examples, self.records))):
            raise ValueError("the offline examples for --offline-mix must come from the same --data file as the "
                             "on-policy prompts (same prompts, same order)")
        n = self.cfg.samples_per_prompt
        if self.family == "pairwise":
            keep = [0, 1]  # (good answer, first negative)
        elif self.family == "group":
            keep = list(range(1, 1 + n))  # the negatives only, like the n on-policy samples
        else:
            keep = list(range(0, 1 + n))  # good answer, then n negatives
        available = len(examples[0].rows) - 1
        if max(keep) > available:
            raise ValueError(f"--offline-mix with loss {self.objective.spec.name!r} and --samples-per-prompt {n} "
                             f"needs {max(keep)} negatives per prompt in --negatives, but the offline examples "
                             f"have {available} (see --num-negatives)")
        if self.family == "group" and any(e.rewards is None for e in examples):
            raise ValueError(f"--offline-mix with loss {self.objective.spec.name!r} needs rewards for the offline "
                             f"negatives: generate them with --reward")
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
    def before_step(self, step: int, first_micro_batch: int) -> dict:
        """Refresh the samples when a window starts (or none is loaded).

        Returns ``{"sample_reward": mean reward of the current window's samples}``.
        """
        self._next_micro_batch = first_micro_batch
        if not self.window or step % self.cfg.refresh_every == 0:
            last = min(first_micro_batch + self.cfg.refresh_every * self.grad_accum,
                       self.total_steps * self.grad_accum)
            indices = []  # only the positions that are not taken from the offline negatives
            for m in range(first_micro_batch, last):
                offline = self.offline_positions(m)
                indices += [i for p, i in enumerate(self.order.batch(m)) if p not in offline]
            self._refresh(step, indices)
        return {"sample_reward": self.window_reward}

    @torch.no_grad()
    def _refresh(self, step: int, indices: list[int]) -> None:
        n = self.cfg.samples_per_prompt
        device = self.ctx.device
        rows = [self.prompt_ids[i] for i in indices for _ in range(n)]
        seeds = [derive_seed(self.seed, "on-policy", step, self.records[i].prompt_id, j)
                 for i in indices for j in range(n)]
        was_training = self.wrapper.training
        self.wrapper.eval()
        try:
            outputs = []
            chunk = self.cfg.generation_batch_size
            for start in range(0, len(rows), chunk):  # same number of chunks on every rank
                outputs += decode(self.causal_lm, rows[start:start + chunk], sampling=self.sampling,
                                  eos_ids=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id,
                                  seeds=seeds[start:start + chunk],
                                  forward=lambda **kw: self.wrapper(lm_inputs=kw), all_done=self.ctx.all_true)
            window, rewards_seen = {}, []
            for k, index in enumerate(indices):
                record = self.records[index]
                samples = [tokens for tokens, _ in outputs[k * n:(k + 1) * n]]  # >= 1 token each
                texts = [self.tokenizer.decode(s, skip_special_tokens=True) for s in samples]
                rewards = [float(self.reward_fn(record.prompt_text(), t, record.response)) for t in texts]
                rewards_seen += rewards
                window[index] = self._example(index, record, samples, rewards)
            if self.objective.spec.needs_ref_logps:
                self._attach_sampler_logps(window, indices, device)
        finally:
            self.wrapper.train(was_training)
        self.window = window
        self.window_reward = sum(rewards_seen) / max(1, len(rewards_seen))

    def _example(self, index: int, record: PromptRecord, samples: list[list[int]], rewards: list[float]):
        prompt = self.prompt_ids[index]
        sample_rows = [make_row(prompt, s, self.max_length) for s in samples]
        self.overlong.rows += len(samples)
        if self.max_length is not None:
            self.overlong.truncated += sum(len(prompt) + len(s) > self.max_length for s in samples)
        if self.family == "group":
            return TrainExample(index, record.prompt_id, sample_rows, rewards=rewards)
        positive = make_row(prompt, encode_response(self.tokenizer, record, use_chat_template=self.use_template),
                            self.max_length)
        if self.family == "dft":
            return TrainExample(index, record.prompt_id, [positive] + sample_rows, rewards=[1.0] + rewards)
        # pairwise: (chosen, rejected)
        positive_reward = float(self.reward_fn(record.prompt_text(), record.response, record.response))
        best = max(range(len(rewards)), key=lambda j: (rewards[j], -j))
        worst = min(range(len(rewards)), key=lambda j: (rewards[j], j))
        chosen, chosen_reward = (sample_rows[best], rewards[best]) if rewards[best] > positive_reward \
            else (positive, positive_reward)
        return TrainExample(index, record.prompt_id, [chosen, sample_rows[worst]],
                            rewards=[chosen_reward, rewards[worst]])

    def _attach_sampler_logps(self, window: dict[int, TrainExample], indices: list[int], device) -> None:
        """Reference log-probs = the sampling policy's own (same weights as the samples came from)."""
        examples = [window[i] for i in indices]  # duplicates kept: equal work on every rank
        per_batch = max(1, self.cfg.generation_batch_size // len(examples[0].rows))
        for start in range(0, len(examples), per_batch):
            chunk = examples[start:start + per_batch]
            batch = collate(chunk, pad_token_id=self.tokenizer.pad_token_id, packed=self.packed).to(device)
            scores = self.wrapper(batch, loss_fn=score_rows).float().cpu().view(len(chunk), -1)
            for example, values in zip(chunk, scores.tolist()):
                example.ref_logps = values
