"""Where the trainer's examples come from: a fixed offline set, or fresh samples from the policy.

``train --on-policy --reward module:function``: every ``refresh_every`` optimizer steps, the
prompts of the next ``refresh_every`` steps get ``n = samples_per_prompt`` fresh responses sampled
from the *current* policy, scored by ``reward(prompt, response, reference) -> float``. The
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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .data import (
    ExampleOrder,
    PromptRecord,
    TrainExample,
    collate,
    encode_prompt,
    encode_response,
    has_chat_template,
    make_row,
)
from .distributed import DistContext
from .generate import SamplingConfig, decode, eos_token_ids
from .model import score_rows
from .objectives import Objective
from .util import derive_seed, load_callable

__all__ = ["ON_POLICY_LOSSES", "OnPolicyConfig", "OfflineExamples", "OnPolicyExamples"]

ON_POLICY_LOSSES = ("reinforce", "rloo", "rwr", "dft", "dft2", "dpo", "ipo", "hinge", "simpo", "unlikelihood")


@dataclass(frozen=True)
class OnPolicyConfig:
    """Sampling settings of ``--on-policy`` training."""

    reward: str
    samples_per_prompt: int = 4
    refresh_every: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generation_batch_size: int = 64

    def __post_init__(self):
        for name in ("samples_per_prompt", "refresh_every", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"on-policy sampling needs temperature > 0, got {self.temperature}")


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
    """

    def __init__(self, cfg: OnPolicyConfig, records: Sequence[PromptRecord], tokenizer, objective: Objective,
                 order: ExampleOrder, *, grad_accum: int, total_steps: int, seed: int, max_length: int | None,
                 use_chat_template: bool, wrapper, causal_lm, ctx: DistContext, packed: bool):
        self.cfg, self.records, self.tokenizer, self.objective = cfg, list(records), tokenizer, objective
        self.order, self.grad_accum, self.total_steps, self.seed = order, grad_accum, total_steps, seed
        self.max_length, self.packed = max_length, packed
        self.wrapper, self.causal_lm, self.ctx = wrapper, causal_lm, ctx
        self.reward_fn = load_callable(cfg.reward, what="--reward")
        self.sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
        self.use_template = use_chat_template and has_chat_template(tokenizer)
        self.prompt_ids = [encode_prompt(tokenizer, r, use_chat_template=self.use_template) for r in self.records]
        self.eos_ids = eos_token_ids(causal_lm, tokenizer)
        self.window: dict[int, TrainExample] = {}
        self.window_reward = 0.0
        self.family = objective.spec.family
        if objective.spec.name not in ON_POLICY_LOSSES:
            raise ValueError(f"--on-policy supports the losses {ON_POLICY_LOSSES}, not {objective.spec.name!r}")

    @property
    def num_examples(self) -> int:
        return len(self.records)

    def examples(self, indices: Sequence[int]) -> list[TrainExample]:
        return [self.window[i] for i in indices]

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
        if not self.window or step % self.cfg.refresh_every == 0:
            last = min(first_micro_batch + self.cfg.refresh_every * self.grad_accum,
                       self.total_steps * self.grad_accum)
            self._refresh(step, [i for m in range(first_micro_batch, last) for i in self.order.batch(m)])
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
