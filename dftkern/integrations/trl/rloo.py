"""``FusedRLOOTrainer``: TRL's ``RLOOTrainer`` whose loss runs on dftkern's fused LM head.

TRL 1.16's RLOO loss is sequence-level PPO-clip: with ``s_i`` the sum of completion-token
log-probs of completion ``i``, ``old_i`` the sampler's, ``r_i = exp(s_i - old_i)`` and ``A_i`` the
leave-one-out advantage (the KL to the reference is already inside the reward),

    loss = mean_i  -min(r_i A_i, clip(r_i, 1 - epsilon, 1 + epsilon_high) A_i).

It is computed by :func:`dftkern.grouped_sequence_loss` (one completion per group) inside the
model's forward: each completion's tokens in one chunk, the gradient of ``s_i`` computed in the
forward (6NHV), no logits. TRL's ``entropy`` metric needs every token's entropy, which this loss
does not: with ``logit_metrics=True`` (default) it costs one extra no-gradient pass (2NHV);
``logit_metrics=False`` leaves it out. The sampler's and the reference model's per-token log-probs
also come from dftkern (:class:`~dftkern.integrations.trl._policy.FusedPolicyMixin`).

Metrics: TRL's — ``entropy``, ``clip_ratio/low_mean``, ``clip_ratio/low_min``,
``clip_ratio/high_mean``, ``clip_ratio/high_max``, ``clip_ratio/region_mean`` (all per
completion); the generation and reward metrics are TRL's own code. Refused: a MoE auxiliary loss,
image inputs, softcapped models at ``temperature != 1``.
"""

from __future__ import annotations

import torch
from trl import RLOOTrainer
from trl.trainer.utils import nanmax, nanmin

from ... import grouped_sequence_loss
from ..transformers import token_logprobs
from ._common import warn_if_untested_trl
from ._policy import FusedPolicyMixin, completion_labels

__all__ = ["FusedRLOOTrainer"]


class FusedRLOOTrainer(FusedPolicyMixin, RLOOTrainer):
    """``trl.RLOOTrainer`` with dftkern's fused sequence-level loss. Same arguments, plus:

    Args:
        logit_metrics: log TRL's ``entropy`` metric (an extra no-gradient 2NHV pass); False leaves it out.
        chunk_bytes, backend: dftkern's workspace budget and engine.

    Raises:
        ValueError: a MoE auxiliary loss, or a softcapped model at ``temperature != 1``.
        NotImplementedError: a model family dftkern has not checked (from ``patch_causal_lm``).
    """

    def __init__(self, *args, logit_metrics: bool = True, chunk_bytes: int | None = None, backend: str = "auto",
                 **kwargs):
        warn_if_untested_trl()
        super().__init__(*args, **kwargs)
        self._setup_fused("FusedRLOOTrainer", logit_metrics, chunk_bytes, backend)

    def _compute_loss(self, model, inputs):
        self._refuse_images(inputs, "FusedRLOOTrainer")
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        completion_mask = inputs["completion_mask"]
        prompt_length = prompt_ids.size(1)
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        old_logps, advantages = inputs["old_logps"], inputs["advantages"]
        eps_low, eps_high = self.epsilon_low, self.epsilon_high
        with_entropy = self.fused.logit_metrics

        def per_completion_loss(seq_sums, token_counts, g0, g1):
            ratio = torch.exp(seq_sums - old_logps[g0:g1])
            adv = advantages[g0:g1]
            return -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv), {}

        def head_fn(hidden, shifted, head):
            hidden, context = self._head_context(hidden)
            kwargs = self._head_kwargs(head)
            with context:
                loss, seq_logps, _, _ = grouped_sequence_loss(hidden, head.weight, shifted, rows_per_group=1,
                                                              group_loss=per_completion_loss, **kwargs)
                entropy = None
                if with_entropy:
                    with torch.no_grad():
                        _, entropy = token_logprobs(hidden.detach(), head.weight.detach(), shifted,
                                                    return_entropy=True, **kwargs)
            return loss, seq_logps, entropy

        labels = completion_labels(input_ids, completion_mask, prompt_length)
        with self.accelerator.autocast():
            loss, seq_logps, entropies = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                               use_cache=False, dftkern_head=head_fn)
        mode = "train" if self.model.training else "eval"
        self._log_rloo_metrics(mode, completion_mask, entropies, torch.exp(seq_logps - old_logps), advantages,
                               prompt_length)
        return loss

    def _log_rloo_metrics(self, mode, completion_mask, entropies, ratio, advantages, prompt_length) -> None:
        acc, metrics = self.accelerator, self._metrics[mode]
        if entropies is not None:
            entropies = entropies[:, prompt_length - 1:]
            totals = acc.reduce(torch.stack([(entropies * completion_mask).sum(), completion_mask.sum().float()]),
                                reduction="sum")
            metrics["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        low = acc.gather(((ratio < 1 - self.epsilon_low) & (advantages < 0)).float())
        high = acc.gather(((ratio > 1 + self.epsilon_high) & (advantages > 0)).float())
        metrics["clip_ratio/low_mean"].append(low.nanmean().item())
        metrics["clip_ratio/low_min"].append(nanmin(low).item())
        metrics["clip_ratio/high_mean"].append(high.nanmean().item())
        metrics["clip_ratio/high_max"].append(nanmax(high).item())
        metrics["clip_ratio/region_mean"].append(torch.maximum(low, high).nanmean().item())
