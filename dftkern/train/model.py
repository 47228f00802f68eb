"""Models: load a local Hugging Face causal LM, pick the attention kernel, run the backbone.

The trainer never materializes logits: :func:`backbone_hidden` returns the backbone's last hidden
state and :func:`lm_head_params` the LM-head weight/bias, which go straight into dftkern's fused
losses. :class:`PolicyWithLoss` puts backbone + head + loss in one ``forward`` so that, under FSDP2
(``fully_shard``), the LM-head weight is unsharded while the loss reads it.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .batching import Batch
from .options import Choice, Device, Flag, Text, option, validate
from .prefix_sharing import SharedPromptBatch, shared_forward
from .util import DTYPE_CHOICES

__all__ = [
    "ATTN_CHOICES",
    "PACKING_CHOICES",
    "ModelConfig",
    "resolve_attn",
    "use_packing",
    "resolve_device",
    "load_tokenizer",
    "load_causal_lm",
    "backbone_hidden",
    "lm_head_params",
    "logit_softcap",
    "vocab_size",
    "config_vocab_size",
    "PolicyWithLoss",
    "score_rows",
    "token_logps_rows",
]

ATTN_CHOICES = ("auto", "flash_attention_2", "sdpa", "eager", "flex_attention")
PACKING_CHOICES = ("auto", "on", "off")


@dataclass
class ModelConfig:
    """The model a stage loads, and how: shared by every stage config (``GenerateConfig.model``, ...).

    On the command line: ``--model PATH --device --attn --trust-remote-code --no-chat-template``.
    """

    path: str = option(spec=Text(), help="local Hugging Face causal-LM directory (a model or a checkpoint)",
                       name="model")
    device: str = option("auto", Device(), "'auto' (CUDA if available, cuda:LOCAL_RANK under torchrun; else CPU), "
                         "'cpu', 'cuda:N'", group="model")
    attn: str = option("auto", Choice(ATTN_CHOICES), "attention kernel; auto = flash_attention_2 when flash-attn is "
                       "importable on CUDA, else sdpa (train --share-prompt: sdpa)", group="model")
    trust_remote_code: bool = option(False, Flag(), "allow model/tokenizer code from the model directory (off by "
                                     "default)", group="model")
    use_chat_template: bool = option(True, Flag(), "do not apply the tokenizer's chat template even if it has one",
                                     flag="--no-chat-template", group="model")

    def __post_init__(self):
        validate(self)


# -- options several stage configs share (declared once here) -------------------------------------
def progress_option():
    return option(True, Flag(), "hide progress bars", flag="--no-progress", group="model")


def dtype_option():
    return option("auto", Choice(DTYPE_CHOICES), "weights dtype for inference; auto = bfloat16 on CUDA, float32 on "
                  "CPU", group="model")


def packing_option(help_suffix: str = ""):
    return option("auto", Choice(PACKING_CHOICES), "packed variable-length batches (position_ids/cu_seqlens); "
                  "auto = on with flash_attention_2, padding otherwise" + help_suffix)


def cuda_device_problem(device: torch.device) -> str | None:
    """Why this machine cannot run on ``device`` (a CUDA device it lacks), or None (CPU, or a usable GPU)."""
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return f"CUDA is not available on this machine (torch {torch.__version__}, torch.cuda.is_available() is False)"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> the local CUDA device (``LOCAL_RANK`` under torchrun) if available, else CPU.

    Raises:
        ValueError: (naming ``--device``) a device that is not cpu/cuda/cuda:N, or a CUDA device this
            machine does not have -- never a silent CPU run, never a traceback from deep inside torch.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    problem = cuda_device_problem(resolved)
    if problem:
        raise ValueError(f"--device {device!r}: {problem}")
    return resolved


def resolve_attn(attn: str, device: torch.device) -> str:
    """``"auto"`` -> ``flash_attention_2`` when flash-attn is importable and the device is CUDA, else ``sdpa``."""
    if attn not in ATTN_CHOICES:
        raise ValueError(f"attn must be one of {ATTN_CHOICES}, got {attn!r}")
    if attn == "auto":
        return "flash_attention_2" if device.type == "cuda" and _flash_attn_importable() else "sdpa"
    if attn == "flash_attention_2" and not (device.type == "cuda" and _flash_attn_importable()):
        raise ValueError(f"--attn flash_attention_2 needs a CUDA device and the flash-attn package (device "
                         f"{device}, flash-attn {'importable' if _flash_attn_importable() else 'not importable'}); "
                         f"use --attn auto, sdpa or eager")
    return attn


@functools.cache
def _flash_attn_importable() -> bool:
    """True when ``import flash_attn`` works (a broken build counts as absent)."""
    try:
        importlib.import_module("flash_attn")
    except Exception:
        return False
    return True


def use_packing(packing: str, attn_implementation: str) -> bool:
    """``"auto"`` packs exactly when FlashAttention-2 is the attention kernel."""
    if packing not in PACKING_CHOICES:
        raise ValueError(f"packing must be 'auto', 'on' or 'off', got {packing!r}")
    return packing == "on" or (packing == "auto" and attn_implementation == "flash_attention_2")


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """``AutoTokenizer`` from a local directory; a missing pad token falls back to EOS."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer/model directory not found: {path}")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer at {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, *, attn: str = "auto", device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                   attn_device: torch.device | None = None, strict: bool = False):
    """``AutoModelForCausalLM`` from a local directory with the resolved attention implementation.

    Returns the model on ``device`` in ``dtype`` (trainable master weights should stay float32;
    generation and reference scoring may use bfloat16 on GPU). ``attn_device`` is the device the
    model will run on when it differs from ``device`` (FSDP loads on CPU, shards, then moves), so
    ``attn="auto"`` picks the kernel for the right device. ``strict=True`` (used when resuming):
    safetensors weights only, and any missing, unexpected or wrongly shaped weight is a
    ``ValueError`` naming them instead of a freshly initialized tensor.
    """
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {path}")
    device = torch.device(device)
    attn_device = torch.device(attn_device) if attn_device is not None else None
    kwargs = dict(attn_implementation=resolve_attn(attn, attn_device or device), dtype=dtype,
                  trust_remote_code=trust_remote_code)
    if not strict:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device)
    model, info = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, output_loading_info=True, **kwargs)
    problems = {kind: sorted(map(str, info.get(kind) or ())) for kind in ("missing_keys", "unexpected_keys",
                                                                          "mismatched_keys", "error_msgs")}
    problems = {kind: names for kind, names in problems.items() if names}
    if problems:
        detail = "; ".join(f"{kind.replace('_', ' ')}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                           for kind, names in problems.items())
        raise ValueError(f"{path}: the weights do not match config.json ({detail})")
    return model.to(device)


def lm_head_params(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight ``[V, H]`` and bias ``[V]`` (or None)."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"{type(model).__name__} has no linear LM head (get_output_embeddings() is {head!r})")
    return head.weight, getattr(head, "bias", None)


def vocab_size(model) -> int:
    """Token ids a loaded model accepts: ``[0, V)`` with V the smaller of its embedding and LM-head rows."""
    sizes = [module.weight.shape[0] for module in (model.get_input_embeddings(), model.get_output_embeddings())
             if module is not None and isinstance(getattr(module, "weight", None), torch.Tensor)]
    return min(sizes) if sizes else int(model.config.vocab_size)


def config_vocab_size(path: str, *, trust_remote_code: bool = False) -> int | None:
    """``vocab_size`` from a model directory's config (without loading weights); None if it has none."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    value = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None)
    return int(value) if value else None


def logit_softcap(model) -> float | None:
    """The model's final-logit soft-cap (e.g. Gemma 2's ``final_logit_softcapping``), else None."""
    value = getattr(model.config, "final_logit_softcapping", None)
    return float(value) if value else None


def backbone_hidden(model, batch: Batch) -> torch.Tensor:
    """Last hidden state of the backbone (``model.base_model``), without the LM head.

    Returns ``[R, T, H]`` for a padded batch, ``[N, H]`` for a packed one (the packed rows are kept
    apart by ``position_ids``: FlashAttention-2 and SDPA both build the block-diagonal mask from
    them when no attention mask is given).
    """
    backbone = model.base_model
    if batch.packed:
        out = backbone(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
        return out.last_hidden_state[0]
    out = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return out.last_hidden_state


class PolicyWithLoss(nn.Module):
    """Backbone + LM head + fused loss as one module, the unit FSDP2 shards.

    ``forward(batch, loss_fn=None, **loss_kwargs)`` runs the backbone, then returns
    ``loss_fn(hidden, weight, bias, batch, softcap=..., **loss_kwargs)`` (default: the ``loss_fn``
    given at construction) with the LM-head weight as seen *inside* this forward, i.e. unsharded
    under ``fully_shard``. Under autocast the hidden states and a copy of the head go to the loss in
    the autocast dtype (the fused op wants one dtype; gradients still reach the float32 weights).
    ``forward(lm_inputs={...})`` instead runs the whole causal LM on those keyword arguments (used
    to sample from the policy on-policy, where the sharded parameters must be gathered the same way).

    ``batch`` is a :class:`~.batching.Batch` (padded or packed rows) or a prompt-shared
    :class:`~.prefix_sharing.SharedPromptBatch` (``--share-prompt``): the backbone then runs once
    over each group's prompt and ``loss_fn`` receives the loss-position hidden states ``[N, H]``
    with the packed loss view ``batch.loss_batch`` (:func:`~.prefix_sharing.shared_forward`).
    """

    def __init__(self, causal_lm: nn.Module, loss_fn: Callable, *, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.causal_lm = causal_lm
        self.loss_fn = loss_fn
        self.autocast_dtype = autocast_dtype

    def forward(self, batch: Batch | SharedPromptBatch | None = None, loss_fn: Callable | None = None, *,
                lm_inputs: dict | None = None, **loss_kwargs):
        if lm_inputs is not None:  # a plain causal-LM call (decoding), still inside the sharded root's forward
            device_type = lm_inputs["input_ids"].device.type
            with torch.autocast(device_type, dtype=self.autocast_dtype or torch.bfloat16,
                                enabled=self.autocast_dtype is not None):
                return self.causal_lm(**lm_inputs)
        device_type = batch.input_ids.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            hidden, batch = shared_forward(self.causal_lm, batch)  # a plain Batch: backbone_hidden, batch
        weight, bias = lm_head_params(self.causal_lm)
        compute_dtype = self.autocast_dtype or weight.dtype
        hidden, weight = hidden.to(compute_dtype), weight.to(compute_dtype)
        bias = None if bias is None else bias.to(compute_dtype)
        return (loss_fn or self.loss_fn)(hidden, weight, bias, batch, softcap=logit_softcap(self.causal_lm),
                                         **loss_kwargs)


def score_rows(hidden, weight, bias, batch: Batch, *, softcap=None) -> torch.Tensor:
    """A ``loss_fn`` for :class:`PolicyWithLoss` that returns the rows' sequence log-probs (float32 ``[R]``)."""
    import dftkern

    return dftkern.sequence_logprobs(hidden, weight, batch.labels, cu_seqlens=batch.cu_seqlens, bias=bias,
                                     softcap=softcap, valid_positions=batch.valid_positions)


def token_logps_rows(hidden, weight, bias, batch: Batch, *, softcap=None) -> torch.Tensor:
    """A ``loss_fn`` for :class:`PolicyWithLoss` that returns every label's log-prob (float32, the
    labels' shape, 0 at ignored positions) at the training logit transform (temperature 1, ``softcap``)."""
    import dftkern

    return dftkern.fused_linear_logprobs(hidden, weight, batch.labels, bias=bias, softcap=softcap,
                                         valid_positions=batch.valid_positions)
