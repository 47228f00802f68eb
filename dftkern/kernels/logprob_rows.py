"""Triton row kernels over a chunk of fp32 logits ``[n_rows, V]``.

Both kernels use one program per row and stream the vocabulary in ``BLOCK_V`` tiles, so the
register footprint is independent of ``V``. Offsets are computed in int64 (``row * stride``
passes 2**31 at n_rows * V > 2.1e9, e.g. 16k rows of a 256k vocabulary).

The logit transform shared by both kernels, for a raw product ``x = h . w_v``::

    a = (x + bias_v) * inv_temperature
    z = softcap * tanh(a / softcap)      if HAS_SOFTCAP else a

``_row_lse_target_kernel``  writes ``lse = logsumexp_v z_v`` and ``logp = z_label - lse``
(0 where label == ignore_index, NaN where the label is outside [0, V) — never clamped).

``_row_grad_kernel`` writes ``dx_v = g * (1[v == label] - exp(z_v - lse)) * dz_v/dx_v``,
with ``dz/dx = inv_temperature * (1 - tanh(a / softcap)**2)`` under a softcap, else
``inv_temperature``; ``g`` is the upstream gradient of the row's log-prob (0 for ignored
rows). The output may alias the input (fp32 in place) or be a separate fp16/bf16 buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The finite "minus infinity" of the online max: exp(-1e30 - m) underflows to exactly 0 and
# (-1e30) - (-1e30) = 0 never makes a NaN, unlike -inf - -inf.
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _transform(x, inv_temperature, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw logit (bias added) -> transformed logit z, fp32."""
    a = x * inv_temperature
    if HAS_SOFTCAP:
        # tanh(y) = sign(y) * (1 - e^{-2|y|}) / (1 + e^{-2|y|}); never overflows.
        y = a / softcap
        e = tl.exp(-2.0 * tl.abs(y))
        t = (1.0 - e) / (1.0 + e)
        a = softcap * tl.where(y < 0, -t, t)
    return a


@triton.jit
def _row_lse_target_kernel(
    logits_ptr,  # *fp32 [n_rows, V], row stride = stride_row
    stride_row,
    bias_ptr,  # *T [V] or dummy
    labels_ptr,  # *int64 [n_rows]
    lse_ptr,  # *fp32 [n_rows] out
    logp_ptr,  # *fp32 [n_rows] out
    V,
    inv_temperature,
    softcap,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    cols0 = tl.arange(0, BLOCK_V)

    # Lane-wise online log-sum-exp: each lane keeps its own running max and sum, merged at the end.
    run_max = tl.full([BLOCK_V], _NEG_BIG, tl.float32)
    run_sum = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        in_vocab = cols < V
        x = tl.load(row_ptr + cols, mask=in_vocab, other=0.0)
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols, mask=in_vocab, other=0.0).to(tl.float32)
        z = _transform(x, inv_temperature, softcap, HAS_SOFTCAP)
        z = tl.where(in_vocab, z, _NEG_BIG)
        new_max = tl.maximum(run_max, z)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.where(in_vocab, tl.exp(z - new_max), 0.0)
        run_max = new_max
    row_max = tl.max(run_max, axis=0)
    lse = row_max + tl.log(tl.sum(run_sum * tl.exp(run_max - row_max), axis=0))

    label = tl.load(labels_ptr + row)
    valid = (label >= 0) & (label < V)
    safe_label = tl.where(valid, label, 0)
    x_label = tl.load(row_ptr + safe_label)
    if HAS_BIAS:
        x_label += tl.load(bias_ptr + safe_label).to(tl.float32)
    z_label = _transform(x_label, inv_temperature, softcap, HAS_SOFTCAP)
    logp = tl.where(valid, z_label - lse, float("nan"))
    logp = tl.where(label == ignore_index, 0.0, logp)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, logp)


