"""The chunked schedule shared by both engines (no autograd here).

Tokens are processed in chunks of ``n`` rows; a chunk's fp32 logits ``[n, V]`` are the only
vocabulary-sized buffer alive at any time, so the workspace is bounded by the chunk budget in
bytes, whatever ``N`` is. For each chunk:

* forward:  ``X = h_c @ W.T`` (fp32), epilogue -> ``logp_c``, ``lse_c``            (2·n·H·V FLOPs)
* backward: tiles of (tokens x vocabulary columns), sized to the budget: recompute the tile's
  ``X``, epilogue -> ``dX`` (dtype of W) with the saved ``lse``, ``dH += dX @ W_v``,
  ``dW_v = dX.T @ h``. Tiling the vocabulary means each ``dW`` row block is finished in one
  product (no vocabulary-sized fp32 accumulator) and only ``dH [N, H]`` accumulates in fp32. (6·N·H·V FLOPs)
* in-forward gradient (:func:`forward_with_grad`): ``X`` once, epilogue ``logp_c``, a caller's
  ``head`` turns ``logp_c`` into ``d loss / d logp_c``, epilogue -> ``dX`` from the same ``X``,
  then the two products                                                             (6·n·H·V FLOPs)

So a token-level op whose upstream gradient only arrives in backward costs 8NHV in all, and a
loss whose gradient is known inside the forward (the sequence losses) costs 6NHV, the matmul
floor.

Chunk budget: ``chunk_bytes`` argument, else ``DFTKERN_CHUNK_BYTES`` (bytes; suffixes K/M/G
allowed), else 1 GiB on CUDA (4 GiB for the sequence losses, so that a whole DFT group fits and
takes the 6NHV schedule) and 256 MiB elsewhere. A logit costs 4 bytes (fp32); the Triton
engine writes the fp16/bf16 gradient over the same memory, the torch engine needs 2 more bytes
for it and up to two more fp32 temporaries for bias/temperature/softcap.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from .engines import LogitTransform, MatmulOps

__all__ = [
    "DEFAULT_CHUNK_BYTES_CUDA",
    "DEFAULT_CHUNK_BYTES_CPU",
    "resolve_chunk_bytes",
    "bytes_per_token_row",
    "rows_per_chunk",
    "tokens_per_chunk",
    "index_ranges",
    "forward_logprobs",
    "backward_logprobs",
    "forward_with_grad",
]

DEFAULT_CHUNK_BYTES_CUDA = 1 << 30
DEFAULT_GROUPED_CHUNK_BYTES_CUDA = 4 << 30
DEFAULT_CHUNK_BYTES_CPU = 256 << 20

_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _parse_bytes(text: str) -> int:
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = 1
    if t and t[-1] in _SUFFIX:
        mult, t = _SUFFIX[t[-1]], t[:-1]
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise ValueError(f"DFTKERN_CHUNK_BYTES={text!r} is not a byte count (e.g. 268435456, 256M, 1G)") from None
    if value <= 0:
        raise ValueError(f"DFTKERN_CHUNK_BYTES must be positive, got {text!r}")
    return value


def resolve_chunk_bytes(chunk_bytes: int | None, device: torch.device, *, grouped: bool = False) -> int:
    """Chunk budget in bytes: argument, else env ``DFTKERN_CHUNK_BYTES``, else the device default
    (``grouped``: the sequence-loss layer's default, large enough for one DFT group of 5x1024
    tokens at V=128k to take the 6NHV schedule)."""
    if chunk_bytes is not None:
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        return chunk_bytes
    env = os.environ.get("DFTKERN_CHUNK_BYTES")
    if env:
        return _parse_bytes(env)
    if device.type != "cuda":
        return DEFAULT_CHUNK_BYTES_CPU
    return DEFAULT_GROUPED_CHUNK_BYTES_CUDA if grouped else DEFAULT_CHUNK_BYTES_CUDA


def bytes_per_token_row(vocab_size: int, weight: torch.Tensor, engine_name: str, tf: LogitTransform,
                        has_bias: bool) -> int:
    """Workspace bytes one token row of ``vocab_size`` logits needs (weight gives dtype and device)."""
    acc_dtype, grad_dtype = MatmulOps.dtypes(weight)
    acc = torch.finfo(acc_dtype).bits // 8
    per = acc
    if engine_name == "torch":
        if grad_dtype != acc_dtype:
            per += torch.finfo(grad_dtype).bits // 8
        per += acc * (int(has_bias or tf.temperature != 1.0) + int(tf.softcap is not None))
    return vocab_size * per


def rows_per_chunk(budget: int, row_bytes: int) -> int:
    return max(1, budget // max(row_bytes, 1))


def tokens_per_chunk(budget: int, weight: torch.Tensor, engine_name: str, tf: LogitTransform,
                     has_bias: bool) -> int:
    """Token rows of full-vocabulary logits that fit ``budget`` bytes (at least 1)."""
    return rows_per_chunk(budget, bytes_per_token_row(weight.shape[0], weight, engine_name, tf, has_bias))


def index_ranges(length: int, size: int) -> list[tuple[int, int]]:
    """``[i0, i1)`` ranges of at most ``size`` covering ``[0, length)`` (none when empty): token
    chunks, or vocabulary column tiles."""
    return [(s, min(s + size, length)) for s in range(0, length, size)]


def forward_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     labels: torch.Tensor, tf: LogitTransform, engine, budget: int,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs without gradients.

    Args:
        hidden: ``[N, H]`` fp32/fp16/bf16/fp64; weight: ``[V, H]`` same dtype; bias ``[V]`` or None;
        labels: int64 ``[N]``.
    Returns:
        ``(logp, lse)``: ``[N]`` each, fp32 (fp64 for fp64 inputs). ``logp`` is 0 where ignored.
    """
    ops = MatmulOps(weight)
    n_tokens = hidden.shape[0]
    logp = torch.empty(n_tokens, dtype=ops.acc_dtype, device=hidden.device)
    lse = torch.empty(n_tokens, dtype=ops.acc_dtype, device=hidden.device)
    rows = tokens_per_chunk(budget, weight, engine.name, tf, bias is not None)
    for t0, t1 in index_ranges(n_tokens, rows):
        logits = ops.logits(hidden[t0:t1])
        logp[t0:t1], lse[t0:t1] = engine.lse_and_logp(logits, bias, labels[t0:t1], tf)
        del logits
    return logp, lse


