"""One call to fuse a Hugging Face causal LM's loss: :func:`patch_causal_lm`.

After ``patch_causal_lm(model)``, ``model(input_ids, attention_mask=..., labels=...)`` returns the
loss Hugging Face's ``ForCausalLMLoss`` defines — labels unshifted (the shift happens inside),
``ignore_index=-100``, the mean over non-ignored next-token labels, or their sum divided by
``num_items_in_batch`` when it is passed — computed by :func:`dftkern.fused_linear_cross_entropy`
(gradients computed inside the forward, 6NHV, one chunk of logits at a time), with
``logits=None``. Without labels the original forward runs, so ``generate`` is unchanged.

How it works (the approach of Liger-Kernel's ``lce_forward`` and TRL's ``add_fused_lm_head``, written
anew here): the model's ``forward`` is replaced, on the instance, by one that runs the backbone
(``model.base_model``) and then calls dftkern on the last hidden states *as the LM head module's
forward* — so the hooks FSDP2 and ZeRO-3 put on the head hand over its full weight and reduce its
gradient, see :func:`dftkern.integrations._head.call_with_head`. The model's logit transform (Gemma-2/3 ``final_logit_softcapping``, Cohere's
``logit_scale``, Granite's ``logits_scaling``) and a head bias are applied inside dftkern.

Integrations (TRL trainers, :mod:`dftkern.integrations.trl`) pass ``dftkern_head=fn`` to the
patched forward: ``fn(hidden [B, T-1, H], labels [B, T-1], head: LMHead)`` then runs inside the
forward with the live head weight and its return value is the forward's output.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from .. import fused_linear_cross_entropy, fused_linear_logprobs
from .._validation import ArgumentTypeError
from ..chunking import resolve_chunk_bytes
from ..functional import BACKENDS
from ._head import (
    MOE_HEAD_TYPES,
    SUPPORTED_MODEL_TYPES,
    HeadTransform,
    LMHead,
    call_with_head,
    head_transform,
    linear_head,
    shift_for_next_token,
    text_config,
    unwrap_model,
)

__all__ = ["patch_causal_lm", "unpatch_causal_lm", "is_patched", "TokenLogprobsOutput", "token_logprobs"]

_OUTPUTS = ("loss", "logprobs")


def _model_output_base():
    from transformers.utils import ModelOutput

    return ModelOutput


@dataclass
class TokenLogprobsOutput(_model_output_base()):
    """Output of a patched model called with labels in ``output="logprobs"`` mode.

    Attributes:
        token_logps: float32 ``[B, T-1]`` (``[B, T]`` with ``shift_labels``): ``log p(labels[:, t+1] |
            tokens <= t)``, 0 where the shifted label is ``ignore_index``; differentiable.
        entropy: float32, same shape, entropy of the next-token distribution (``return_entropy=True``),
            else None.
        label_mask: bool, same shape: the shifted label is not ``ignore_index``.
        loss, logits: always None (present so code reading ``outputs.loss`` fails loudly, not silently).
        cache, hidden_states, attentions: the backbone's, as the unpatched model returns them.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    token_logps: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    cache: Any = None
    hidden_states: Any = None
    attentions: Any = None


@dataclass
class _PatchState:
    original_forward: Any
    instance_forward: bool  # the original forward was an instance attribute (e.g. another wrapper's)
    transform: HeadTransform
    output: str
    return_entropy: bool
    ignore_index: int
    chunk_bytes: int | None
    backend: str


def is_patched(model) -> bool:
    """Whether :func:`patch_causal_lm` was applied to ``model`` (or the model inside a PEFT wrapper)."""
    return getattr(unwrap_model(model), "_dftkern_patch", None) is not None


