"""What every integration needs from a Hugging Face causal LM: its backbone, its linear LM head
(used inside the head module's own call, so FSDP2/ZeRO-3 hand over a full weight), and the transform the model applies to
the logits (Gemma's final softcapping, Cohere's logit scale, Granite's logit divisor).

The head transform is known per ``model_type`` (each listed family is checked against the
model's own loss in tests/integrations); for any other family
:func:`~dftkern.integrations.transformers.patch_causal_lm` checks the patched loss against the
model's own numerically at patch time (``verify=None``, the default) and refuses a mismatch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# model_type -> how the model's forward turns lm_head(h) into logits. "plain": logits = lm_head(h).
# Each entry is covered by tests/integrations/test_transformers_patch.py::test_loss_matches_hf.
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "phi", "phi3", "olmo", "olmo2", "gpt2",
                              "gpt_neox", "opt", "starcoder2", "stablelm", "falcon", "glm", "smollm3", "exaone4"})
# Mixture-of-experts families: a plain head; their forward adds a router load-balancing loss only with
# output_router_logits, which the patched forward refuses (it computes the token loss only).
MOE_HEAD_TYPES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe"})
SOFTCAP_HEAD_TYPES = frozenset({"gemma2", "gemma3_text"})  # softcap * tanh(logits / softcap)
SCALED_HEAD_TYPES = {"cohere": "logit_scale", "granite": "logits_scaling"}  # logits * scale / logits / scaling
SUPPORTED_MODEL_TYPES = tuple(sorted(PLAIN_HEAD_TYPES | MOE_HEAD_TYPES | SOFTCAP_HEAD_TYPES | set(SCALED_HEAD_TYPES)))


@dataclass(frozen=True)
class HeadTransform:
    """``logits = softcap * tanh(((h W^T + b) / temperature) / softcap)`` (softcap optional) — dftkern's convention."""

    temperature: float = 1.0
    softcap: float | None = None


@dataclass(frozen=True)
class LMHead:
    """The LM head as read inside one forward call.

    Attributes:
        weight: ``[V, H]`` (full, never a shard). bias: ``[V]`` or None.
        transform: the model's logit transform.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    transform: HeadTransform

    def kwargs(self) -> dict:
        """Keyword arguments for dftkern's functions (``bias``, ``temperature``, ``softcap``)."""
        return {"bias": self.bias, "temperature": self.transform.temperature, "softcap": self.transform.softcap}


def unwrap_model(model):
    """The Hugging Face ``PreTrainedModel`` inside a PEFT ``PeftModel`` (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__module__.startswith("peft"):
        return get_base()
    return model


def text_config(model):
    config = model.config
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def head_transform(model, *, strict: bool = True) -> HeadTransform:
    """The logit transform of ``model``'s family (see the module doc).

    Raises:
        NotImplementedError: for a ``model_type`` outside :data:`SUPPORTED_MODEL_TYPES` when ``strict``.
    """
    cfg = text_config(model)
    model_type = getattr(cfg, "model_type", None)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    if model_type in SOFTCAP_HEAD_TYPES:
        return HeadTransform(softcap=None if softcap is None else float(softcap))
    if model_type in SCALED_HEAD_TYPES:
        value = float(getattr(cfg, SCALED_HEAD_TYPES[model_type]))
        return HeadTransform(temperature=1.0 / value if model_type == "cohere" else value)
    if model_type in PLAIN_HEAD_TYPES or model_type in MOE_HEAD_TYPES:
        return HeadTransform()
    if strict:
        raise NotImplementedError(
            f"model_type {model_type!r} ({type(model).__name__}) is not a family dftkern has checked against the "
            f"model's own loss ({', '.join(SUPPORTED_MODEL_TYPES)}); its forward may transform the logits in a way "
            f"dftkern does not know. Leave verify=None (the default) or pass verify=True to check it numerically at "
            f"patch time.")
    return HeadTransform(softcap=None if softcap is None else float(softcap))


def linear_head(model) -> torch.nn.Module:
    """``model.get_output_embeddings()``, checked to be a plain linear layer ``[V, H]`` (+ bias ``[V]``).

    Raises:
        TypeError: no output embedding, a non-linear head, or a PEFT adapter on the head (its
            update would be skipped: dftkern reads ``weight`` directly).
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embedding (get_output_embeddings() is None): "
                        "dftkern needs a causal LM with a linear LM head")
    if type(head).__module__.startswith("peft") or hasattr(head, "base_layer"):
        raise TypeError("the LM head carries a PEFT adapter: dftkern reads lm_head.weight directly, so the adapter "
                        "would never be trained; remove 'lm_head' from target_modules")
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"the LM head of {type(model).__name__} is a {type(head).__name__}, not a torch.nn.Linear: "
                        "dftkern fuses only a linear head logits = h W^T + b")
    return head


def call_with_head(model, transform: HeadTransform, fn: Callable, hidden: torch.Tensor, labels: torch.Tensor):
    """Run ``fn(hidden, labels, head: LMHead)`` *as the LM head module's forward* and return its result.

    The head module is called (its ``forward`` temporarily redirected to ``fn``), so every hook on it
    fires as if the model had called ``lm_head(hidden)``:

    * FSDP2 with the head in its own ``fully_shard`` unit: the pre-forward hook unshards the weight,
      and the gradient that ``fn`` produces is reduce-scattered like the head's own. (With the head
      in the root unit, it is already unsharded while the model's forward runs.)
    * DeepSpeed ZeRO-3: the hooks gather the partitioned weight for the call and release it after.
    * ``device_map`` models: ``hidden`` and ``labels`` are moved to the head's device here.
    """
    module = linear_head(model)
    saved = module.__dict__.get("forward")

    def redirected(hidden_in: torch.Tensor, labels_in: torch.Tensor):
        weight, bias = module.weight, module.bias
        if _is_dtensor(weight):
            raise RuntimeError("the LM head weight is still a DTensor shard inside its own forward; dftkern needs "
                               "the full weight (shard the head with fully_shard, or leave it in the root unit)")
        return fn(hidden_in.to(weight.device), labels_in.to(weight.device), LMHead(weight, bias, transform))

    module.forward = redirected
    try:
        return module(hidden, labels)
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(tensor, DTensor)


def shift_for_next_token(hidden: torch.Tensor, labels: torch.Tensor | None,
                         shift_labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Align ``hidden [B, T, H]`` with next-token labels as Hugging Face's causal-LM loss does.

    ``labels [B, T]`` are unshifted: position t is predicted from ``hidden[:, t-1]``, so the result
    is ``(hidden[:, :-1], labels[:, 1:])``. ``shift_labels [B, T]`` (already shifted, as context
    parallelism passes them) are used as they are with the full ``hidden``.
    """
    if shift_labels is not None:
        if shift_labels.shape != hidden.shape[:-1]:
            raise ValueError(f"shift_labels must have shape {list(hidden.shape[:-1])}, got {list(shift_labels.shape)}")
        return hidden, shift_labels.to(hidden.device)
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape {list(hidden.shape[:-1])} (batch, sequence) like input_ids, got "
                         f"{list(labels.shape)}")
    return hidden[:, :-1], labels[:, 1:].to(hidden.device)