# Below this many vocabulary columns a backward tile's products get inefficient; tokens are split first.
MIN_VOCAB_TILE = 4096
COLUMN_ALIGN = 256


def backward_tiles(n_tokens: int, vocab_size: int, row_bytes_per_column: int, budget: int) -> tuple[int, int]:
    """(token rows, vocabulary columns) of a backward tile within ``budget`` bytes.

    Whole token axis and as many vocabulary columns as fit; if fewer than ``MIN_VOCAB_TILE``
    columns would fit, the tokens are split instead.
    """
    min_cols = min(vocab_size, MIN_VOCAB_TILE)
    if n_tokens * min_cols * row_bytes_per_column <= budget:
        cols = min(vocab_size, max(min_cols, budget // max(n_tokens * row_bytes_per_column, 1)))
        if cols < vocab_size and cols >= 2 * COLUMN_ALIGN:
            # tile widths that are multiples of 256 keep every row of the fp32/bf16 tiles 16-byte
            # aligned: cuBLAS falls back to much slower kernels otherwise (seen: 3x on an H100)
            cols -= cols % COLUMN_ALIGN
        return max(n_tokens, 1), cols
    return max(1, budget // (min_cols * row_bytes_per_column)), min_cols


def backward_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      labels: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor,
                      tf: LogitTransform, engine, budget: int, *, need_hidden: bool = True,
                      need_weight: bool = True, need_bias: bool = True):
    """Gradients of ``sum_t grad_logp[t] * logp[t]``, recomputing the logits tile by tile.

    Args:
        lse: ``[N]`` from :func:`forward_logprobs`; grad_logp: ``[N]`` upstream gradient.
    Returns:
        ``(grad_hidden [N, H] | None, grad_weight [V, H] | None, grad_bias [V] | None)`` in the
        dtypes of hidden, weight and bias.
    """
    ops = MatmulOps(weight)
    n_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    need_bias = need_bias and bias is not None
    grad_logp = torch.where(labels == tf.ignore_index, torch.zeros_like(grad_logp), grad_logp)
    grad_logp = grad_logp.to(ops.acc_dtype)
    per_column = bytes_per_token_row(1, weight, engine.name, tf, bias is not None)
    tile_rows, tile_cols = backward_tiles(n_tokens, vocab_size, per_column, budget)
    row_ranges = index_ranges(n_tokens, tile_rows)
    col_ranges = index_ranges(vocab_size, tile_cols)

    grad_hidden = grad_weight = grad_bias = None
    hidden_acc = None
    if n_tokens == 0:  # no token: zero gradients (never uninitialized memory)
        return (torch.zeros_like(hidden) if need_hidden else None,
                torch.zeros_like(weight) if need_weight else None,
                torch.zeros_like(bias) if need_bias else None)
    if need_hidden:
        if len(col_ranges) == 1:
            grad_hidden = torch.empty_like(hidden)
        else:
            hidden_acc = torch.zeros(hidden.shape, dtype=ops.acc_dtype, device=hidden.device)
    if need_weight:
        grad_weight = torch.empty_like(weight)
    if need_bias:
        grad_bias = torch.empty_like(bias)

    for v0, v1 in col_ranges:
        bias_v = None if bias is None else bias[v0:v1]
        weight_acc = None
        if need_weight and len(row_ranges) > 1:
            weight_acc = torch.zeros((v1 - v0, weight.shape[1]), dtype=ops.acc_dtype, device=weight.device)
        bias_acc = torch.zeros(v1 - v0, dtype=ops.acc_dtype, device=weight.device) if need_bias else None
        for t0, t1 in row_ranges:
            h = hidden[t0:t1]
            logits = ops.logits(h, v0, v1)
            grad_x = engine.grad_logits(logits, bias_v, labels[t0:t1], lse[t0:t1], grad_logp[t0:t1], tf,
                                        ops.grad_dtype, label_offset=v0)
            if need_hidden:
                if hidden_acc is None:
                    grad_hidden[t0:t1] = ops.grad_hidden(grad_x, v0, v1)
                else:
                    ops.add_grad_hidden(hidden_acc[t0:t1], grad_x, v0, v1)
            if need_weight:
                if weight_acc is None:
                    grad_weight[v0:v1] = ops.grad_weight(grad_x, h)
                else:
                    ops.add_grad_weight(weight_acc, grad_x, h)
            if need_bias:
                bias_acc += grad_x.sum(0, dtype=ops.acc_dtype)
            del logits, grad_x
        if weight_acc is not None:
            grad_weight[v0:v1] = weight_acc
        if need_bias:
            grad_bias[v0:v1] = bias_acc
    if hidden_acc is not None:
        grad_hidden = hidden_acc.to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias


def forward_with_grad(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      labels: torch.Tensor, tf: LogitTransform, engine,
                      chunk_ranges: Sequence[tuple[int, int]],
                      head: Callable[[int, torch.Tensor], torch.Tensor], *, need_hidden: bool = True,
                      need_weight: bool = True, need_bias: bool = True):
    """Log-probs and the gradients of a loss on them in one pass over the logits (6NHV).

    Args:
        chunk_ranges: token ranges ``[t0, t1)`` covering ``[0, N)`` in order; the caller chooses
            them so that each holds whole loss groups and fits the budget.
        head: ``head(chunk_index, logp_chunk) -> grad_logp_chunk``: given the chunk's detached
            token log-probs ``[t1 - t0]`` (compute dtype), returns ``d loss / d logp`` for them.
    Returns:
        ``(logp [N], grad_hidden, grad_weight, grad_bias)`` as in :func:`backward_logprobs`.
    """
    ops = MatmulOps(weight)
    n_tokens = hidden.shape[0]
    need_bias = need_bias and bias is not None
    single = len(chunk_ranges) == 1
    logp = torch.empty(n_tokens, dtype=ops.acc_dtype, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = None
    weight_acc = (torch.zeros(weight.shape, dtype=ops.acc_dtype, device=weight.device)
                  if need_weight and not single else None)
    bias_acc = torch.zeros(weight.shape[0], dtype=ops.acc_dtype, device=weight.device) if need_bias else None
    ignored = labels == tf.ignore_index
    for c, (t0, t1) in enumerate(chunk_ranges):
        h = hidden[t0:t1]
        logits = ops.logits(h)
        # lse_and_logp only reads ``logits``; the gradient epilogue then reuses them (no recompute)
        logp_c, lse_c = engine.lse_and_logp(logits, bias, labels[t0:t1], tf)
        logp[t0:t1] = logp_c
        grad_logp = head(c, logp_c).to(ops.acc_dtype)
        grad_logp = torch.where(ignored[t0:t1], torch.zeros_like(grad_logp), grad_logp)
        grad_x = engine.grad_logits(logits, bias, labels[t0:t1], lse_c, grad_logp, tf, ops.grad_dtype)
        if need_hidden:
            grad_hidden[t0:t1] = ops.grad_hidden(grad_x)
        if need_weight:
            if single:
                grad_weight = ops.grad_weight(grad_x, h)
            else:
                ops.add_grad_weight(weight_acc, grad_x, h)
        if need_bias:
            bias_acc += grad_x.sum(0, dtype=ops.acc_dtype)
        del logits, grad_x
    if weight_acc is not None:
        grad_weight = weight_acc.to(weight.dtype)
    grad_bias = bias_acc.to(bias.dtype) if need_bias else None
    return logp, grad_hidden, grad_weight, grad_bias
