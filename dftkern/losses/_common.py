"""Checks and helpers shared by the fused loss entry points (small tensors only)."""

from __future__ import annotations

import torch

from .._validation import cu_seqlens_bounds, validation_enabled


def count_rows(hidden, labels, cu_seqlens) -> int:
    """Number of sequences (rows) of a padded or packed batch, with a message naming the expected layout.

    Padded: ``hidden [R, T, H]``, ``labels [R, T]``, ``cu_seqlens=None``. Packed: ``hidden [N, H]``,
    ``labels [N]``, ``cu_seqlens [R+1]`` (a 1-D integer tensor or a list/tuple of ints).
    """
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of int64, got {type(labels).__name__}")
    if cu_seqlens is None:
        if hidden.dim() == 2:
            raise ValueError(f"hidden {list(hidden.shape)} is the packed layout [N, H] but cu_seqlens is None: pass "
                             f"cu_seqlens [R+1] for packed rows, or hidden [R, T, H] with labels [R, T] (padded)")
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be padded [R, T, H] (or packed [N, H] with cu_seqlens), got "
                             f"{list(hidden.shape)}")
        if tuple(labels.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"the padded layout (no cu_seqlens) expects labels [R, T] = {list(hidden.shape[:2])}, "
                             f"got {list(labels.shape)}")
        return hidden.shape[0]
    bounds = cu_seqlens_bounds(cu_seqlens)
    n_bounds = bounds.numel() if isinstance(bounds, torch.Tensor) else len(bounds)
    if hidden.dim() != 2:
        raise ValueError(f"cu_seqlens is given, so the packed layout is expected: hidden [N, H] and labels [N]; got "
                         f"hidden {list(hidden.shape)} (for padded rows [R, T, H] leave cu_seqlens=None)")
    if tuple(labels.shape) != (hidden.shape[0],):
        raise ValueError(f"the packed layout (cu_seqlens given) expects labels [N] = [{hidden.shape[0]}], got "
                         f"{list(labels.shape)}")
    if n_bounds < 2:
        raise ValueError(f"cu_seqlens must hold R+1 >= 2 offsets, got {n_bounds}")
    return n_bounds - 1


def check_bool(name: str, value) -> bool:
    """A flag must be a real ``bool`` (not ``"yes"``, 1 or None)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")
    return value


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def loss_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype of a loss's per-sequence math: float64 for float64 inputs (reference checks), else float32."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def check_float_tensor(name: str, value, shape: tuple[int, ...], device: torch.device,
                       validate: bool | None, *, always_check_finite: bool = False,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A float tensor of exactly ``shape``, returned as ``dtype`` (float32) on ``device`` (detached).

    NaN/inf are rejected where it costs no device sync (CPU), with ``validate``, or with
    ``always_check_finite``.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {list(shape)}, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {value.dtype}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(value.shape)}")
    if always_check_finite or not value.is_cuda or validation_enabled(validate):
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} contains NaN or inf")
    return value.detach().to(device=device, dtype=dtype)


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

