"""The chunked schedule shared by both engines (no autograd here).

Tokens are processed in chunks of ``n`` rows; a chunk's fp32 logits ``[n, V]`` are the only
vocabulary-sized buffer alive at any time, so the workspace is bounded by the chunk budget in
bytes, whatever ``N`` is. For each chunk:

* forward:  ``X = h_c @ W.T`` (fp32), epilogue -> ``logp_c``, ``lse_c``            (2·n·H·V FLOPs)
* backward: recompute ``X``, epilogue -> ``dX`` (dtype of W), ``dH_c = dX @ W``,
  ``dW += dX.T @ h_c``                                                             (6·n·H·V FLOPs)
* in-forward gradient (:func:`forward_with_grad`): ``X`` once, epilogue ``logp_c``, a caller's
  ``head`` turns ``logp_c`` into ``d loss / d logp_c``, epilogue -> ``dX`` from the same ``X``,
  then the two products                                                             (6·n·H·V FLOPs)

So a token-level op whose upstream gradient only arrives in backward costs 8NHV in all, and a
loss whose gradient is known inside the forward (the sequence losses) costs 6NHV, the matmul
floor.

Chunk budget: ``chunk_bytes`` argument, else ``DFTKERN_CHUNK_BYTES`` (bytes; suffixes K/M/G
allowed), else 1 GiB on CUDA and 256 MiB elsewhere. A row costs ``V * 4`` bytes of fp32 logits,
plus ``V * 2`` for the fp16/bf16 gradient buffer on CUDA (the torch engine needs up to two more
fp32 rows for bias/temperature/softcap temporaries).
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
    "forward_logprobs",
    "backward_logprobs",
    "forward_with_grad",
]

DEFAULT_CHUNK_BYTES_CUDA = 1 << 30
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


def resolve_chunk_bytes(chunk_bytes: int | None, device: torch.device) -> int:
    """Chunk budget in bytes: argument, else env ``DFTKERN_CHUNK_BYTES``, else the device default."""
    if chunk_bytes is not None:
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        return chunk_bytes
    env = os.environ.get("DFTKERN_CHUNK_BYTES")
    if env:
        return _parse_bytes(env)
    return DEFAULT_CHUNK_BYTES_CUDA if device.type == "cuda" else DEFAULT_CHUNK_BYTES_CPU


def bytes_per_token_row(vocab_size: int, ops: MatmulOps, engine_name: str, tf: LogitTransform,
                        has_bias: bool) -> int:
    """Workspace bytes one token row of a chunk needs."""
    acc = torch.finfo(ops.acc_dtype).bits // 8
    per = acc
    if ops.grad_dtype != ops.acc_dtype:
        per += torch.finfo(ops.grad_dtype).bits // 8
    if engine_name == "torch":
        per += acc * (int(has_bias or tf.temperature != 1.0) + int(tf.softcap is not None))
    return vocab_size * per


def rows_per_chunk(budget: int, row_bytes: int) -> int:
    return max(1, budget // max(row_bytes, 1))


def _chunk_ranges(n_tokens: int, rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + rows, n_tokens)) for s in range(0, n_tokens, rows)]


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
    n_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    logp = torch.empty(n_tokens, dtype=ops.acc_dtype, device=hidden.device)
    lse = torch.empty(n_tokens, dtype=ops.acc_dtype, device=hidden.device)
    rows = rows_per_chunk(budget, bytes_per_token_row(vocab_size, ops, engine.name, tf, bias is not None))
    for t0, t1 in _chunk_ranges(n_tokens, rows):
        logits = ops.logits(hidden[t0:t1])
        logp[t0:t1], lse[t0:t1] = engine.lse_and_logp(logits, bias, labels[t0:t1], tf)
        del logits
    return logp, lse


class _GradAccumulator:
    """Accumulates dH (per chunk, disjoint rows), dW (fp32 across chunks) and db."""

    def __init__(self, hidden, weight, bias, ops: MatmulOps, n_chunks: int,
                 need_hidden: bool, need_weight: bool, need_bias: bool):
        self.ops = ops
        self.grad_hidden = torch.empty_like(hidden) if need_hidden else None
        self.single_chunk = n_chunks == 1
        self.grad_weight_acc = None
        self.grad_weight = None
        if need_weight and not self.single_chunk:
            self.grad_weight_acc = torch.zeros(weight.shape, dtype=ops.acc_dtype, device=weight.device)
        self.need_weight = need_weight
        self.weight_dtype = weight.dtype
        self.grad_bias_acc = (torch.zeros(weight.shape[0], dtype=ops.acc_dtype, device=weight.device)
                              if need_bias else None)
        self.bias_dtype = bias.dtype if bias is not None else None

    def add_chunk(self, t0: int, t1: int, grad_logits: torch.Tensor, hidden_chunk: torch.Tensor) -> None:
        if self.grad_hidden is not None:
            self.grad_hidden[t0:t1] = self.ops.grad_hidden(grad_logits)
        if self.need_weight:
            if self.single_chunk:
                h = hidden_chunk if self.ops.weight_acc is None else hidden_chunk.to(self.ops.acc_dtype)
                self.grad_weight = torch.mm(grad_logits.t(), h).to(self.weight_dtype)
            else:
                self.ops.accumulate_grad_weight(self.grad_weight_acc, grad_logits, hidden_chunk)
        if self.grad_bias_acc is not None:
            self.grad_bias_acc += grad_logits.sum(0, dtype=self.ops.acc_dtype)

    def result(self):
        grad_weight = self.grad_weight
        if self.grad_weight_acc is not None:
            grad_weight = self.grad_weight_acc.to(self.weight_dtype)
        grad_bias = None if self.grad_bias_acc is None else self.grad_bias_acc.to(self.bias_dtype)
        return self.grad_hidden, grad_weight, grad_bias


def backward_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      labels: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor,
                      tf: LogitTransform, engine, budget: int, *, need_hidden: bool = True,
                      need_weight: bool = True, need_bias: bool = True):
    """Gradients of ``sum_t grad_logp[t] * logp[t]``, recomputing the logits chunk by chunk.

    Args:
        lse: ``[N]`` from :func:`forward_logprobs`; grad_logp: ``[N]`` upstream gradient.
    Returns:
        ``(grad_hidden [N, H] | None, grad_weight [V, H] | None, grad_bias [V] | None)`` in the
        dtypes of hidden, weight and bias.
    """
    ops = MatmulOps(weight)
    n_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    grad_logp = torch.where(labels == tf.ignore_index, torch.zeros_like(grad_logp), grad_logp)
    grad_logp = grad_logp.to(ops.acc_dtype)
    rows = rows_per_chunk(budget, bytes_per_token_row(vocab_size, ops, engine.name, tf, bias is not None))
    ranges = _chunk_ranges(n_tokens, rows)
    acc = _GradAccumulator(hidden, weight, bias, ops, len(ranges), need_hidden, need_weight,
                           need_bias and bias is not None)
    for t0, t1 in ranges:
        h = hidden[t0:t1]
        logits = ops.logits(h)
        grad_logits = engine.grad_logits(logits, bias, labels[t0:t1], lse[t0:t1], grad_logp[t0:t1], tf,
                                         ops.grad_dtype)
        del logits
        acc.add_chunk(t0, t1, grad_logits, h)
        del grad_logits
    return acc.result()


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
    logp = torch.empty(n_tokens, dtype=ops.acc_dtype, device=hidden.device)
    acc = _GradAccumulator(hidden, weight, bias, ops, len(chunk_ranges), need_hidden, need_weight,
                           need_bias and bias is not None)
    ignored = labels == tf.ignore_index
    for c, (t0, t1) in enumerate(chunk_ranges):
        h = hidden[t0:t1]
        logits = ops.logits(h)
        # the row epilogues never write into ``logits`` in lse_and_logp, so it is reused below
        logp_c, lse_c = engine.lse_and_logp(logits, bias, labels[t0:t1], tf)
        logp[t0:t1] = logp_c
        grad_logp = head(c, logp_c).to(ops.acc_dtype)
        grad_logp = torch.where(ignored[t0:t1], torch.zeros_like(grad_logp), grad_logp)
        grad_logits = engine.grad_logits(logits, bias, labels[t0:t1], lse_c, grad_logp, tf, ops.grad_dtype)
        del logits
        acc.add_chunk(t0, t1, grad_logits, h)
        del grad_logits
    return (logp, *acc.result())
