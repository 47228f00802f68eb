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
        self.acc_dtype = compute_dtype(weight.dtype)
        self.native_mixed = weight.is_cuda and weight.dtype in (torch.float16, torch.bfloat16)
        if self.dtype == self.acc_dtype or self.native_mixed:
            self.weight_acc = None
        else:
            self.weight_acc = weight.to(self.acc_dtype)

    @property
    def grad_dtype(self) -> torch.dtype:
        """dtype in which the epilogue writes d(logits): the operand dtype of the grad products."""
        return self.dtype if self.weight_acc is None else self.acc_dtype

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [n, H]`` (dtype T) -> raw logits ``[n, V]`` in the compute dtype."""
        if self.native_mixed:
            return torch.mm(hidden, self.weight.t(), out_dtype=torch.float32)
        if self.weight_acc is not None:
            return torch.mm(hidden.to(self.acc_dtype), self.weight_acc.t())
        return torch.mm(hidden, self.weight.t())

    def grad_hidden(self, grad_logits: torch.Tensor) -> torch.Tensor:
        """``d(logits) [n, V]`` -> ``dH [n, H]`` in dtype T."""
        w = self.weight if self.weight_acc is None else self.weight_acc
        return torch.mm(grad_logits, w).to(self.dtype)

    def accumulate_grad_weight(self, grad_weight_acc: torch.Tensor, grad_logits: torch.Tensor,
                               hidden: torch.Tensor) -> None:
        """``grad_weight_acc [V, H]`` (compute dtype) += ``d(logits).T @ hidden``."""
        if self.native_mixed:
            grad_weight_acc.add_(torch.mm(grad_logits.t(), hidden, out_dtype=torch.float32))
        elif self.weight_acc is not None:
            grad_weight_acc.addmm_(grad_logits.t(), hidden.to(self.acc_dtype))
        else:
            grad_weight_acc.addmm_(grad_logits.t(), hidden)


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
                    out_dtype: torch.dtype) -> torch.Tensor:
        """``g * (onehot - softmax(z)) * dz/dx`` for a chunk of raw logits ``x``.

        ``grad_logp`` must be 0 on ignored rows. May overwrite ``logits``.
        """
        z = self._transformed(logits, bias, tf)  # ``logits`` itself when there is no transform
        if tf.softcap is not None:
            # z = c * tanh(a / c), a = x / T:  dz/dx = (1 - (z / c)^2) / T
            dz_dx = (z / tf.softcap).square_().neg_().add_(1.0).mul_(tf.inv_temperature)
        else:
            dz_dx = tf.inv_temperature
        grad = z.sub_(lse.unsqueeze(1)).exp_().mul_(-grad_logp.unsqueeze(1))
        rows = torch.arange(labels.shape[0], device=labels.device)
        ignored = labels == tf.ignore_index
        safe = torch.where(ignored, torch.zeros_like(labels), labels)
        grad[rows, safe] += torch.where(ignored, torch.zeros_like(grad_logp), grad_logp).to(grad.dtype)
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

    def grad_logits(self, logits, bias, labels, lse, grad_logp, tf: LogitTransform, out_dtype):
        from .kernels import launch_row_grad

        out = logits if out_dtype == logits.dtype else torch.empty_like(logits, dtype=out_dtype)
        return launch_row_grad(logits, bias, labels, lse, grad_logp.to(torch.float32).contiguous(), out,
                               inv_temperature=tf.inv_temperature, softcap=tf.softcap)
