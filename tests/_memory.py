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

__all__ = ["LiveTensorBytes", "workspace_bound"]


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


def workspace_bound(path: str, *, n_tokens: int, n_valid: int, chunk_valid: int, hidden_size: int, vocab_size: int,
                    dtype: torch.dtype, engine: str, accum_dtype: str = "fp32", chunks: int = 1,
                    budget: int | None = None, grads: bool = True) -> int:
    """The documented workspace formula (docs/benchmarks.md, "Workspace") of one call, in bytes, on CPU.

    Args:
        path: "forward" (token op, no grad), "recompute" (token op forward + backward, or the
            grouped recompute schedule) or "fused" (gradients in the forward: CE, token loss,
            grouped fused schedule).
        n_tokens/n_valid: N and n; chunk_valid: c, valid tokens in the largest chunk.
        chunks: forward chunks (a fused path accumulates dW across them).
        budget: the chunk budget in bytes (bounds the backward tile).
        grads: whether dH/dW outputs are produced (counted in the workspace).
    """
    from dftkern.engines import torch_epilogue_block_bytes

    e = torch.finfo(dtype).bits // 8
    a = 8 if dtype == torch.float64 else 4
    half_on_cpu = dtype in (torch.float16, torch.bfloat16)  # CPU multiplies half operands upcast
    N, n, c, H, V = n_tokens, n_valid, chunk_valid, hidden_size, vocab_size
    compacted = n < N
    scratch_block = torch_epilogue_block_bytes(torch.device("cpu"))
    # the torch engine's row blocks: two temporaries in the forward epilogue, three in the gradient one
    temporaries = 2 if path == "forward" else 3
    scratch = (lambda tile: 0) if engine == "triton" else (lambda tile: temporaries * min(tile, scratch_block))
    small = 64 * 1024 + 64 * N  # per-token vectors (labels, positions, logp, lse, entropy, grads), constants
    upcast_weight = V * H * a if half_on_cpu else 0
    rows = lambda r: (r * H * e if compacted else 0) + (r * H * a if half_on_cpu else 0)  # noqa: E731
    logits = c * V * a
    if path == "forward":
        return logits + scratch(logits) + rows(c) + upcast_weight + small
    outputs = (N * H * e + V * H * e) if grads else 0
    if path == "recompute":
        tile = max(budget, min(V, 4096) * a) if budget is not None else n * V * a
        tile = min(tile, n * V * a)
        hidden_acc = n * H * (a + e) if tile < n * V * a else 0
        weight_acc = min(V, 4096) * H * a if tile < n * min(V, 4096) * a else 0  # per column tile, rows split
        return (outputs + max(logits + scratch(logits), tile + scratch(tile)) + rows(n) + hidden_acc
                + upcast_weight + weight_acc + small)
    if path == "fused":
        if chunks > 1 and accum_dtype == "fp32" and e != a:
            accumulator = V * H * a  # the fp32 dW accumulator beside the returned dW
        elif half_on_cpu:
            accumulator = max(V * H * a if chunks == 1 else 0, logits)  # CPU: fp32 product before the cast
        else:
            accumulator = 0
        return outputs + logits + scratch(logits) + rows(c) + accumulator + upcast_weight + small
    raise ValueError(f"unknown path {path!r}")
