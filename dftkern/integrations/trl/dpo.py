"""``FusedDPOTrainer``: TRL's ``DPOTrainer`` with the preference loss computed by dftkern.

TRL's batch is ``[chosen_1..chosen_B, rejected_1..rejected_B]`` with ``completion_mask``; its
sequence score is the sum of completion-token log-probs. The fused loss regroups the rows into
(chosen, rejected) pairs and calls :func:`dftkern.fused_preference_loss` inside the model's
forward, so the loss's gradients are computed in the forward pass (6NHV) without logits:

=================  ==============================  ==================================================
TRL ``loss_type``  dftkern loss                    TRL's formula, ``Δ = (s_c - r_c) - (s_r - r_r)``
=================  ==============================  ==================================================
``sigmoid``        ``dpo``                         ``-log σ(β Δ)``
``hinge``          ``hinge``                       ``max(0, 1 - β Δ)``
``ipo``            ``ipo``, mean token log-probs   ``(Δ̄ - 1/(2β))²``, ``Δ̄`` = Δ with each side / its length
``sigmoid_norm``   ``dpo``, mean token log-probs   ``-log σ(β Δ̄)``
=================  ==============================  ==================================================

For the length-normalized ones the reference log-probs are divided by the same completion length,
so ``(s - r)/n`` is exactly TRL's. Every other TRL option that changes the loss (other loss types,
several loss types at once, ``f_divergence_type``, ``ld_alpha``, ``use_weighting``, a MoE auxiliary
loss, vision inputs) is refused with an error naming it; use ``trl.DPOTrainer`` for those.

Metrics: TRL's names and definitions — ``rewards/chosen|rejected|accuracies|margins``,
``logps/chosen|rejected``, ``num_tokens``; with ``logit_metrics`` also ``entropy``,
``logits/chosen|rejected`` and ``mean_token_accuracy``.
"""

from __future__ import annotations

import contextlib

import torch
from trl import DPOTrainer
from accelerate.utils import is_peft_model

from ... import fused_preference_loss, sequence_logprobs
from .._stats import token_logit_stats
from ..transformers import is_patched
from ._common import FusedOptions, gathered_mean, gathered_ratio, patch_trainer_model, refuse, warn_if_untested_trl

__all__ = ["FusedDPOTrainer", "FUSED_DPO_LOSS_TYPES"]

# TRL loss_type -> (dftkern loss, length-normalized scores)
FUSED_DPO_LOSS_TYPES = {"sigmoid": ("dpo", False), "hinge": ("hinge", False), "ipo": ("ipo", True),
                        "sigmoid_norm": ("dpo", True)}
_NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")


def pair_order(num_pairs: int, device) -> torch.Tensor:
    """Row order turning TRL's ``[chosen..., rejected...]`` into dftkern's ``[c_1, r_1, c_2, r_2, ...]``."""
    first = torch.arange(num_pairs, device=device)
    return torch.stack([first, first + num_pairs], dim=1).reshape(-1)


class FusedDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` with dftkern's fused preference loss. Same arguments, plus:

    Args:
        logit_metrics: log ``entropy``, ``logits/chosen|rejected`` and ``mean_token_accuracy`` (an
            extra no-gradient 2NHV pass over the batch); False leaves them out.
        chunk_bytes, backend: dftkern's workspace budget and engine.

    Raises:
        ValueError: a ``loss_type`` outside :data:`FUSED_DPO_LOSS_TYPES`, several loss types, or
            another option that changes the loss (named in the message).
    """

    def __init__(self, *args, logit_metrics: bool = True, chunk_bytes: int | None = None, backend: str = "auto",
                 **kwargs):
        warn_if_untested_trl()
        # set before TRL's __init__, which may already precompute reference log-probs through us
        self.fused = FusedOptions(bool(logit_metrics), chunk_bytes, backend)
        super().__init__(*args, **kwargs)
        refuse(len(self.loss_types) != 1,
               f"FusedDPOTrainer fuses one loss_type at a time, got {self.loss_types}; use trl.DPOTrainer")
        refuse(self.loss_types[0] not in FUSED_DPO_LOSS_TYPES,
               f"loss_type={self.loss_types[0]!r} is not fused by dftkern (fused: {sorted(FUSED_DPO_LOSS_TYPES)}); "
               "use trl.DPOTrainer for it")
        refuse(self.f_divergence_type != "reverse_kl",
               f"FusedDPOTrainer supports f_divergence_type='reverse_kl' only, got {self.f_divergence_type!r}")
        refuse(self.ld_alpha is not None, f"FusedDPOTrainer does not support ld_alpha (got {self.ld_alpha})")
        refuse(self.use_weighting, "FusedDPOTrainer does not support use_weighting=True (WPO)")
        refuse(self.aux_loss_enabled, "FusedDPOTrainer does not add a MoE router auxiliary loss; set "
                                      "router_aux_loss_coef=0.0 or use trl.DPOTrainer")
        refuse(self._is_vision_dataset, "FusedDPOTrainer does not support vision datasets")
        self.fused_loss, self.fused_average = FUSED_DPO_LOSS_TYPES[self.loss_types[0]]
        patch_trainer_model(self.model)
        if self.ref_model is not None:
            patch_trainer_model(self.accelerator.unwrap_model(self.ref_model))

    # -- reference log-probs --------------------------------------------------------------------
    def _sequence_head(self):
        fused = self.fused

        def head_fn(hidden, shifted, head):
            return sequence_logprobs(hidden, head.weight, shifted, **head.kwargs(), **fused.kwargs())

        return head_fn

    def _reference_logps(self, model, model_kwargs: dict, labels: torch.Tensor) -> torch.Tensor:
        """Reference sequence log-probs ``[2B]`` (sums over completion tokens), no gradient.

        ``model`` is the reference model, or the policy itself: with PEFT and no reference model
        the reference is the base model (adapter disabled) or the adapter named "ref".
        """
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            model = self.model
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        if not is_patched(self.accelerator.unwrap_model(model)):  # TRL's precompute runs before our __init__ ends
            patch_trainer_model(self.accelerator.unwrap_model(model))
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                adapter:
            return model(**model_kwargs, labels=labels, dftkern_head=self._sequence_head())

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch (``precompute_ref_log_probs``): ``(chosen [B], rejected [B])``."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        return self._reference_logps(model, model_kwargs, labels).chunk(2)

    # -- the loss -------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        num_pairs = labels.shape[0] // 2
        if self.precompute_ref_logps:
            ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).float()
        else:
            ref = self._reference_logps(self.ref_model, model_kwargs, labels).float()
        order = pair_order(num_pairs, labels.device)
        ref_rows = ref.to(labels.device)[order]
        if self.fused_average:
            # TRL divides by the completion length of the unshifted mask; it equals the number of
            # scored (shifted) tokens unless a completion starts at position 0 (empty prompt).
            refuse(bool(completion_mask[:, 0].any()),
                   f"loss_type={self.loss_types[0]!r} with an empty prompt: TRL counts the first token in the length "
                   "but cannot score it; FusedDPOTrainer refuses rather than compute a different loss")
            ref_rows = ref_rows / completion_mask.sum(1).clamp(min=1)[order].to(ref_rows.dtype)
        fused, beta, name, average = self.fused, self.beta, self.fused_loss, self.fused_average

        def head_fn(hidden, shifted, head):
            loss, stats = fused_preference_loss(hidden[order], head.weight, shifted[order], loss=name, beta=beta,
                                                ref_logps=ref_rows, average=average, return_stats=True,
                                                **head.kwargs(), **fused.kwargs())
            out = {"loss": loss, "seq_logps": stats["seq_logps"]}
            if fused.logit_metrics:
                out.update(token_logit_stats(hidden.detach(), head, shifted, chunk_bytes=fused.chunk_bytes))
            return out

        out = model(**model_kwargs, labels=labels, dftkern_head=head_fn)
        loss = out["loss"] * self.loss_weights[0]
        seq = out["seq_logps"]
        chosen_logps, rejected_logps = seq[0::2], seq[1::2]
        ref_chosen, ref_rejected = ref[:num_pairs].to(seq.device), ref[num_pairs:].to(seq.device)
        self._log_fused_metrics(mode, inputs, out, chosen_logps, rejected_logps, ref_chosen, ref_rejected)
        if return_outputs:  # compute_metrics wants logits: one extra plain forward, as TRL does
            with torch.no_grad():
                return loss, model(**model_kwargs)
        return loss

    def _log_fused_metrics(self, mode, inputs, out, chosen_logps, rejected_logps, ref_chosen, ref_rejected):
        acc, metrics = self.accelerator, self._metrics[mode]
        mask = inputs["completion_mask"][:, 1:]
        chosen_mask, rejected_mask = mask.chunk(2)
        if self.fused.logit_metrics:
            metrics["entropy"].append(gathered_ratio(acc, (out["entropy"] * mask).sum(), mask.sum()))
        if mode == "train":
            self._total_train_tokens += acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item() \
                // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if self.fused.logit_metrics:
            mean_chosen, mean_rejected = out["mean_logit"].chunk(2)
            metrics["logits/chosen"].append(gathered_ratio(acc, (mean_chosen * chosen_mask).sum(), chosen_mask.sum()))
            metrics["logits/rejected"].append(gathered_ratio(acc, (mean_rejected * rejected_mask).sum(),
                                                             rejected_mask.sum()))
            top1_chosen = out["is_top1"].chunk(2)[0] & chosen_mask.bool()
            metrics["mean_token_accuracy"].append(gathered_ratio(acc, top1_chosen.sum(), chosen_mask.sum()))
        chosen_rewards = self.beta * (chosen_logps - ref_chosen)
        rejected_rewards = self.beta * (rejected_logps - ref_rejected)
        metrics["rewards/chosen"].append(gathered_mean(acc, chosen_rewards))
        metrics["rewards/rejected"].append(gathered_mean(acc, rejected_rewards))
        metrics["rewards/accuracies"].append(gathered_mean(acc, (chosen_rewards > rejected_rewards).float()))
        metrics["rewards/margins"].append(gathered_mean(acc, chosen_rewards - rejected_rewards))
        metrics["logps/chosen"].append(gathered_mean(acc, chosen_logps))
        metrics["logps/rejected"].append(gathered_mean(acc, rejected_logps))
