"""``FusedSFTTrainer``: TRL's ``SFTTrainer`` with the token loss computed by dftkern.

The loss is TRL's (``loss_type="nll"``): the sum of ``-log p`` over non-ignored next-token labels,
divided by ``num_items_in_batch`` (or the batch's own count), computed by
:func:`dftkern.fused_linear_cross_entropy` (gradients in the forward, 6NHV) inside the model's
forward. Metrics: ``entropy``, ``mean_token_accuracy`` (with ``logit_metrics``), ``num_tokens``.
"""

from __future__ import annotations

import torch
from trl import SFTTrainer

from ... import fused_linear_cross_entropy
from .._stats import token_logit_stats
from ._common import FusedOptions, gathered_ratio, patch_trainer_model, refuse, warn_if_untested_trl

__all__ = ["FusedSFTTrainer"]


class FusedSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` with dftkern's fused cross-entropy. Same arguments, plus:

    Args:
        logit_metrics: log ``entropy`` and ``mean_token_accuracy`` (an extra no-gradient 2NHV pass);
            False leaves them out.
        chunk_bytes, backend: dftkern's workspace budget and engine.

    Raises:
        ValueError: for options the fused loss does not cover, naming them: ``loss_type`` other than
            "nll" (TRL's "dft" is Dynamic Fine-Tuning, arXiv 2508.05629 — use ``trl.SFTTrainer``),
            ``compute_loss_func``, ``label_smoothing_factor > 0``, a MoE auxiliary loss, or
            sequence parallelism.
    """

    def __init__(self, *args, logit_metrics: bool = True, chunk_bytes: int | None = None, backend: str = "auto",
                 **kwargs):
        warn_if_untested_trl()
        super().__init__(*args, **kwargs)
        refuse(self.args.loss_type != "nll",
               f"FusedSFTTrainer fuses loss_type='nll' only, got loss_type={self.args.loss_type!r} (TRL's 'dft' is "
               "Dynamic Fine-Tuning, arXiv 2508.05629, not dftkern's DFT); use trl.SFTTrainer for it")
        refuse(self.compute_loss_func is not None, "FusedSFTTrainer does not take compute_loss_func (it needs full "
                                                   "logits); use trl.SFTTrainer")
        refuse(self.args.label_smoothing_factor > 0, "FusedSFTTrainer does not support label_smoothing_factor > 0 "
                                                     f"(got {self.args.label_smoothing_factor})")
        refuse(self.aux_loss_enabled, "FusedSFTTrainer does not add a MoE router auxiliary loss; set "
                                      "router_aux_loss_coef=0.0 or use trl.SFTTrainer")
        pc = self.accelerator.parallelism_config
        refuse(pc is not None and getattr(pc, "sp_enabled", False),
               "FusedSFTTrainer does not support sequence parallelism")
        self.fused = FusedOptions(bool(logit_metrics), chunk_bytes, backend)
        patch_trainer_model(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        inputs["use_cache"] = False
        fused = self.fused

        def head_fn(hidden, shifted, head):
            out = {"nll_sum": fused_linear_cross_entropy(hidden, head.weight, shifted, reduction="sum",
                                                         **head.kwargs(), **fused.kwargs()),
                   "num_valid": (shifted != -100).sum()}
            if fused.logit_metrics:
                stats = token_logit_stats(hidden.detach(), head, shifted, chunk_bytes=fused.chunk_bytes)
                out["entropy_sum"] = stats["entropy"].sum()
                out["num_correct"] = stats["is_top1"].sum()
            return out

        out = model(**inputs, labels=labels, dftkern_head=head_fn)
        count = out["num_valid"] if num_items_in_batch is None else num_items_in_batch
        loss = out["nll_sum"] / torch.as_tensor(count, device=out["nll_sum"].device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())

        metrics = self._metrics[mode]
        if fused.logit_metrics:
            metrics["entropy"].append(gathered_ratio(self.accelerator, out["entropy_sum"], out["num_valid"]))
            metrics["mean_token_accuracy"].append(gathered_ratio(self.accelerator, out["num_correct"],
                                                                 out["num_valid"]))
        if mode == "train":
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if return_outputs:  # compute_metrics wants logits: one extra plain forward, as TRL does
            with torch.no_grad():
                outputs = model(**inputs)
            return loss, outputs
        return loss
