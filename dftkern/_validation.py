"""Argument checks shared by the public functions. Every error names the argument."""

from __future__ import annotations

import math
import os

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class ArgumentTypeError(TypeError, ValueError):
    """An argument or option of the wrong type (``DFTState(True)``, ``TrainConfig(progress="no")``): a
    TypeError, as Python code expects, and a ValueError, like every other bad setting (the trainer's
    command line reports ValueErrors as one ``error:`` line)."""


_TRUE_FORMS = ("1", "true", "yes", "on")
_FALSE_FORMS = ("", "0", "false", "no", "off")


def validation_enabled(validate: bool | None) -> bool:
    """Opt-in device-side checks that cost a host sync on CUDA (``validate=True`` or ``DFTKERN_VALIDATE=1``).

    ``validate`` must be True, False or None (None: the environment variable decides, whose
    accepted values are 1/true/yes/on and 0/false/no/off, any case).
    """
    if validate is not None:
        if not isinstance(validate, bool):
            raise TypeError(f"validate must be True, False or None, got {validate!r} ({type(validate).__name__})")
        return validate
    return env_flag("DFTKERN_VALIDATE")


def env_flag(name: str) -> bool:
    """A boolean environment variable, parsed strictly: 1/true/yes/on, 0/false/no/off or unset/empty
    (False), any case; anything else is a ValueError listing the accepted forms."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in _TRUE_FORMS:
        return True
    if raw in _FALSE_FORMS:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean; accepted: {'/'.join(_TRUE_FORMS)} or "
                     f"{'/'.join(f for f in _FALSE_FORMS if f)} (any case)")


def check_positive_number(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_tensor(name: str, value, what: str) -> None:
    """TypeError naming ``name`` unless ``value`` is a tensor (``what`` says which one is expected)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor ({what}), got {type(value).__name__}")


def cu_seqlens_bounds(cu_seqlens) -> list[int] | torch.Tensor:
    """``cu_seqlens`` checked for type: a 1-D integer tensor (returned as is: reading its values may
    cost a device sync, which the caller decides) or a list/tuple/range of ints (returned as a list).

    Raises:
        TypeError: anything else (floats, bools, a 2-D tensor, another container), naming the value.
    """
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.is_floating_point() or cu_seqlens.dtype == torch.bool or cu_seqlens.dim() != 1:
            raise TypeError(f"cu_seqlens must be a 1-D integer tensor (or a list of ints), got {cu_seqlens.dtype} "
                            f"{list(cu_seqlens.shape)}")
        return cu_seqlens
    if isinstance(cu_seqlens, (list, tuple, range)):
        bad = [b for b in cu_seqlens if isinstance(b, bool) or not isinstance(b, int)]
        if bad:
            raise TypeError(f"cu_seqlens must be a 1-D integer tensor or a list of ints; it holds {bad[0]!r} "
                            f"({type(bad[0]).__name__})")
        return list(cu_seqlens)
    raise TypeError(f"cu_seqlens must be a 1-D integer tensor, a list of ints or None, got {type(cu_seqlens).__name__}")


def check_row_layout(hidden, cu_seqlens) -> None:
    """The padded-vs-packed layout of the sequence ops, checked before anything else.

    Padded: ``hidden [R, T, H]`` and ``cu_seqlens`` None. Packed: ``hidden [N, H]`` with
    ``cu_seqlens [R+1]``. The message says which layout was expected.
    """
    check_tensor("hidden", hidden, "[R, T, H] padded, or [N, H] packed with cu_seqlens")
    if cu_seqlens is None:
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be padded [R, T, H] (or packed [N, H] with cu_seqlens), got shape "
                             f"{tuple(hidden.shape)}")
    elif hidden.dim() != 2:
        raise ValueError(f"with cu_seqlens, hidden must be packed [N, H] (labels [N]), got shape "
                         f"{tuple(hidden.shape)}; pass a padded [R, T, H] batch without cu_seqlens, or "
                         f"flatten it to [N, H]")


def check_linear_inputs(hidden, weight, labels, bias, ignore_index, temperature, softcap) -> torch.Tensor:
    """Validate the token-op inputs; returns labels as int64 (same device)."""
    check_tensor("hidden", hidden, "[..., H] float")
    check_tensor("weight", weight, "[V, H] float")
    check_tensor("labels", labels, "int64 [...]")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32/float16/bfloat16 (or float64), got {hidden.dtype}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [..., H] with at least 2 dims, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[-1]}] to match hidden [..., H], "
                         f"got weight shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype must equal hidden dtype {hidden.dtype}, got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row (V >= 1)")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape must equal hidden's leading shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != hidden.device:
        raise ValueError(f"labels is on {labels.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [V={weight.shape[0]}], got shape {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias dtype must equal weight dtype {weight.dtype}, got {bias.dtype}")
        if bias.device != weight.device:
            raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_positive_number("temperature", temperature)
    check_positive_number("softcap", softcap, allow_none=True)
    return labels.long()


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int, validate: bool | None) -> None:
    """Raise if a non-ignored label is outside ``[0, V)``.

    On CPU this always runs (it costs no device sync). On CUDA it runs only when validation is
    enabled; otherwise the kernels write NaN for such a token's log-prob (never a clamped value).
    """
    if labels.numel() == 0:
        return
    if labels.is_cuda and not validation_enabled(validate):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        pos = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
        raise ValueError(f"labels{list(pos)} = {int(labels[pos])} is outside [0, V={vocab_size}) "
                         f"and is not ignore_index={ignore_index}")
