"""The two engines: what is done to one chunk of logits, on CUDA (Triton) or anywhere (PyTorch).

A chunk is ``n`` token rows. Both engines share the matrix products (vendor BLAS, fp32 output)
and differ only in the row-wise epilogue:

* :class:`TritonRowEngine` — :mod:`dftkern.kernels` (one streaming pass for ``lse``/target,
  one for the gradient; the gradient is written straight into the dtype of the next matmul).
* :class:`TorchRowEngine` — the same math in PyTorch ops (CPU, and a fallback on CUDA).

Matrix products, for ``h [n, H]`` and ``W [V, H]`` of dtype ``T``:

* logits ``h @ W.T`` are produced in fp32 (``torch.mm(..., out_dtype=float32)`` on CUDA for
  fp16/bf16, i.e. cuBLAS with an fp32 result; on CPU the operands are upcast). They are never
  rounded to ``T`` before the softmax.
* ``dH = dX @ W`` and ``dW += dX.T @ h`` use operands of dtype ``T`` (``dX`` is written in ``T``
  by the epilogue) with fp32 accumulation inside the product; ``dW`` is accumulated across
  chunks in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LogitTransform", "TorchRowEngine", "TritonRowEngine", "MatmulOps", "compute_dtype"]

# Whether ``torch.addmm(fp32_acc, half, half, out_dtype=float32, out=fp32_acc)`` works (None: untried).
_MIXED_ADDMM_IN_PLACE: bool | None = None


@dataclass(frozen=True)
class LogitTransform:
    """``z = softcap * tanh(((h.w + b) / temperature) / softcap)`` (softcap optional)."""

    temperature: float = 1.0
    softcap: float | None = None
    ignore_index: int = -100

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for an input dtype: float64 stays float64, everything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
        """``acc += a @ b`` with ``acc`` in the compute dtype, in place (cuBLAS beta=1) where the
        installed torch supports a half x half -> fp32 addmm into its input; else via a temporary."""
        global _MIXED_ADDMM_IN_PLACE
        if not self.native_mixed:
            acc.addmm_(a, b)
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
        """``acc [v, H]`` (compute dtype) += ``d(logits).T @ hidden``."""
        self._accumulate(acc, grad_logits.t(), self._hidden_operand(hidden))


class TorchRowEngine:
    """Row epilogue in PyTorch ops; works on any device and in float64 (for gradcheck)."""

    name = "torch"

    @staticmethod
    def _transformed(logits: torch.Tensor, bias: torch.Tensor | None, tf: LogitTransform) -> torch.Tensor:
        z = logits if bias is None else logits + bias.to(logits.dtype)
        if tf.temperature != 1.0:
            z = z * tf.inv_temperature
        if tf.softcap is not None:
            z = torch.tanh(z / tf.softcap) * tf.softcap
        return z

    def lse_and_logp(self, logits: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                     tf: LogitTransform) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32/fp64 logits ``[n, V]`` -> ``(logp [n], lse [n])`` (logp 0 where ignored)."""
        z = self._transformed(logits, bias, tf)
        lse = torch.logsumexp(z, dim=-1)
        ignored = labels == tf.ignore_index
        safe = torch.where(ignored, torch.zeros_like(labels), labels)
        target = z.gather(1, safe.unsqueeze(1)).squeeze(1)
        logp = torch.where(ignored, torch.zeros_like(lse), target - lse)
        return logp, lse

    def grad_logits(self, logits: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                    lse: torch.Tensor, grad_logp: torch.Tensor, tf: LogitTransform,
                    out_dtype: torch.dtype, label_offset: int = 0) -> torch.Tensor:
        """``g * (onehot - softmax(z)) * dz/dx`` for a chunk of raw logits ``x [n, v]``.

        The chunk may be a vocabulary slice starting at ``label_offset`` (``lse`` is over the full
        vocabulary). ``grad_logp`` must be 0 on ignored rows. May overwrite ``logits``.
        """
        z = self._transformed(logits, bias, tf)  # ``logits`` itself when there is no transform
        if tf.softcap is not None:
            # z = c * tanh(a / c), a = x / T:  dz/dx = (1 - (z / c)^2) / T
            dz_dx = (z / tf.softcap).square_().neg_().add_(1.0).mul_(tf.inv_temperature)
        else:
            dz_dx = tf.inv_temperature
        grad = z.sub_(lse.unsqueeze(1)).exp_().mul_(-grad_logp.unsqueeze(1))
        rows = torch.arange(labels.shape[0], device=labels.device)
        local = labels - label_offset
        hit = (labels != tf.ignore_index) & (local >= 0) & (local < grad.shape[1])
        safe = torch.where(hit, local, torch.zeros_like(local))
        grad[rows, safe] += torch.where(hit, grad_logp, torch.zeros_like(grad_logp)).to(grad.dtype)
        if not (isinstance(dz_dx, float) and dz_dx == 1.0):
            grad.mul_(dz_dx)
        return grad.to(out_dtype)


class TritonRowEngine:
    """Row epilogue in Triton kernels (:mod:`dftkern.kernels`): CUDA, or CPU under TRITON_INTERPRET=1.

    Works on fp32 logits only (fp64 inputs go to the torch engine).
    """

    name = "triton"

    def lse_and_logp(self, logits, bias, labels, tf: LogitTransform):
        from .kernels import launch_row_lse_target

        return launch_row_lse_target(logits, bias, labels, inv_temperature=tf.inv_temperature,
                                     softcap=tf.softcap, ignore_index=tf.ignore_index)

    def grad_logits(self, logits, bias, labels, lse, grad_logp, tf: LogitTransform, out_dtype, label_offset=0):
        """As :meth:`TorchRowEngine.grad_logits`. A half-precision result is written in place into
        the first half of each fp32 logit row (a ``[n, v]`` view with row stride ``2v``): no extra buffer."""
        from .kernels import launch_row_grad

        if out_dtype == logits.dtype:
            out = logits
        else:
            n, v = logits.shape
            out = logits.view(out_dtype)[:, :v]  # fp32 row of v = half-precision row of 2v
        return launch_row_grad(logits, bias, labels, lse, grad_logp.to(torch.float32).contiguous(), out,
                               inv_temperature=tf.inv_temperature, softcap=tf.softcap,
                               label_offset=label_offset)