@triton.jit
def _row_grad_kernel(
    logits_ptr,  # *fp32 [n_rows, V]
    stride_row,
    bias_ptr,  # *T [V] or dummy
    labels_ptr,  # *int64 [n_rows]
    lse_ptr,  # *fp32 [n_rows]
    grad_ptr,  # *fp32 [n_rows]: upstream d(out)/d(logp_row), 0 for ignored rows
    out_ptr,  # *fp32|fp16|bf16 [n_rows, V], row stride = stride_out_row; may alias logits_ptr
    stride_out_row,
    V,
    label_offset,  # the chunk holds vocabulary columns label_offset .. label_offset + V
    inv_temperature,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    OUT_ALIASES_IN: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    out_row_ptr = out_ptr + row * stride_out_row
    label = tl.load(labels_ptr + row) - label_offset
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_ptr + row)
    cols0 = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        in_vocab = cols < V
        x = tl.load(row_ptr + cols, mask=in_vocab, other=0.0)
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols, mask=in_vocab, other=0.0).to(tl.float32)
        z = _transform(x, inv_temperature, softcap, HAS_SOFTCAP)
        prob = tl.exp(z - lse)
        d = g * (tl.where(cols == label, 1.0, 0.0) - prob)
        if HAS_SOFTCAP:
            t = z / softcap
            d = d * (1.0 - t * t)
        d = d * inv_temperature
        if OUT_ALIASES_IN:
            # A half-precision output written over the first half of the fp32 row: element j lands on
            # the bytes of fp32 element j // 2, which every warp must have read first. Tiles after the
            # first only overwrite earlier tiles; the barrier covers the first.
            tl.debug_barrier()
        tl.store(out_row_ptr + cols, d.to(out_ptr.dtype.element_ty), mask=in_vocab)


def _block_v(vocab_size: int) -> int:
    return min(2048, triton.next_power_of_2(max(vocab_size, 16)))


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def launch_row_lse_target(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    inv_temperature: float,
    softcap: float | None,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp and target log-prob of each row of a logit chunk.

    Args:
        logits: fp32 ``[n, V]``, unit stride along V (raw ``h @ W.T``, without bias).
        bias: ``[V]`` (any float dtype) or None.
        labels: int64 ``[n]``.
    Returns:
        ``(logp, lse)``, both fp32 ``[n]``. ``logp`` is 0 at ignore_index and NaN for a label
        outside ``[0, V)``.
    """
    n_rows, vocab_size = logits.shape
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return logp, lse
    block_v = _block_v(vocab_size)
    _row_lse_target_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        bias if bias is not None else logits,
        labels,
        lse,
        logp,
        vocab_size,
        inv_temperature,
        softcap if softcap is not None else 1.0,
        ignore_index,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        BLOCK_V=block_v,
        num_warps=_num_warps(block_v),
    )
    return logp, lse


def launch_row_grad(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    out: torch.Tensor,
    *,
    inv_temperature: float,
    softcap: float | None,
    label_offset: int = 0,
) -> torch.Tensor:
    """Gradient of ``sum_rows grad_logp[r] * logp[r]`` w.r.t. the raw logits of the chunk.

    Args:
        logits: fp32 ``[n, v]`` raw products (no bias) of vocabulary columns
            ``label_offset .. label_offset + v``, unit stride along v; bias: ``[v]`` (that slice) or None.
        labels: int64 ``[n]`` (global vocabulary ids); lse: fp32 ``[n]`` over the whole vocabulary;
            grad_logp: fp32 ``[n]`` (must be 0 on ignored rows).
        out: ``[n, v]`` fp32/fp16/bf16 destination, unit stride along v; may be ``logits`` itself or
            a half-precision view over the same memory (``logits.view(dtype)[:, :v]``).
    Returns:
        ``out``.
    """
    n_rows, vocab_size = logits.shape
    if n_rows == 0:
        return out
    block_v = _block_v(vocab_size)
    _row_grad_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        bias if bias is not None else logits,
        labels,
        lse,
        grad_logp,
        out,
        out.stride(0),
        vocab_size,
        label_offset,
        inv_temperature,
        softcap if softcap is not None else 1.0,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        OUT_ALIASES_IN=out.data_ptr() == logits.data_ptr() and out.dtype != logits.dtype,
        BLOCK_V=block_v,
        num_warps=_num_warps(block_v),
    )
    return out
