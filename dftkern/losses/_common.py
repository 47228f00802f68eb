"""Checks and helpers shared by the loss functions (small tensors only)."""

from __future__ import annotations

import math

import torch

from .._validation import validation_enabled


def count_rows(hidden: torch.Tensor, cu_seqlens) -> int:
    """Number of sequences (rows) in a padded ``[R, T, H]`` or packed (``cu_seqlens [R+1]``) batch."""
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if cu_seqlens is None:
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be [R, T, H] (or packed [N, H] with cu_seqlens), got {tuple(hidden.shape)}")
        return hidden.shape[0]
    return (cu_seqlens.numel() if isinstance(cu_seqlens, torch.Tensor) else len(cu_seqlens)) - 1


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_float(name: str, value, *, low=None, high=None, low_open=True, high_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    ok = True
    if low is not None:
        ok &= value > low if low_open else value >= low
    if high is not None:
        ok &= value < high if high_open else value <= high
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low if low is not None else '-inf'}, "
                         f"{high if high is not None else 'inf'}{hi}, got {value!r}")
    return float(value)


def check_float_tensor(name: str, value, shape: tuple[int, ...], device: torch.device,
                       validate: bool | None) -> torch.Tensor:
    """A float tensor of exactly ``shape``; NaN/inf rejected when it costs no device sync (or validate)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {list(shape)}, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {value.dtype}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(value.shape)}")
    if not value.is_cuda or validation_enabled(validate):
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} contains NaN or inf")
    return value.to(device=device, dtype=torch.float32)


def check_ids(ids, n_groups: int, num_examples: int, device: torch.device, validate: bool | None) -> torch.Tensor:
    """ids: int64 ``[G]``, each in ``[0, num_examples)``, no duplicates (checked on CPU or with validate)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be an int64 tensor of shape [{n_groups}], got {type(ids).__name__}")
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
    if tuple(ids.shape) != (n_groups,):
        raise ValueError(f"ids must have shape [{n_groups}] (one per group), got {list(ids.shape)}")
    if not ids.is_cuda or validation_enabled(validate):
        if n_groups and (int(ids.min()) < 0 or int(ids.max()) >= num_examples):
            raise ValueError(f"ids must be in [0, {num_examples}) (DFTState size), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        if torch.unique(ids).numel() != n_groups:
            raise ValueError("ids must not contain duplicates within one call")
    return ids.to(device=device, dtype=torch.int64)


def in_backward_recompute() -> bool:
    """True while the autograd engine runs a backward (e.g. activation-checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1
