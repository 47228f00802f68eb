"""What :class:`FusedGRPOTrainer` and :class:`FusedRLOOTrainer` share.

TRL 1.16's GRPO and RLOO trainers read every per-token log-prob (and entropy) through one method,
``_get_per_token_logps_and_entropies``, which calls the model with TRL's own fused LM head
(``fused_lm_head=True``): the sampler's log-probs before an update (``old``), the reference
model's, and the policy's inside the loss. :class:`FusedPolicyMixin` replaces that method with
dftkern's :func:`~dftkern.integrations.transformers.token_logprobs` run inside the model's forward
(the ``dftkern_head`` hook of :func:`~dftkern.integrations.transformers.patch_causal_lm`), so no
LM-head product of these trainers goes through TRL's kernel.

The logits they score are the sampler's: ``z / temperature`` (TRL's ``GRPOConfig.temperature``) on
top of the model family's own transform. dftkern applies a temperature *before* a softcap, TRL
*after* it, so a softcapped family (Gemma-2/3) is only exact at ``temperature=1`` and is refused
otherwise.
"""

from __future__ import annotations

import contextlib

import torch

from .._head import head_transform, unwrap_model
from ..transformers import token_logprobs
from ._common import FusedOptions, patch_trainer_model, refuse

# TRL's multimodal inputs: these trainers fuse text-only models.
IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                "num_tiles", "image_sizes", "image_position_ids")
ROW_INPUTS = ("token_type_ids", "mm_token_type_ids")  # per-row extras passed to the model as TRL does


def completion_labels(input_ids: torch.Tensor, keep: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Unshifted labels ``[B, P + C]`` scoring only the completion tokens where ``keep [B, C]`` is nonzero.

    After the model's next-token shift, completion token ``j`` sits at shifted column ``P - 1 + j``.
    """
    labels = torch.full_like(input_ids, -100)
    labels[:, prompt_length:] = input_ids[:, prompt_length:].masked_fill(keep == 0, -100)
    return labels


class FusedPolicyMixin:
    """Per-token log-probs through dftkern for TRL's on-policy trainers (mixed in before the TRL class)."""

    fused: FusedOptions

    def _setup_fused(self, trainer_name: str, logit_metrics: bool, chunk_bytes, backend: str) -> None:
        """Refuse what both trainers do not fuse, then patch the policy (and reference) model.

        Call after TRL's ``__init__`` (it builds the reference model and sets ``temperature``).
        """
        refuse(self.aux_loss_enabled, f"{trainer_name} does not add a MoE router auxiliary loss; set "
                                      f"router_aux_loss_coef=0.0 or use trl.{trainer_name.replace('Fused', '')}")
        transform = head_transform(unwrap_model(self.model))
        refuse(transform.softcap is not None and self.temperature != 1.0,
               f"{trainer_name}: this model softcaps its logits (final_logit_softcapping={transform.softcap}); TRL "
               f"divides by temperature={self.temperature} after the softcap, dftkern before it, so only "
               "temperature=1.0 is exact; use trl." + trainer_name.replace("Fused", ""))
        self.fused = FusedOptions(bool(logit_metrics), chunk_bytes, backend)
        patch_trainer_model(self.model)
        if self.ref_model is not None:
            patch_trainer_model(self.accelerator.unwrap_model(self.ref_model))

    def _head_kwargs(self, head) -> dict:
        """dftkern keyword arguments for the sampler's logits: the family's transform, then ``/ temperature``."""
        return {"bias": head.bias, "temperature": head.transform.temperature * self.temperature,
                "softcap": head.transform.softcap, **self.fused.kwargs()}

    def _head_context(self, hidden: torch.Tensor):
        """TRL's ``cast_lm_head_to_fp32``: the head runs in float32 outside autocast. Returns (hidden, context)."""
        if getattr(self.args, "cast_lm_head_to_fp32", False):
            return hidden.float(), torch.autocast(hidden.device.type, enabled=False)
        return hidden, contextlib.nullcontext()

    @staticmethod
    def _refuse_images(inputs: dict, trainer_name: str) -> None:
        given = sorted(k for k in IMAGE_INPUTS if inputs.get(k) is not None)
        refuse(bool(given), f"{trainer_name} fuses text-only models; got image inputs {given}; use "
                            f"trl.{trainer_name.replace('Fused', '')}")

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extra):
        """TRL's method, computed by dftkern: ``(logps [B, C], entropies [B, C] or None, None)``.

        Scores the last ``logits_to_keep`` (= C) tokens of ``input_ids [B, L]`` where
        ``attention_mask`` is set (0 elsewhere), in row chunks of ``batch_size`` as TRL does;
        float32, differentiable.
        """
        name = type(self).__name__
        refuse(compute_aux_loss, f"{name} does not compute the MoE auxiliary loss")
        self._refuse_images(extra, name)
        batch_size = batch_size or input_ids.size(0)

        def head_fn(hidden, shifted, head):
            hidden, context = self._head_context(hidden)
            with context:
                return token_logprobs(hidden, head.weight, shifted, return_entropy=compute_entropy,
                                      **self._head_kwargs(head))

        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, min(start + batch_size, input_ids.size(0)))
            ids, mask = input_ids[rows], attention_mask[rows]
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, :-logits_to_keep] = -100
            row_inputs = {k: extra[k][rows] for k in ROW_INPUTS if extra.get(k) is not None}
            with self.accelerator.autocast():
                logp, entropy = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False,
                                      dftkern_head=head_fn, **row_inputs)
            logps.append(logp[:, -logits_to_keep:])
            if compute_entropy:
                entropies.append(entropy[:, -logits_to_keep:])
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None
