"""The two engines: what is done to one chunk of logits, on CUDA (Triton) or anywhere (PyTorch).

A chunk is ``n`` token rows. Both engines share the matrix products (vendor BLAS, fp32 output)
and differ only in the row-wise epilogue:

* :class:`TritonRowEngine` — :mod:`dftkern.kernels` (one streaming pass for ``lse``/target
  (and entropy), one for the gradient; the gradient is written straight into the dtype of the
  next matmul, over the fp32 logits it was computed from).
* :class:`TorchRowEngine` — the same math in PyTorch ops (CPU, fp64, and a fallback on CUDA),
  in row blocks so that its temporaries stay within :data:`TORCH_EPILOGUE_SCRATCH_BYTES`.

Epilogue math, for a row of transformed logits ``z`` (:class:`LogitTransform`) with label ``y``,
``lse = logsumexp(z)``, ``p = softmax(z)``:

* ``logp = z_y - lse``; entropy ``H = -sum_k p_k log p_k = lse - sum_k p_k z_k``.
* upstream gradients ``g`` (of logp) and ``g_H`` (of H) give
  ``d/dz_k = g (1[k = y] - p_k) - g_H p_k (z_k - lse + H)``, times ``dz/dx`` for the transform.

Matrix products, for ``h [n, H]`` and ``W [V, H]`` of dtype ``T`` (:class:`MatmulOps`):

* logits ``h @ W.T`` are produced in fp32 (``torch.mm(..., out_dtype=float32)`` on CUDA for
  fp16/bf16, i.e. cuBLAS with an fp32 result; on CPU the operands are upcast). They are never
  rounded to ``T`` before the softmax.
* ``dH = dX @ W`` and ``dW += dX.T @ h`` use operands of dtype ``T`` (``dX`` is written in ``T``
  by the epilogue) with fp32 accumulation inside the product; across chunks ``dW`` is
  accumulated in fp32 (``accum_dtype="fp32"``) or directly in ``T`` (``accum_dtype`` = the
  weight's dtype: one rounding to ``T`` per chunk, no fp32 ``[V, H]`` buffer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "LogitTransform",
    "TorchRowEngine",
    "TritonRowEngine",
    "MatmulOps",
    "compute_dtype",
    "resolve_accum_dtype",
    "TORCH_EPILOGUE_SCRATCH_BYTES",
    "torch_epilogue_block_bytes",
]

# Whether ``torch.addmm(fp32_acc, half, half, out_dtype=float32, out=fp32_acc)`` works (None: untried).
_MIXED_ADDMM_IN_PLACE: bool | None = None

TORCH_EPILOGUE_SCRATCH_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}
"""Bytes of one temporary of the torch engine's epilogue (a block of rows of one logit chunk), per
device type (other devices: the CPU value). It holds at most two at once in the forward and three
in the gradient (:meth:`TorchRowEngine.grad_logits`), each at most the size of the chunk itself.
On CUDA the blocks are larger so that a chunk takes few kernel launches."""


def torch_epilogue_block_bytes(device: torch.device) -> int:
    """:data:`TORCH_EPILOGUE_SCRATCH_BYTES` for a device."""
    return TORCH_EPILOGUE_SCRATCH_BYTES.get(device.type, TORCH_EPILOGUE_SCRATCH_BYTES["cpu"])


@dataclass(frozen=True)
class LogitTransform:
    """``z = softcap * tanh(((h.w + b) / temperature) / softcap)`` (softcap optional)."""

    temperature: float = 1.0
    softcap: float | None = None
    ignore_index: int = -100

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature

    @property
    def is_identity(self) -> bool:
        return self.temperature == 1.0 and self.softcap is None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for an input dtype: float64 stays float64, everything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_ACCUM_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                "fp64": torch.float64, "float64": torch.float64}


def resolve_accum_dtype(accum_dtype, weight: torch.Tensor) -> torch.dtype:
    """The dtype in which ``dW`` is accumulated across chunks.

    ``accum_dtype``: ``"fp32"`` (default; fp64 for fp64 weights) or the weight's own dtype, given
    as ``"weight"``, a name (``"bf16"``, ``"fp16"``, ...) or a ``torch.dtype``.
    """
    full = compute_dtype(weight.dtype)
    if isinstance(accum_dtype, str):
        key = accum_dtype.strip().lower()
        if key == "weight":
            return weight.dtype
        if key not in _ACCUM_NAMES:
            raise ValueError(f"accum_dtype must be 'fp32', 'weight' or the weight's dtype ({weight.dtype}), "
                             f"got {accum_dtype!r}")
        accum_dtype = _ACCUM_NAMES[key]
    if not isinstance(accum_dtype, torch.dtype):
        raise TypeError(f"accum_dtype must be a str or torch.dtype, got {type(accum_dtype).__name__}")
    if accum_dtype == torch.float32 or accum_dtype == full:
        return full
    if accum_dtype == weight.dtype:
        return weight.dtype
    raise ValueError(f"accum_dtype must be 'fp32' or the weight's dtype ({weight.dtype}), got {accum_dtype}")


class MatmulOps:
    """The three products of the chunked schedule, with fp32 (or fp64) results where needed.

    ``weight_acc`` is ``W`` in the compute dtype when the device cannot multiply half-precision
    operands into an fp32 result (CPU): built once per call and reused by every chunk.
    """

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.dtype = weight.dtype
        self.acc_dtype, self.grad_dtype = self.dtypes(weight)
        self.native_mixed = self._native_mixed(weight)
        self.weight_acc = None if self.grad_dtype == self.dtype else weight.to(self.acc_dtype)

    @staticmethod
    def _native_mixed(weight: torch.Tensor) -> bool:
        return weight.is_cuda and weight.dtype in (torch.float16, torch.bfloat16)

    @staticmethod
    def dtypes(weight: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
        """``(acc_dtype, grad_dtype)`` for a weight, without building anything: the compute dtype of
        logits and accumulators, and the dtype in which the epilogue writes d(logits) (the operand
        dtype of the gradient products: the input dtype where the device multiplies it into fp32
        natively, else the compute dtype)."""
        acc = compute_dtype(weight.dtype)
        native = weight.dtype == acc or MatmulOps._native_mixed(weight)
        return acc, (weight.dtype if native else acc)

    def _weight_operand(self, v0: int = 0, v1: int | None = None) -> torch.Tensor:
        w = self.weight if self.weight_acc is None else self.weight_acc
        return w if (v0 == 0 and v1 is None) else w[v0:v1]

    def _hidden_operand(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.weight_acc is None else hidden.to(self.acc_dtype)

    def logits(self, hidden: torch.Tensor, v0: int = 0, v1: int | None = None) -> torch.Tensor:
        """``hidden [n, H]`` (dtype T) -> raw logits ``[n, v1 - v0]`` of vocabulary rows ``v0:v1``, compute dtype."""
        w = self._weight_operand(v0, v1)
        if self.native_mixed:
            return torch.mm(hidden, w.t(), out_dtype=torch.float32)
        return torch.mm(self._hidden_operand(hidden), w.t())

    def _accumulate(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """``acc += a @ b`` in place (cuBLAS beta=1) where the installed torch supports it.

        ``acc`` is in the compute dtype, or in the operands' half dtype (bf16/fp16 accumulation).
        Where the operands were upcast (CPU) and ``acc`` is half precision, the product is added
        in row blocks no larger than ``a``'s own size, so the temporary stays small.
        """
        global _MIXED_ADDMM_IN_PLACE
        if acc.dtype == a.dtype:
            acc.addmm_(a, b)
            return
        if not self.native_mixed:  # half-precision accumulator, fp32 operands (CPU)
            rows = max(1, a.numel() // max(b.shape[1], 1))
            for r0 in range(0, acc.shape[0], rows):
                acc[r0:r0 + rows].add_(torch.mm(a[r0:r0 + rows], b))
            return
        if _MIXED_ADDMM_IN_PLACE is not False:
            try:
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                _MIXED_ADDMM_IN_PLACE = True
                return
            except (RuntimeError, TypeError):
                _MIXED_ADDMM_IN_PLACE = False
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))

    def grad_hidden(self, grad_logits: torch.Tensor, v0: int = 0, v1: int | None = None) -> torch.Tensor:
        """``d(logits) [n, v1-v0] @ W[v0:v1]`` -> ``[n, H]`` in dtype T."""
        return torch.mm(grad_logits, self._weight_operand(v0, v1)).to(self.dtype)

    def add_grad_hidden(self, acc: torch.Tensor, grad_logits: torch.Tensor, v0: int = 0,
                        v1: int | None = None) -> None:
        """``acc [n, H]`` (compute dtype) += ``d(logits) [n, v1-v0] @ W[v0:v1]``."""
        self._accumulate(acc, grad_logits, self._weight_operand(v0, v1))

    def grad_weight(self, grad_logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """``d(logits).T @ hidden`` -> ``[v, H]`` in dtype T."""
        return torch.mm(grad_logits.t(), self._hidden_operand(hidden)).to(self.dtype)

    def add_grad_weight(self, acc: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
        """``acc [v, H]`` (compute dtype, or T for bf16/fp16 accumulation) += ``d(logits).T @ hidden``."""
        self._accumulate(acc, grad_logits.t(), self._hidden_operand(hidden))


def _half_view(logits: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``[n, v]`` of ``out_dtype`` over the first half of each fp32 row of ``logits`` (row stride 2v):
    the gradient of a row is written over the logits it is computed from, without a second buffer."""
    if out_dtype == logits.dtype:
        return logits
    n, v = logits.shape
    return logits.view(out_dtype)[:, :v]