def patch_causal_lm(model, *, output: str = "loss", return_entropy: bool = False, ignore_index: int = -100,
                    chunk_bytes: int | None = None, backend: str = "auto", verify: bool | None = None):
    """Make ``model``'s loss (or per-token log-probs) come from dftkern's fused LM head. In place.

    Args:
        model: a Hugging Face ``*ForCausalLM`` with a ``torch.nn.Linear`` output embedding (tied or
            not, with or without bias), or a PEFT ``PeftModel`` around one. Families checked against
            the model's own loss: see ``dftkern.integrations._head.SUPPORTED_MODEL_TYPES``.
        output: what a call with ``labels`` returns by default: ``"loss"`` — a
            ``CausalLMOutputWithPast`` with Hugging Face's loss and ``logits=None``; or
            ``"logprobs"`` — a :class:`TokenLogprobsOutput` with ``token_logps`` (and ``entropy``).
            A single call can override it with ``model(..., dftkern_output="logprobs")``.
        return_entropy: in ``"logprobs"`` mode also return the per-token entropy (needs dftkern's
            ``fused_linear_logprobs(..., return_entropy=True)``).
        ignore_index: label value that is not scored (Hugging Face uses -100).
        chunk_bytes, backend: passed to dftkern (workspace budget; "auto" | "triton" | "torch").
        verify: run the original and the patched forward once on a random 2 x 8 batch (no
            gradient, evaluation mode) and refuse the patch if the losses differ. None (default):
            only for a family outside the checked list; True: always; False: never (an unchecked
            family is then refused).

    Returns:
        ``model`` itself (patched in place). Calling it again updates the options.

    Raises:
        TypeError: the model has no linear LM head, or a PEFT adapter sits on the head.
        NotImplementedError: an unchecked family with ``verify=False``.
        ValueError: a bad option; the numerical check found a mismatch.
    """
    if output not in _OUTPUTS:
        raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")
    if not isinstance(return_entropy, bool):
        raise ArgumentTypeError(f"return_entropy must be a bool, got {return_entropy!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ArgumentTypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if chunk_bytes is not None:
        resolve_chunk_bytes(chunk_bytes, torch.device("cpu"))  # checks it (a positive int)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if verify is not None and not isinstance(verify, bool):
        raise ArgumentTypeError(f"verify must be None, True or False, got {verify!r}")
    target = unwrap_model(model)
    linear_head(target)
    if verify is None:
        verify = getattr(text_config(target), "model_type", None) not in SUPPORTED_MODEL_TYPES
    transform = head_transform(target, strict=not verify)
    previous = getattr(target, "_dftkern_patch", None)
    if previous is not None:
        original, instance_forward = previous.original_forward, previous.instance_forward
    else:
        original, instance_forward = target.forward, "forward" in vars(target)
    target._dftkern_patch = _PatchState(original, instance_forward, transform, output, bool(return_entropy), ignore_index,
                                        chunk_bytes, backend)
    target.forward = _patched_forward.__get__(target, type(target))
    if verify:
        try:
            _verify(target)
        except Exception:
            unpatch_causal_lm(target)
            raise
    return model


def unpatch_causal_lm(model):
    """Undo :func:`patch_causal_lm` (restores the original forward). Returns ``model``."""
    target = unwrap_model(model)
    state = getattr(target, "_dftkern_patch", None)
    if state is not None:
        if state.instance_forward:
            target.forward = state.original_forward
        else:
            del target.forward
        target._dftkern_patch = None
    return model


def _call_arguments(model, args: tuple, kwargs: dict) -> dict:
    """Positional + keyword arguments of ``type(model).forward`` as one keyword dict."""
    if not args:
        return dict(kwargs)
    signature = inspect.signature(type(model).forward)
    bound = signature.bind_partial(model, *args, **kwargs)
    call = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{type(model).__name__}.forward takes *{name}; call the patched model with keywords")
        else:
            call[name] = value
    call.pop(next(iter(signature.parameters)), None)  # self
    return call


def _patched_forward(self, *args, labels=None, shift_labels=None, num_items_in_batch=None, dftkern_head=None,
                     dftkern_output=None, **kwargs):
    state: _PatchState = self._dftkern_patch
    if dftkern_head is None and labels is None and shift_labels is None:
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        return state.original_forward(*args, **kwargs)  # generation and logits: unchanged
    mode = state.output if dftkern_output is None else dftkern_output
    if mode not in _OUTPUTS:
        raise ValueError(f"dftkern_output must be one of {_OUTPUTS}, got {mode!r}")
    call = _call_arguments(self, args, kwargs)
    if getattr(text_config(self), "model_type", None) in MOE_HEAD_TYPES and call.get(
            "output_router_logits", getattr(text_config(self), "output_router_logits", False)):
        raise NotImplementedError("output_router_logits=True: the model's loss would add the router's load-balancing "
                                  "loss, which a dftkern-patched model does not compute; turn it off, or add "
                                  "router_aux_loss_coef * aux_loss yourself from an unpatched forward")
    logits_to_keep = call.pop("logits_to_keep", 0)
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        raise ValueError("logits_to_keep must be 0 when labels are passed to a dftkern-patched model (no logits "
                         f"are built), got {logits_to_keep!r}")
    return_dict = call.pop("return_dict", None)
    outputs = self.base_model(**call)
    hidden = outputs[0]
    hidden, shifted = shift_for_next_token(hidden, labels, shift_labels)
    if dftkern_head is not None:
        return call_with_head(self, state.transform, dftkern_head, hidden, shifted)

    def head_fn(h: torch.Tensor, y: torch.Tensor, head: LMHead):
        common = {"ignore_index": state.ignore_index, "chunk_bytes": state.chunk_bytes, "backend": state.backend,
                  **head.kwargs()}
        if mode == "loss":
            return _hf_causal_lm_output(h, y, head.weight, common, num_items_in_batch, outputs)
        logp, entropy = token_logprobs(h, head.weight, y, return_entropy=state.return_entropy, **common)
        return TokenLogprobsOutput(token_logps=logp, entropy=entropy, label_mask=y != state.ignore_index,
                                   cache=_cache_of(outputs), hidden_states=getattr(outputs, "hidden_states", None),
                                   attentions=getattr(outputs, "attentions", None))

    result = call_with_head(self, state.transform, head_fn, hidden, shifted)
    return result.to_tuple() if return_dict is False else result


def _cache_of(outputs):
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


def _hf_causal_lm_output(hidden, labels, weight, common: dict, num_items_in_batch, outputs):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    total = fused_linear_cross_entropy(hidden, weight, labels, reduction="sum", **common)
    if num_items_in_batch is None:
        # Hugging Face's mean over the non-ignored tokens; with none, its loss is NaN (0 / 0) and its
        # gradients are 0: the same here, without a host sync
        count = (labels != common["ignore_index"]).sum().to(total.device)
        loss = total / count.clamp_min(1) + torch.where(count == 0, torch.nan, 0.0).to(total.dtype)
    else:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    extra = {"hidden_states": getattr(outputs, "hidden_states", None),
             "attentions": getattr(outputs, "attentions", None)}
    cache = _cache_of(outputs)
    fields = CausalLMOutputWithPast.__dataclass_fields__
    extra["cache" if "cache" in fields else "past_key_values"] = cache
    return CausalLMOutputWithPast(loss=loss, logits=None, **extra)


def _engine_has_entropy() -> bool:
    return "return_entropy" in inspect.signature(fused_linear_logprobs).parameters


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   return_entropy: bool = False, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logp, entropy-or-None)`` from :func:`dftkern.fused_linear_logprobs`, both fp32 ``labels.shape``.

    Raises:
        NotImplementedError: ``return_entropy=True`` with a dftkern build whose
            ``fused_linear_logprobs`` has no ``return_entropy`` argument.
    """
    if not return_entropy:
        return fused_linear_logprobs(hidden, weight, labels, **kwargs), None
    if not _engine_has_entropy():
        raise NotImplementedError("return_entropy=True needs dftkern.fused_linear_logprobs(..., return_entropy=True), "
                                  "which this dftkern build does not have")
    logp, entropy = fused_linear_logprobs(hidden, weight, labels, return_entropy=True, **kwargs)
    return logp, entropy


def _verify(model) -> None:
    """Compare the patched loss with the original forward's on a random batch (see ``verify``)."""
    state: _PatchState = model._dftkern_patch
    weight = linear_head(model).weight
    vocab = weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 8), generator=gen).to(weight.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = state.original_forward(input_ids=ids, labels=ids, use_cache=False).loss.float()
            got = model(input_ids=ids, labels=ids, use_cache=False, dftkern_output="loss").loss.float()
    finally:
        model.train(was_training)
    tol = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 2e-2
    if not torch.allclose(got, expected, rtol=tol, atol=tol):
        raise ValueError(f"patch_causal_lm's check at patch time (verify): the patched loss {got.item():.6f} differs "
                         f"from {type(model).__name__}'s own {expected.item():.6f}; this family transforms its logits "
                         f"or hidden states in a way dftkern does not know, so it is not patched")
