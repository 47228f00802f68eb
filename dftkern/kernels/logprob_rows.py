"""Triton row kernels over a chunk of fp32 logits ``[n_rows, V]``.

Both kernels use one program per row and stream the vocabulary in ``BLOCK_V`` tiles, so the
register footprint is independent of ``V``. Offsets are computed in int64 (``row * stride``
passes 2**31 at n_rows * V > 2.1e9, e.g. 16k rows of a 256k vocabulary).

The logit transform shared by both kernels, for a raw product ``x = h . w_v``::

    a = (x + bias_v) * inv_temperature
    z = softcap * tanh(a / softcap)      if HAS_SOFTCAP else a

``_row_lse_target_kernel``  writes ``lse = logsumexp_v z_v`` and ``logp = z_label - lse``
(0 where label == ignore_index, NaN where the label is outside [0, V) — never clamped), and with
``HAS_ENTROPY`` the entropy ``H = -sum_v p_v log p_v`` of ``p = softmax(z)`` from the same sweep:
each lane keeps a running max ``m``, ``s = sum e^(z-m)`` and ``t = sum e^(z-m) (z-m)``; when the
max grows to ``m'`` both are rescaled, ``s' = e^(m-m') s`` and ``t' = e^(m-m') (t + s (m-m'))``,
and at the end ``H = log s - t / s`` (lanes merged to the row max the same way).

``_row_grad_kernel`` writes ``dx_v = (g * (1[v == label] - p_v) - g_H * p_v * (z_v - lse + H))
* dz_v/dx_v`` with ``p_v = exp(z_v - lse)``, ``dz/dx = inv_temperature * (1 - tanh(a / softcap)**2)``
under a softcap, else ``inv_temperature``; ``g`` (``g_H``) is the upstream gradient of the row's
log-prob (entropy), 0 for ignored rows; the ``g_H`` term only with ``HAS_ENTROPY``. The output
may alias the input (fp32 in place) or be an fp16/bf16 buffer (also over the input's memory).
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
    entropy_ptr,  # *fp32 [n_rows] out (HAS_ENTROPY) or dummy
    V,
    inv_temperature,
    softcap,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    cols0 = tl.arange(0, BLOCK_V)

    # Lane-wise online log-sum-exp: each lane keeps its own running max and sum (and, for the
    # entropy, t = sum e^(z - max) (z - max)), merged at the end.
    run_max = tl.full([BLOCK_V], _NEG_BIG, tl.float32)
    run_sum = tl.zeros([BLOCK_V], tl.float32)
    run_t = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        in_vocab = cols < V
        x = tl.load(row_ptr + cols, mask=in_vocab, other=0.0)
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols, mask=in_vocab, other=0.0).to(tl.float32)
        z = _transform(x, inv_temperature, softcap, HAS_SOFTCAP)
        z = tl.where(in_vocab, z, _NEG_BIG)
        new_max = tl.maximum(run_max, z)
        scale = tl.exp(run_max - new_max)
        e = tl.where(in_vocab, tl.exp(z - new_max), 0.0)
        if HAS_ENTROPY:
            # rescale t to the new max first (it uses the old sum), then add the new terms
            # e = 0 where z = -inf (a masked vocabulary entry): its term is 0, not 0 * -inf
            run_t = scale * (run_t + run_sum * (run_max - new_max)) + tl.where(e > 0.0, e * (z - new_max), 0.0)
        run_sum = run_sum * scale + e
        run_max = new_max
    row_max = tl.max(run_max, axis=0)
    lane_scale = tl.exp(run_max - row_max)
    row_sum = tl.sum(run_sum * lane_scale, axis=0)
    lse = row_max + tl.log(row_sum)

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
    if HAS_ENTROPY:
        row_t = tl.sum(lane_scale * (run_t + run_sum * (run_max - row_max)), axis=0)
        entropy = tl.log(row_sum) - row_t / row_sum
        tl.store(entropy_ptr + row, tl.where(label == ignore_index, 0.0, entropy))


@triton.jit
def _row_grad_kernel(
    logits_ptr,  # *fp32 [n_rows, V]
    stride_row,
    bias_ptr,  # *T [V] or dummy
    labels_ptr,  # *int64 [n_rows]
    lse_ptr,  # *fp32 [n_rows]
    grad_ptr,  # *fp32 [n_rows]: upstream d(out)/d(logp_row), 0 for ignored rows
    entropy_ptr,  # *fp32 [n_rows] (HAS_ENTROPY) or dummy
    grad_entropy_ptr,  # *fp32 [n_rows]: upstream d(out)/d(entropy_row), 0 for ignored rows (HAS_ENTROPY)
    out_ptr,  # *fp32|fp16|bf16 [n_rows, V], row stride = stride_out_row; may alias logits_ptr
    stride_out_row,
    V,
    label_offset,  # the chunk holds vocabulary columns label_offset .. label_offset + V
    inv_temperature,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    OUT_ALIASES_IN: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    out_row_ptr = out_ptr + row * stride_out_row
    label = tl.load(labels_ptr + row) - label_offset
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_ptr + row)
    if HAS_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + row)
        shift = tl.load(entropy_ptr + row) - lse  # z - lse + H = z + shift
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
        if HAS_ENTROPY:
            # dH/dz = -p (log p + H) -> 0 as p -> 0 (also where z = -inf, where the product is 0 * inf)
            d -= tl.where(prob > 0.0, g_h * prob * (z + shift), 0.0)
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
    return_entropy: bool = False,
):
    """Log-sum-exp and target log-prob (and entropy) of each row of a logit chunk, in one sweep.

    Args:
        logits: fp32 ``[n, V]``, unit stride along V (raw ``h @ W.T``, without bias).
        bias: ``[V]`` (any float dtype) or None.
        labels: int64 ``[n]``.
        return_entropy: also return the entropy of ``softmax(z)`` per row.
    Returns:
        ``(logp, lse)`` or ``(logp, lse, entropy)``, each fp32 ``[n]``. ``logp`` and ``entropy``
        are 0 at ignore_index; ``logp`` is NaN for a label outside ``[0, V)``.
    """
    n_rows, vocab_size = logits.shape
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    entropy = torch.empty(n_rows, dtype=torch.float32, device=logits.device) if return_entropy else None
    if n_rows > 0:
        block_v = _block_v(vocab_size)
        _row_lse_target_kernel[(n_rows,)](
            logits,
            logits.stride(0),
            bias if bias is not None else logits,
            labels,
            lse,
            logp,
            entropy if entropy is not None else lse,
            vocab_size,
            inv_temperature,
            softcap if softcap is not None else 1.0,
            ignore_index,
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap is not None,
            HAS_ENTROPY=return_entropy,
            BLOCK_V=block_v,
            num_warps=_num_warps(block_v),
        )
    return (logp, lse, entropy) if return_entropy else (logp, lse)


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
    entropy: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of ``sum_rows grad_logp[r] * logp[r] (+ grad_entropy[r] * entropy[r])`` w.r.t. the
    raw logits of the chunk.

    Args:
        logits: fp32 ``[n, v]`` raw products (no bias) of vocabulary columns
            ``label_offset .. label_offset + v``, unit stride along v; bias: ``[v]`` (that slice) or None.
        labels: int64 ``[n]`` (global vocabulary ids); lse: fp32 ``[n]`` over the whole vocabulary;
            grad_logp: fp32 ``[n]`` (must be 0 on ignored rows).
        entropy, grad_entropy: fp32 ``[n]`` each, or both None (no entropy term). ``entropy`` is
            the rows' entropy over the whole vocabulary; ``grad_entropy`` must be 0 on ignored rows.
        out: ``[n, v]`` fp32/fp16/bf16 destination, unit stride along v; may be ``logits`` itself or
            a half-precision view over the same memory (``logits.view(dtype)[:, :v]``).
    Returns:
        ``out``.
    """
    if (entropy is None) != (grad_entropy is None):
        raise ValueError("launch_row_grad needs both entropy and grad_entropy, or neither")
    n_rows, vocab_size = logits.shape
    if n_rows == 0:
        return out
    block_v = _block_v(vocab_size)
    has_entropy = grad_entropy is not None
    _row_grad_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        bias if bias is not None else logits,
        labels,
        lse,
        grad_logp,
        entropy if has_entropy else lse,
        grad_entropy if has_entropy else grad_logp,
        out,
        out.stride(0),
        vocab_size,
        label_offset,
        inv_temperature,
        softcap if softcap is not None else 1.0,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        HAS_ENTROPY=has_entropy,
        OUT_ALIASES_IN=out.data_ptr() == logits.data_ptr() and out.dtype != logits.dtype,
        BLOCK_V=block_v,
        num_warps=_num_warps(block_v),
    )
    return out