class TorchRowEngine:
    """Row epilogue in PyTorch ops; works on any device and in float64 (for gradcheck).

    Rows are processed in blocks of at most :func:`torch_epilogue_block_bytes` of logits; each
    block's temporaries are freed before the next, and a gradient block is written over the
    logits it was computed from (after they were read).
    """

    name = "torch"

    @staticmethod
    def _row_blocks(logits: torch.Tensor) -> list[tuple[int, int]]:
        n, v = logits.shape
        rows = max(1, torch_epilogue_block_bytes(logits.device) // max(v * logits.element_size(), 1))
        return [(r, min(r + rows, n)) for r in range(0, n, rows)]

    @staticmethod
    def _transformed(logits: torch.Tensor, bias: torch.Tensor | None, transform: LogitTransform) -> torch.Tensor:
        """``z`` of a block of raw logits: a new tensor, or ``logits`` itself for the identity."""
        z = logits if bias is None else logits + bias.to(logits.dtype)
        if transform.temperature != 1.0:
            z = z * transform.inv_temperature
        if transform.softcap is not None:
            z = torch.tanh(z / transform.softcap) * transform.softcap
        return z

    def lse_and_logp(self, logits: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                     transform: LogitTransform, entropy: bool = False):
        """fp32/fp64 raw logits ``[n, V]`` (read only) -> ``(logp [n], lse [n])``, plus ``entropy [n]``
        when ``entropy``; logp and entropy are 0 where the label is ignore_index."""
        n = logits.shape[0]
        lse = logits.new_empty(n)
        logp = logits.new_empty(n)
        ent = logits.new_empty(n) if entropy else None
        ignored = labels == transform.ignore_index
        safe = torch.where(ignored, torch.zeros_like(labels), labels)
        for r0, r1 in self._row_blocks(logits):
            z = self._transformed(logits[r0:r1], bias, transform)
            row_max = z.amax(1, keepdim=True)
            shifted = z - row_max
            del z
            e = shifted.exp()
            s = e.sum(1)
            lse[r0:r1] = row_max.squeeze(1) + s.log()
            target = shifted.gather(1, safe[r0:r1].unsqueeze(1)).squeeze(1)
            logp[r0:r1] = target - s.log()
            if entropy:
                # H = log s - sum_k e_k (z_k - m) / s, with e_k = exp(z_k - m), s = sum_k e_k
                # e_k = 0 where z_k = -inf (a masked vocabulary entry): its term is 0, not 0 * -inf
                vanished = e == 0
                ent[r0:r1] = s.log() - e.mul_(shifted).masked_fill_(vanished, 0.0).sum(1) / s
                del vanished
            del shifted, e
        logp.masked_fill_(ignored, 0.0)
        if entropy:
            ent.masked_fill_(ignored, 0.0)
            return logp, lse, ent
        return logp, lse

    def grad_logits(self, logits: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                    lse: torch.Tensor, grad_logp: torch.Tensor, transform: LogitTransform,
                    out_dtype: torch.dtype, label_offset: int = 0, *, entropy: torch.Tensor | None = None,
                    grad_entropy: torch.Tensor | None = None) -> torch.Tensor:
        """``d/dx`` of ``sum_r g_r logp_r (+ g_H_r H_r)`` for a chunk of raw logits ``x [n, v]``.

        The chunk may be a vocabulary slice starting at ``label_offset`` (``lse`` and ``entropy``
        are over the full vocabulary). ``grad_logp`` and ``grad_entropy`` must be 0 on ignored
        rows. The result (dtype ``out_dtype``) is written over ``logits``: the returned tensor
        shares its memory (a half-precision view with row stride ``2v`` for fp16/bf16).
        """
        out = _half_view(logits, out_dtype)
        g = grad_logp.to(logits.dtype)
        gh = None if grad_entropy is None else grad_entropy.to(logits.dtype)
        local = labels - label_offset
        hit = (labels != transform.ignore_index) & (local >= 0) & (local < logits.shape[1])
        safe = torch.where(hit, local, torch.zeros_like(local))
        onehot_scale = torch.where(hit, g, torch.zeros_like(g))
        for r0, r1 in self._row_blocks(logits):
            z = self._transformed(logits[r0:r1], bias, transform)
            logp_all = z - lse[r0:r1].unsqueeze(1)  # temporary 1
            grad = logp_all.exp()  # temporary 2: p
            if gh is None:
                grad.mul_(-g[r0:r1].unsqueeze(1))
            else:  # -p (g + g_H (log p + H))
                coef = logp_all.add_(entropy[r0:r1].to(logits.dtype).unsqueeze(1)).mul_(gh[r0:r1].unsqueeze(1))
                # dH/dz = -p (log p + H) -> 0 as p -> 0 (z = -inf would give 0 * inf); NaN p stays NaN
                coef.masked_fill_(grad == 0, 0.0)
                grad.mul_(coef.add_(g[r0:r1].unsqueeze(1))).neg_()
            del logp_all
            rows = torch.arange(r1 - r0, device=logits.device)
            grad[rows, safe[r0:r1]] += onehot_scale[r0:r1]
            if transform.softcap is not None:
                # z = c * tanh(a / c), a = x / T:  dz/dx = (1 - (z / c)^2) / T  (temporary 3)
                grad.mul_((z / transform.softcap).square_().neg_().add_(1.0))
            del z
            if transform.temperature != 1.0:
                grad.mul_(transform.inv_temperature)
            out[r0:r1] = grad  # every read of this block's logits happened above
        return out


class TritonRowEngine:
    """Row epilogue in Triton kernels (:mod:`dftkern.kernels`): CUDA, or CPU under TRITON_INTERPRET=1.

    Works on fp32 logits only (fp64 inputs go to the torch engine).
    """

    name = "triton"

    def lse_and_logp(self, logits, bias, labels, transform: LogitTransform, entropy: bool = False):
        """As :meth:`TorchRowEngine.lse_and_logp` (entropy in the same sweep as the log-sum-exp)."""
        from .kernels import launch_row_lse_target

        return launch_row_lse_target(logits, bias, labels, inv_temperature=transform.inv_temperature,
                                     softcap=transform.softcap, ignore_index=transform.ignore_index,
                                     return_entropy=entropy)

    def grad_logits(self, logits, bias, labels, lse, grad_logp, transform: LogitTransform, out_dtype,
                    label_offset=0, *, entropy=None, grad_entropy=None):
        """As :meth:`TorchRowEngine.grad_logits`. A half-precision result is written in place into
        the first half of each fp32 logit row (a ``[n, v]`` view with row stride ``2v``): no extra buffer."""
        from .kernels import launch_row_grad

        out = _half_view(logits, out_dtype)
        if grad_entropy is not None:
            grad_entropy = grad_entropy.to(torch.float32).contiguous()
            entropy = entropy.to(torch.float32).contiguous()
        return launch_row_grad(logits, bias, labels, lse, grad_logp.to(torch.float32).contiguous(), out,
                               inv_temperature=transform.inv_temperature, softcap=transform.softcap,
                               label_offset=label_offset, entropy=entropy, grad_entropy=grad_entropy)
