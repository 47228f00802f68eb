"""A deterministic account of live tensor bytes on CPU (no GPU, no allocator, no RSS noise).

:class:`LiveTensorBytes` is a ``TorchDispatchMode``: every tensor an aten op returns is registered
by its storage (``untyped_storage().data_ptr()``, ``nbytes()``); a ``weakref.finalize`` on each
returned tensor object drops the storage once the last of its tensors is gone. The running sum
is the bytes of all live storages created inside the mode, and :attr:`peak` its maximum, checked
after every op (so an op's output is counted while its inputs are still alive).

What it sees: every storage *allocated* by an aten op under the mode (including autograd's
saved tensors and gradients, the factory calls ``torch.empty``/``zeros``). An output whose
storage is one of the op's inputs' (a view, an in-place or ``out=`` op) allocates nothing: it
only keeps an already counted storage alive, or, for a tensor from before the mode (the inputs,
the weights), is not counted at all. What it does not see: scratch *inside* one aten kernel (e.g.
BLAS packing buffers), Triton interpreter (NumPy) buffers, tensors created before the mode.
That is the right granularity for a workspace formula written in tensors.

Usage::

    with LiveTensorBytes() as account:
        loss = op(...)
        loss.backward()
    account.peak   # bytes
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorBytes"]


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of live storages created while the mode is active; see the module doc."""

    def __init__(self):
        super().__init__()
        self._refs: dict[int, int] = {}  # storage pointer -> live tensor objects seen with it
        self._bytes: dict[int, int] = {}  # storage pointer -> nbytes
        self.live = 0
        self.peak = 0
        self.peak_op = None

    def _release(self, ptr: int) -> None:
        count = self._refs.get(ptr, 0) - 1
        if count > 0:
            self._refs[ptr] = count
            return
        self._refs.pop(ptr, None)
        self.live -= self._bytes.pop(ptr, 0)

    def _track(self, t: torch.Tensor, input_ptrs: set[int]) -> None:
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0:
            return
        if ptr not in self._refs:
            if ptr in input_ptrs:  # a view of (or a write into) a tensor from before the mode
                return
            self._refs[ptr] = 0
            self._bytes[ptr] = nbytes
            self.live += nbytes
        self._refs[ptr] += 1
        weakref.finalize(t, self._release, ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat_in, _ = tree_flatten((args, kwargs))
        input_ptrs = {t.untyped_storage().data_ptr() for t in flat_in if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t, input_ptrs)
        if self.live > self.peak:
            self.peak = self.live
            self.peak_op = str(func)
        return out

