"""Per-example state of DFT's moving-average denominator estimator ``u``."""

from __future__ import annotations

import math
from collections import deque

import torch

from .._validation import ArgumentTypeError

__all__ = ["DFTState"]


class DFTState:
    """Holds ``u_i`` (log-space moving average of DFT's partition estimate) for every training example.

    Args:
        num_examples: size of the dataset (ids index into ``u``).
        init: initial value of every ``u_i`` (the paper's ``u_init``; default 0.0).
        device: where ``u`` lives (move later with :meth:`to`).

    Attributes:
        u: float32 ``[num_examples]``.
        num_updates: int64 ``[num_examples]``, how many times each ``u_i`` was updated.

    ``u`` stays finite: :meth:`write` skips non-finite values and the groups the loss marks as not
    updatable (non-finite scores, no negative response token), and :meth:`load_state_dict` rejects
    a state with non-finite ``u``.

    Under ``torch.distributed`` (initialized, world size > 1) every update is all-gathered so all
    ranks hold identical state after each step, although each rank sees different ids (updates
    are applied in rank order, so a duplicated id resolves identically everywhere).
    """

    def __init__(self, num_examples: int, init: float = 0.0, device: torch.device | str | None = None):
        if isinstance(num_examples, bool) or not isinstance(num_examples, int):
            raise ArgumentTypeError(f"num_examples must be a positive int, got {num_examples!r}")
        if num_examples <= 0:
            raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
        if isinstance(init, bool) or not isinstance(init, (int, float)):
            raise ArgumentTypeError(f"init must be a finite number, got {init!r}")
        if not math.isfinite(init):
            raise ValueError(f"init must be a finite number, got {init!r}")
        self.num_examples = num_examples
        self.init = float(init)
        self.u = torch.full((num_examples,), float(init), dtype=torch.float32, device=device)
        self.num_updates = torch.zeros(num_examples, dtype=torch.int64, device=device)
        self.sync_distributed = True
        # (ids, u_written) of recent updates, newest last: an activation-checkpoint recomputation of
        # a forward (backward runs them newest first) reads its values instead of updating twice.
        self._recent_updates: deque = deque(maxlen=64)

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"u": self.u.detach().cpu().clone(), "num_updates": self.num_updates.cpu().clone(),
                "init": self.init, "num_examples": self.num_examples}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`. Checks everything first (a rejected load changes nothing):
        the keys, ``num_examples``, ``u`` a finite float tensor ``[num_examples]``, ``num_updates`` a
        non-negative integer tensor ``[num_examples]``, ``init`` a finite number."""
        if not isinstance(state, dict):
            raise TypeError(f"DFTState.load_state_dict: state must be a dict, got {type(state).__name__}")
        for key in ("u", "num_updates", "init", "num_examples"):
            if key not in state:
                raise ValueError(f"DFTState.load_state_dict: missing key {key!r}")
        u, num_updates, init, num_examples = (state[k] for k in ("u", "num_updates", "init", "num_examples"))
        if isinstance(num_examples, bool) or not isinstance(num_examples, int):
            raise TypeError(f"DFTState.load_state_dict: num_examples must be an int, got {type(num_examples).__name__}")
        if not isinstance(u, torch.Tensor) or not u.is_floating_point():
            raise TypeError(f"DFTState.load_state_dict: u must be a float tensor, got "
                            f"{u.dtype if isinstance(u, torch.Tensor) else type(u).__name__}")
        if not isinstance(num_updates, torch.Tensor) or num_updates.is_floating_point() \
                or num_updates.is_complex() or num_updates.dtype == torch.bool:
            raise TypeError(f"DFTState.load_state_dict: num_updates must be an integer tensor, got "
                            f"{num_updates.dtype if isinstance(num_updates, torch.Tensor) else type(num_updates).__name__}")
        if num_examples != self.num_examples or tuple(u.shape) != (self.num_examples,):
            raise ValueError(f"DFTState.load_state_dict: state is for {num_examples} examples (u {list(u.shape)}), "
                             f"this DFTState has {self.num_examples}")
        if tuple(num_updates.shape) != (self.num_examples,):
            raise ValueError(f"DFTState.load_state_dict: num_updates must have shape [{self.num_examples}], got "
                             f"{list(num_updates.shape)}")
        u = u.to(torch.float32)  # checked as stored: a float64 1e39 becomes inf in float32
        if not bool(torch.isfinite(u).all()):
            bad = int((~torch.isfinite(u)).sum())
            raise ValueError(f"DFTState.load_state_dict: u contains {bad} non-finite value(s) in float32 (NaN/inf, "
                             f"or beyond float32's range)")
        if num_examples and int(num_updates.min()) < 0:
            raise ValueError("DFTState.load_state_dict: num_updates must be >= 0")
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init):
            raise ValueError(f"DFTState.load_state_dict: init must be a finite number, got {init!r}")
        self.u.copy_(u)
        self.num_updates.copy_(num_updates.to(torch.int64))
        self.init = float(init)
        self._recent_updates.clear()

    def to(self, device) -> DFTState:
        """Move in place (returns self, like ``nn.Module.to``)."""
        self.u = self.u.to(device)
        self.num_updates = self.num_updates.to(device)
        self._recent_updates.clear()
        return self

    @property
    def device(self) -> torch.device:
        return self.u.device

    def __repr__(self) -> str:
        return f"DFTState(num_examples={self.num_examples}, init={self.init}, device={self.device})"

    # -- updates -------------------------------------------------------------------------------
    def write(self, ids: torch.Tensor, u_new: torch.Tensor, update: torch.Tensor | None = None) -> None:
        """Set ``u[ids] = u_new`` where ``update`` (bool ``[len(ids)]``, default all) holds and ``u_new`` is
        finite, counting those in ``num_updates``; the other ids keep their value. Synced across
        ranks when distributed (only the written ids travel)."""
        ids = ids.to(self.u.device, torch.int64)
        u_new = u_new.detach().to(self.u.device, torch.float32)
        # an activation-checkpoint replay must reuse the values the forward used, written or not
        self._recent_updates.append([ids.clone(), u_new.clone(), False])
        keep = torch.isfinite(u_new)
        if update is not None:
            keep = keep & update.to(self.u.device, torch.bool)
        if self.sync_distributed and _distributed_world_size() > 1:
            ids, u_new = _all_gather_updates(ids[keep], u_new[keep])
            self.u[ids] = u_new
            self.num_updates[ids] += 1
            return
        # no boolean indexing: no host sync on CUDA (ids are unique within a call)
        self.u[ids] = torch.where(keep, u_new, self.u[ids])
        self.num_updates[ids] += keep.to(torch.int64)

    def take_recomputed_values(self, ids: torch.Tensor) -> torch.Tensor | None:
        """For an activation-checkpoint recomputation: the u written by the newest not-yet-replayed
        update for exactly these ids (marked replayed), or None."""
        for entry in reversed(self._recent_updates):
            last_ids, last_u, replayed = entry
            if replayed or last_ids.shape != ids.shape:
                continue
            if bool((last_ids == ids.to(last_ids.device, torch.int64)).all()):
                entry[2] = True
                return last_u
        return None


def _distributed_world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_gather_updates(ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather variable-length (ids, values) from every rank, concatenated in rank order."""
    import torch.distributed as dist

    world = dist.get_world_size()
    backend_device = ids.device
    if dist.get_backend() == "nccl" and ids.device.type != "cuda":
        backend_device = torch.device("cuda", torch.cuda.current_device())
    n_local = torch.tensor([ids.numel()], dtype=torch.int64, device=backend_device)
    sizes = [torch.zeros_like(n_local) for _ in range(world)]
    dist.all_gather(sizes, n_local)
    sizes_host = [int(s.item()) for s in sizes]
    max_n = max(sizes_host)
    pad_ids = torch.zeros(max_n, dtype=torch.int64, device=backend_device)
    pad_vals = torch.zeros(max_n, dtype=torch.float32, device=backend_device)
    pad_ids[: ids.numel()] = ids.to(backend_device)
    pad_vals[: ids.numel()] = values.to(backend_device)
    all_ids = [torch.empty_like(pad_ids) for _ in range(world)]
    all_vals = [torch.empty_like(pad_vals) for _ in range(world)]
    dist.all_gather(all_ids, pad_ids)
    dist.all_gather(all_vals, pad_vals)
    ids_out = torch.cat([t[:n] for t, n in zip(all_ids, sizes_host)]).to(ids.device)
    vals_out = torch.cat([t[:n] for t, n in zip(all_vals, sizes_host)]).to(ids.device)
    # later ranks win on duplicates: keep each id's last occurrence so indexing is well defined
    if ids_out.numel():
        order = torch.arange(ids_out.numel(), device=ids_out.device)
        last = torch.full((int(ids_out.max()) + 1,), -1, dtype=torch.int64, device=ids_out.device)
        last.scatter_reduce_(0, ids_out, order, reduce="amax")
        keep = last[ids_out] == order
        ids_out, vals_out = ids_out[keep], vals_out[keep]
    return ids_out, vals_out
