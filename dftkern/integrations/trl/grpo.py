"""``FusedGRPOTrainer``: TRL's ``GRPOTrainer`` whose policy loss runs on dftkern's fused LM head.

TRL 1.16's loss for one batch of ``B`` completions (``mask [B, C]`` = completion mask times the
tool mask) is a sum over completion tokens of a per-token term, each with a weight that depends
only on the batch's masks and sizes — so it is computed by :func:`dftkern.fused_token_loss`
inside the model's forward (gradients in the forward, 6NHV; no logits), with TRL's exact
semantics. Per token, with ``r = exp(logp - old)`` (``old`` = ``logp`` detached when TRL has no
sampler log-probs), ``A`` the advantage, ``ε_low = epsilon``, ``ε_high = epsilon_high``:

===============================  ================================================  ==============================
``loss_type``                    per-token loss ``ℓ``                              weight of ``ℓ`` (× 1/GA [#]_)
===============================  ================================================  ==============================
``grpo``                         ``-min(r̃ A, clip(r, 1-ε_low, 1+ε_high) A)``,      ``1 / (|o_i| · B)``
                                 ``r̃ = min(r, delta)`` (``delta`` set) else ``r``
``bnpo``                         same                                              ``1 / Σ mask`` (local batch)
``dr_grpo``                      same                                              ``1 / (B · max_completion_length)``
``dapo`` (TRL's default)         same                                              ``1 / N`` [#]_, no 1/GA
``luspo`` (token level)          same                                              ``1 / B``
``cispo``                        ``-sg(min(r, ε_high)) A logp``                    as ``dapo``
``sapo``                         ``-σ(τ (r - 1)) · 4/τ · A``, ``τ`` = τ_pos if      as ``grpo``
                                 ``A > 0`` else τ_neg
===============================  ================================================  ==============================

.. [#] GA = ``current_gradient_accumulation_steps`` in training, 1 in evaluation.
.. [#] ``N = num_items_in_batch / num_processes · GA / steps_per_generation``: the loss-mask
   tokens of the whole generation batch on all processes, rescaled to one accumulation window
   (evaluation: ``num_items_in_batch / num_processes``).

Then ``ℓ ← ℓ · importance_sampling_ratio`` (vLLM correction, when TRL applies it) ``+ β · kl``
with ``kl = exp(ref - logp) - (ref - logp) - 1`` (× ``r`` with ``use_bias_correction_kl``), and the
entropy bonus ``- c · Σ_t mask_t H_t / Σ mask / GA`` — TRL's batch token-mean of the entropy for
every loss type (``c`` = ``entropy_coef``, or the adaptive controller's coefficient of the last
step; the controller is updated from the detached entropies as TRL does). The entropy gradient is
exact. Per-token log-probs everywhere else in the trainer (the sampler's ``old`` log-probs, the
reference model's) come from dftkern too (:class:`~dftkern.integrations.trl._policy.FusedPolicyMixin`).

Refused with an error naming the option (use ``trl.GRPOTrainer`` for these): ``loss_type="vespo"``
and ``importance_sampling_level="sequence"`` (the per-token weight depends on the whole sequence's
current log-probs), ``top_entropy_quantile < 1`` and ``off_policy_mask_threshold`` (a mask built
from the current entropies / log-probs before the loss), a MoE auxiliary loss, image inputs, and
softcapped models at ``temperature != 1``.

Metrics: TRL's names and definitions — ``entropy``, ``kl`` (β ≠ 0), ``clip_ratio/low_mean``,
``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``clip_ratio/low_min``,
``clip_ratio/high_max`` (clip-family loss types), ``cispo_clip_ratio``, ``policy_loss`` and
``entropy_coef`` (entropy bonus); the generation and reward metrics are TRL's own code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl import GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from ... import fused_token_loss
from ._common import refuse, warn_if_untested_trl
from ._policy import FusedPolicyMixin, completion_labels

__all__ = ["FusedGRPOTrainer", "FUSED_GRPO_LOSS_TYPES", "GRPOTokenMath"]

FUSED_GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo")
CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # PPO-clip surrogate, TRL's clip_ratio metrics
_PER_SEQUENCE = ("grpo", "sapo")  # each completion's mean, then the mean over completions
_PER_GENERATION_BATCH = ("dapo", "cispo")  # normalized by num_items_in_batch, no gradient-accumulation factor


@dataclass(frozen=True)
class GRPOTokenMath:
    """TRL 1.16 ``GRPOTrainer``'s per-token loss before masking and aggregation (see the module doc).

    Attributes mirror the trainer's: ``loss_type`` in :data:`FUSED_GRPO_LOSS_TYPES`,
    ``epsilon_low``/``epsilon_high``, ``delta`` (two-sided clip, or None), ``beta`` (KL weight),
    ``bias_correction_kl``, ``sapo_temperature_pos``/``_neg``.
    """

    loss_type: str
    epsilon_low: float
    epsilon_high: float
    delta: float | None = None
    beta: float = 0.0
    bias_correction_kl: bool = False
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05

    def terms(self, logp: torch.Tensor, advantages: torch.Tensor, old_logps: torch.Tensor | None = None,
              ref_logps: torch.Tensor | None = None, is_ratio: torch.Tensor | None = None):
        """Elementwise, all arguments of one shape (float32; constants detached).

        Returns:
            ``(loss, ratio, kl)``: the per-token loss (differentiable in ``logp``), the ratio TRL's
            clip metrics read (after the ``delta`` clamp) and the per-token KL (None when ``beta == 0``).
        """
        old = logp.detach() if old_logps is None else old_logps
        ratio = torch.exp(logp - old)
        kl = None
        if self.beta != 0.0:
            delta_ref = ref_logps - logp
            kl = torch.exp(delta_ref) - delta_ref - 1
            if self.bias_correction_kl:
                kl = kl * ratio
        if self.loss_type == "cispo":
            loss = -torch.clamp(ratio, max=self.epsilon_high).detach() * advantages * logp
        elif self.loss_type == "sapo":
            tau = torch.where(advantages > 0, self.sapo_temperature_pos, self.sapo_temperature_neg)
            loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages
        else:
            clipped = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)
            if self.delta is not None:
                ratio = torch.clamp(ratio, max=self.delta)
            loss = -torch.min(ratio * advantages, clipped * advantages)
        if is_ratio is not None:
            loss = loss * is_ratio
        if kl is not None:
            loss = loss + self.beta * kl
        return loss, ratio, kl


def _expand(value: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """A ``[B]``, ``[B, 1]`` or ``[B, C]`` constant as ``[B, C]`` (no copy where it broadcasts)."""
    if value is None:
        return None
    if value.dim() == 1:
        value = value.unsqueeze(1)
    return value.expand(shape)


def _on_shifted_grid(value: torch.Tensor | None, prompt_length: int) -> torch.Tensor | None:
    """A ``[B, C]`` completion tensor placed at columns ``P-1 ..`` of the shifted ``[B, P+C-1]`` grid, flat."""
    if value is None:
        return None
    rows, cols = value.shape
    grid = value.new_zeros(rows, prompt_length - 1 + cols)
    grid[:, prompt_length - 1:] = value
    return grid.reshape(-1)


class FusedGRPOTrainer(FusedPolicyMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with dftkern's fused policy loss. Same arguments, plus:

    Args:
        chunk_bytes, backend: dftkern's workspace budget and engine.

    Raises:
        ValueError: an option whose loss is not exactly a sum of per-token terms (named in the
            message; see the module doc), or a softcapped model at ``temperature != 1``.
        NotImplementedError: a model family dftkern has not checked (from ``patch_causal_lm``).
    """

    def __init__(self, *args, chunk_bytes: int | None = None, backend: str = "auto", **kwargs):
        warn_if_untested_trl()
        super().__init__(*args, **kwargs)
        refuse(self.loss_type not in FUSED_GRPO_LOSS_TYPES,
               f"loss_type={self.loss_type!r} is not fused by dftkern (fused: {list(FUSED_GRPO_LOSS_TYPES)}): its "
               "per-token weight depends on the whole sequence's current log-probs; use trl.GRPOTrainer for it")
        refuse(self.importance_sampling_level != "token",
               f"FusedGRPOTrainer fuses importance_sampling_level='token' only, got "
               f"{self.importance_sampling_level!r} (a sequence-level ratio couples every token of a completion); "
               "use trl.GRPOTrainer")
        refuse(self.top_entropy_quantile < 1.0,
               f"FusedGRPOTrainer does not support top_entropy_quantile={self.top_entropy_quantile} < 1.0 (the mask "
               "needs every token's entropy before the loss); use trl.GRPOTrainer")
        refuse(self.off_policy_mask_threshold is not None,
               f"FusedGRPOTrainer does not support off_policy_mask_threshold={self.off_policy_mask_threshold} (the "
               "mask needs the current log-probs before the loss); use trl.GRPOTrainer")
        self._setup_fused("FusedGRPOTrainer", False, chunk_bytes, backend)
        self.token_math = GRPOTokenMath(
            loss_type=self.loss_type, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            delta=self.args.delta, beta=self.beta, bias_correction_kl=bool(self.args.use_bias_correction_kl),
            sapo_temperature_pos=self.args.sapo_temperature_pos, sapo_temperature_neg=self.args.sapo_temperature_neg)

    # -- weights ---------------------------------------------------------------------------------
    def _policy_weights(self, mask: torch.Tensor, inputs: dict, training: bool) -> tuple[torch.Tensor, float]:
        """``(w [B, C], scale)``: the loss is ``scale · Σ w ℓ``, TRL's ``policy_loss`` metric ``Σ w ℓ``."""
        accumulation = self.current_gradient_accumulation_steps if training else 1.0
        rows = mask.shape[0]
        if self.loss_type in _PER_SEQUENCE:
            return mask / mask.sum(-1, keepdim=True).clamp(min=1.0) / rows, 1.0 / accumulation
        if self.loss_type == "bnpo":
            return mask / mask.sum().clamp(min=1.0), 1.0 / accumulation
        if self.loss_type == "dr_grpo":
            return mask / (rows * self.max_completion_length), 1.0 / accumulation
        if self.loss_type == "luspo":
            return mask / rows, 1.0 / accumulation
        # dapo, cispo: num_items_in_batch spans the generation batch on every process
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if training:
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return mask / normalizer, 1.0

    def _entropy_weights(self, mask: torch.Tensor, training: bool) -> torch.Tensor | None:
        """``e [B, C]``: the bonus subtracts ``Σ e H`` (TRL: coefficient · batch token-mean of H / GA)."""
        if not self._entropy_bonus_enabled:
            return None
        if self.use_adaptive_entropy:
            coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
        else:
            coef = self.entropy_coef
        accumulation = self.current_gradient_accumulation_steps if training else 1.0
        return mask * (coef / accumulation) / mask.sum().clamp(min=1.0)

    # -- the loss --------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        self._refuse_images(inputs, "FusedGRPOTrainer")
        training = self.model.training
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        completion_mask = inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        prompt_length = prompt_ids.size(1)
        refuse(prompt_length < 1, "FusedGRPOTrainer needs at least one prompt token (the first completion token is "
                                  "predicted from it)")
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask_f = mask.to(torch.float32)

        shape = completion_ids.shape
        use_is_ratio = self.use_vllm and self.vllm_importance_sampling_correction
        constants = {
            "advantages": _expand(inputs["advantages"], shape),
            "old_logps": inputs.get("old_per_token_logps"),
            "ref_logps": inputs["ref_per_token_logps"] if self.beta != 0.0 else None,
            "is_ratio": _expand(inputs["importance_sampling_ratio"], shape) if use_is_ratio else None,
        }
        weights, scale = self._policy_weights(mask_f, inputs, training)
        entropy_weights = self._entropy_weights(mask_f, training)
        flat = {k: _on_shifted_grid(v, prompt_length) for k, v in constants.items()}
        flat_weights = _on_shifted_grid(weights * scale, prompt_length)
        flat_entropy_weights = _on_shifted_grid(entropy_weights, prompt_length)
        math = self.token_math

        def token_loss(logp, entropy, index):
            at = {k: None if v is None else v[index] for k, v in flat.items()}
            loss, _, _ = math.terms(logp, **at)
            terms = loss * flat_weights[index]
            if flat_entropy_weights is not None:
                terms = terms - flat_entropy_weights[index] * entropy
            return terms

        def head_fn(hidden, shifted, head):
            hidden, context = self._head_context(hidden)
            with context:
                return fused_token_loss(hidden, head.weight, shifted, token_loss=token_loss, return_token_values=True,
                                        **self._head_kwargs(head))

        labels = completion_labels(input_ids, mask, prompt_length)
        with self.accelerator.autocast():
            loss, logps, entropies = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                           use_cache=False, dftkern_head=head_fn)
        logps, entropies = logps[:, prompt_length - 1:], entropies[:, prompt_length - 1:]
        with torch.no_grad():
            constants["old_logps"] = logps if constants["old_logps"] is None else constants["old_logps"]
            token_losses, ratio, kl = math.terms(logps, **constants)
            policy_loss = (token_losses * weights).sum()
        self._log_policy_metrics("train" if training else "eval", mask, entropies, ratio, kl, constants["advantages"],
                                 policy_loss, training)
        return loss

    # -- metrics ---------------------------------------------------------------------------------
    def _log_policy_metrics(self, mode, mask, entropies, ratio, kl, advantages, policy_loss, training) -> None:
        acc, metrics = self.accelerator, self._metrics[mode]
        mask = mask.to(entropies.dtype)

        def global_masked_mean(x):
            totals = acc.reduce(torch.stack([(x * mask).sum(), mask.sum()]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def sequence_means(x):
            return acc.gather((x * mask).sum(-1) / mask.sum(-1))

        if self._entropy_bonus_enabled:
            metrics["policy_loss"].append(acc.gather(policy_loss).nanmean().item())
            if self.use_adaptive_entropy and training:
                self._update_adaptive_entropy(entropies, mask)
            if training and acc.sync_gradients:
                metrics["entropy_coef"].append(self.entropy_coef)
        if kl is not None:
            metrics["kl"].append(global_masked_mean(kl))
        metrics["entropy"].append(global_masked_mean(entropies))
        if self.loss_type in CLIP_LOSS_TYPES:
            low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
            high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
            metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
            metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
            metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
            metrics["clip_ratio/low_min"].append(nanmin(sequence_means(low)).item())
            metrics["clip_ratio/high_max"].append(nanmax(sequence_means(high)).item())
        elif self.loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(global_masked_mean(((ratio > self.epsilon_high) & (advantages > 0))
                                                                  .float()))

    def _update_adaptive_entropy(self, entropies: torch.Tensor, mask: torch.Tensor) -> None:
        """Skywork-OR1's controller as TRL runs it: accumulate the window's entropy sum and token count; at the
        optimizer step, move ``entropy_coef`` by ``entropy_coef_delta`` toward keeping entropy above the target."""
        stats = torch.stack([(entropies * mask).sum(), mask.sum()])
        self._entropy_window_stats = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
        if not self.accelerator.sync_gradients:
            return
        totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
        world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
        args = self.args
        if world_entropy <= args.entropy_target:
            self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
        self._last_world_entropy = world_entropy
        self._entropy_window_stats = None
