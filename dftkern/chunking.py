"""The chunked schedule shared by both engines (no autograd here).

Tokens are processed in chunks of ``n`` rows; a chunk's fp32 logits ``[n, V]`` are the only
vocabulary-sized buffer alive at any time, so the workspace is bounded by the chunk budget in
bytes, whatever ``N`` is. Only the *valid* tokens (label != ignore_index, :class:`ValidTokens`)
take part: their hidden rows are gathered chunk by chunk, so ignored (prompt, padding) tokens
enter no product, and a chunk holds up to ``n`` valid tokens. For each chunk:

* forward:  ``X = h_c @ W.T`` (fp32), epilogue -> ``logp_c``, ``lse_c`` (and entropy)   (2·n·H·V FLOPs)
* backward: tiles of (tokens x vocabulary columns), sized to the budget: recompute the tile's
  ``X``, epilogue -> ``dX`` (dtype of W) with the saved ``lse``, ``dH += dX @ W_v``,
  ``dW_v = dX.T @ h``. Tiling the vocabulary means each ``dW`` row block is finished in one
  product (no vocabulary-sized fp32 accumulator) and only ``dH [n, H]`` accumulates in fp32. (6·n·H·V FLOPs)
* in-forward gradient (:func:`forward_with_grad`): ``X`` once, epilogue ``logp_c`` (and
  entropy), a caller's :data:`ChunkGradient` turns them into ``d loss / d logp_c`` (and
  ``d loss / d entropy_c``), epilogue -> ``dX`` from the same ``X``, then the two products (6·n·H·V FLOPs)

So a token-level op whose upstream gradient only arrives in backward costs 8nHV in all, and a
loss whose gradient is known inside the forward costs 6nHV, the matmul floor (n = valid tokens).

Chunk budget: ``chunk_bytes`` argument, else ``DFTKERN_CHUNK_BYTES`` (a byte count, suffixes
K/M/G allowed), else 1 GiB on CUDA (4 GiB for the losses with gradients in the forward, so that a
whole DFT group fits and takes the 6NHV schedule) and 256 MiB elsewhere. A token row costs
``4·V`` bytes (fp32 logits; ``8·V`` for fp64 inputs): both engines write the fp16/bf16 gradient
over the logits it is computed from. On top of the budget: the torch engine's row-block scratch
(at most three blocks of ``TORCH_EPILOGUE_SCRATCH_BYTES``), the gathered hidden rows of a chunk when some
tokens are ignored (``n·H`` elements of the input dtype), and the gradient accumulators (see
``docs/benchmarks.md``, "Workspace").
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .engines import LogitTransform, MatmulOps, resolve_accum_dtype

__all__ = [
    "DEFAULT_CHUNK_BYTES_CUDA",
    "DEFAULT_CHUNK_BYTES_CPU",
    "DEFAULT_GROUPED_CHUNK_BYTES_CUDA",
    "resolve_chunk_bytes",
    "bytes_per_token_row",
    "rows_per_chunk",
    "tokens_per_chunk",
    "index_ranges",
    "ValidTokens",
    "ChunkGradient",
    "InForwardGradients",
    "forward_logprobs",
    "backward_logprobs",
    "forward_with_grad",
    "workspace_bound",
]

DEFAULT_CHUNK_BYTES_CUDA = 1 << 30
DEFAULT_GROUPED_CHUNK_BYTES_CUDA = 4 << 30
DEFAULT_CHUNK_BYTES_CPU = 256 << 20

_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_BYTES_FORMS = "a positive byte count such as 268435456, 256M, 256MiB, 1.5G or 1GB (suffixes K, M, G, T = 2^10..2^40)"


def _parse_bytes(text: str) -> int:
    match = _BYTES_RE.match(text)
    if match is None:
        raise ValueError(f"DFTKERN_CHUNK_BYTES={text!r} is not a byte count; expected {_BYTES_FORMS}")
    value = float(match.group(1)) * _SUFFIX[match.group(2).lower()]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"DFTKERN_CHUNK_BYTES must be at least 1 byte, got {text!r}; expected {_BYTES_FORMS}")
    return int(value)


def resolve_chunk_bytes(chunk_bytes: int | None, device: torch.device, *, grouped: bool = False) -> int:
    """Chunk budget in bytes: argument, else env ``DFTKERN_CHUNK_BYTES``, else the device default
    (``grouped``: the default of the in-forward-gradient losses, large enough for one DFT group of
    5x1024 tokens at V=128k to take the 6NHV schedule)."""
    if chunk_bytes is not None:
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        return chunk_bytes
    env = os.environ.get("DFTKERN_CHUNK_BYTES")
    if env is not None and env.strip():
        return _parse_bytes(env)
    if device.type != "cuda":
        return DEFAULT_CHUNK_BYTES_CPU
    return DEFAULT_GROUPED_CHUNK_BYTES_CUDA if grouped else DEFAULT_CHUNK_BYTES_CUDA


def bytes_per_token_row(vocab_size: int, weight: torch.Tensor) -> int:
    """Budgeted bytes of one token row of ``vocab_size`` logits (fp32, fp64 for fp64 weights)."""
    acc_dtype, _ = MatmulOps.dtypes(weight)
    return vocab_size * (torch.finfo(acc_dtype).bits // 8)


def rows_per_chunk(budget: int, row_bytes: int) -> int:
    return max(1, budget // max(row_bytes, 1))


def tokens_per_chunk(budget: int, weight: torch.Tensor) -> int:
    """Token rows of full-vocabulary logits that fit ``budget`` bytes (at least 1)."""
    return rows_per_chunk(budget, bytes_per_token_row(weight.shape[0], weight))


def index_ranges(length: int, size: int) -> list[tuple[int, int]]:
    """``[i0, i1)`` ranges of at most ``size`` covering ``[0, length)`` (none when empty): token
    chunks, or vocabulary column tiles."""
    return [(s, min(s + size, length)) for s in range(0, length, size)]


# ---------------------------------------------------------------------------------------------
# Compaction: the valid tokens
# ---------------------------------------------------------------------------------------------


class ValidTokens:
    """The valid (label != ignore_index) rows of a flattened batch of ``N`` tokens, in order.

    Every schedule below works on these rows only: a chunk gathers its hidden rows
    (``hidden[positions]``) and its results come back per valid token ("compact" order);
    :meth:`scatter` puts them back at their positions (0 elsewhere).

    Attributes:
        num_tokens: N. num_valid: n.
        positions: int64 ``[n]`` on the compute device, or None when every token is valid (then
            the gathers are plain slices).

    Host syncs: :meth:`find` copies the ``[N]`` label mask to the host once when the labels are
    on CUDA and no ``valid_positions`` were given (the one sync of a call); the host positions
    are what the chunk and group planning read. Given ``valid_positions`` on the CPU, nothing is
    copied back; given on CUDA, :attr:`host_positions` copies them to the host when a caller
    needs them (planning by token ranges: the losses; the token op does not).
    """

    def __init__(self, num_tokens: int, positions: torch.Tensor | None, host: torch.Tensor | None):
        self.num_tokens = num_tokens
        self.positions = positions
        self._host = host
        self.num_valid = num_tokens if positions is None else int(positions.numel())

    @classmethod
    def all(cls, num_tokens: int) -> ValidTokens:
        return cls(num_tokens, None, None)

    @classmethod
    def find(cls, labels: torch.Tensor, ignore_index: int, valid_positions=None, *,
             check: bool = True) -> ValidTokens:
        """The valid tokens of flat ``labels [N]``.

        Args:
            valid_positions: optional int64 1-D tensor of the positions with label != ignore_index,
                increasing (CPU preferred). Checked against the labels when that costs no device
                sync (labels on CPU) or ``check`` (validation enabled) is set.
        """
        n_tokens = labels.shape[0]
        device = labels.device
        if valid_positions is None:
            mask = labels != ignore_index
            if mask.is_cuda:
                mask = mask.cpu()  # the one host sync of the call
            host = mask.nonzero().squeeze(1)
        else:
            host = _check_valid_positions(valid_positions, labels, ignore_index, check)
            if host.device.type != "cpu":
                if host.numel() == n_tokens:
                    return cls.all(n_tokens)
                return cls(n_tokens, host.to(device), None)
        if host.numel() == n_tokens:
            return cls.all(n_tokens)
        positions = host if device.type == "cpu" else host.to(device, non_blocking=True)
        return cls(n_tokens, positions, host)

    @property
    def all_valid(self) -> bool:
        return self.positions is None

    @property
    def host_positions(self) -> torch.Tensor:
        """int64 ``[n]`` on the CPU (copied from the device once if only given there)."""
        if self.positions is None:
            return torch.arange(self.num_tokens)
        if self._host is None:
            self._host = self.positions.cpu()
        return self._host

    def compact_offsets(self, bounds: Sequence[int]) -> list[int]:
        """For token offsets ``bounds`` (increasing, in ``[0, N]``), the number of valid tokens before each."""
        if self.positions is None:
            return [int(b) for b in bounds]
        offsets = torch.searchsorted(self.host_positions, torch.tensor(list(bounds), dtype=torch.int64))
        return [int(o) for o in offsets.tolist()]

    def chunk_bounds(self, max_rows: int) -> list[tuple[int, int]]:
        """Token ranges ``[t0, t1)`` covering ``[0, N)`` in order, each with at most ``max_rows``
        valid tokens (one range ``(0, N)`` when there are none)."""
        compact = index_ranges(self.num_valid, max_rows)
        if len(compact) <= 1:
            return [(0, self.num_tokens)]
        if self.positions is None:
            cuts = [c0 for c0, _ in compact[1:]]
        else:
            host = self.host_positions
            cuts = [int(host[c0]) for c0, _ in compact[1:]]
        edges = [0] + cuts + [self.num_tokens]
        return list(zip(edges[:-1], edges[1:]))

    def positions_on(self, device: torch.device, c0: int, c1: int) -> torch.Tensor:
        """int64 ``[c1 - c0]`` flat positions of valid tokens ``c0..c1`` (on ``device``)."""
        if self.positions is None:
            return torch.arange(c0, c1, device=device)
        return self.positions[c0:c1]

    def rows(self, x: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
        """Rows of ``x [N, ...]`` at valid tokens ``c0..c1`` (a slice when every token is valid)."""
        if self.positions is None:
            return x[c0:c1]
        return x.index_select(0, self.positions[c0:c1])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, ...]`` -> ``[n, ...]`` at the valid tokens (``x`` itself when all are valid)."""
        return x if self.positions is None else x.index_select(0, self.positions)

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """``values [n, ...]`` -> ``[N, ...]`` with 0 at ignored tokens; differentiable."""
        if self.positions is None:
            return values
        out = values.new_zeros((self.num_tokens,) + tuple(values.shape[1:]))
        return out.index_copy(0, self.positions, values)


def _check_valid_positions(valid_positions, labels: torch.Tensor, ignore_index: int, check: bool) -> torch.Tensor:
    n_tokens = labels.shape[0]
    if not isinstance(valid_positions, torch.Tensor):
        raise TypeError(f"valid_positions must be an int64 torch.Tensor (1-D) or None, got "
                        f"{type(valid_positions).__name__}")
    if valid_positions.is_floating_point() or valid_positions.is_complex() or valid_positions.dtype == torch.bool:
        raise TypeError(f"valid_positions must be an integer tensor (int64), got {valid_positions.dtype}")
    if valid_positions.dim() != 1:
        raise ValueError(f"valid_positions must be 1-D (flat positions into labels.reshape(-1)), got shape "
                         f"{tuple(valid_positions.shape)}")
    if valid_positions.numel() > n_tokens:
        raise ValueError(f"valid_positions has {valid_positions.numel()} entries for {n_tokens} tokens")
    positions = valid_positions.long()
    if positions.is_cuda and not check:
        return positions
    host = positions.cpu()
    if host.numel():
        if int(host[0]) < 0 or int(host[-1]) >= n_tokens or bool((host[1:] <= host[:-1]).any()):
            raise ValueError(f"valid_positions must be strictly increasing positions in [0, {n_tokens})")
    if not labels.is_cuda or check:
        expected = (labels != ignore_index).cpu().nonzero().squeeze(1)
        if expected.numel() != host.numel() or not torch.equal(expected, host):
            raise ValueError(f"valid_positions ({host.numel()} positions) must be exactly the positions where "
                             f"labels != ignore_index={ignore_index} ({expected.numel()} positions)")
    return host if positions.device.type == "cpu" else positions


# ---------------------------------------------------------------------------------------------
# Token log-probs (and entropy): forward, and backward by recomputation
# ---------------------------------------------------------------------------------------------


def forward_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     labels: torch.Tensor, transform: LogitTransform, engine, budget: int,
                     tokens: ValidTokens | None = None, *, entropy: bool = False):
    """Token log-probs (and entropies) of the valid tokens, without gradients.

    Args:
        hidden: ``[N, H]`` fp32/fp16/bf16/fp64; weight: ``[V, H]`` same dtype; bias ``[V]`` or None;
        labels: int64 ``[N]``; tokens: the valid tokens (None: all N).
    Returns:
        ``(logp, lse, entropy | None)``: ``[n]`` each (n valid tokens, in order), fp32 (fp64 for
        fp64 inputs).
    """
    tokens = ValidTokens.all(hidden.shape[0]) if tokens is None else tokens
    ops = MatmulOps(weight)
    n = tokens.num_valid
    logp = torch.empty(n, dtype=ops.acc_dtype, device=hidden.device)
    lse = torch.empty(n, dtype=ops.acc_dtype, device=hidden.device)
    ent = torch.empty(n, dtype=ops.acc_dtype, device=hidden.device) if entropy else None
    labels_c = tokens.gather(labels)
    for c0, c1 in index_ranges(n, tokens_per_chunk(budget, weight)):
        logits = ops.logits(tokens.rows(hidden, c0, c1))
        out = engine.lse_and_logp(logits, bias, labels_c[c0:c1], transform, entropy=entropy)
        logp[c0:c1], lse[c0:c1] = out[0], out[1]
        if entropy:
            ent[c0:c1] = out[2]
        del logits, out
    return logp, lse, ent


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


def _scattered_grad_hidden(hidden: torch.Tensor, tokens: ValidTokens) -> torch.Tensor:
    """The ``[N, H]`` gradient buffer of hidden: zero rows at ignored tokens (written later elsewhere)."""
    return torch.empty_like(hidden) if tokens.all_valid else torch.zeros_like(hidden)


def _write_rows(dest: torch.Tensor, tokens: ValidTokens, c0: int, c1: int, values: torch.Tensor) -> None:
    """``dest[positions of valid tokens c0..c1] = values``."""
    if tokens.all_valid:
        dest[c0:c1] = values
    else:
        dest.index_copy_(0, tokens.positions[c0:c1], values.to(dest.dtype))


def backward_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      labels: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor,
                      transform: LogitTransform, engine, budget: int, tokens: ValidTokens | None = None, *,
                      entropy: torch.Tensor | None = None, grad_entropy: torch.Tensor | None = None,
                      need_hidden: bool = True, need_weight: bool = True, need_bias: bool = True,
                      accum_dtype="fp32"):
    """Gradients of ``sum_t grad_logp[t] * logp[t] (+ grad_entropy[t] * entropy[t])`` over the
    valid tokens, recomputing the logits tile by tile.

    Args:
        hidden ``[N, H]``, weight, bias, labels ``[N]``, tokens: as in :func:`forward_logprobs`.
        lse, entropy: ``[n]`` from :func:`forward_logprobs`; grad_logp, grad_entropy: ``[n]``
            upstream gradients of the valid tokens (grad_entropy None: no entropy term).
    Returns:
        ``(grad_hidden [N, H] | None, grad_weight [V, H] | None, grad_bias [V] | None)`` in the
        dtypes of hidden, weight and bias; rows of ignored tokens of ``grad_hidden`` are 0.
    """
    tokens = ValidTokens.all(hidden.shape[0]) if tokens is None else tokens
    ops = MatmulOps(weight)
    n_tokens, vocab_size = tokens.num_valid, weight.shape[0]
    need_bias = need_bias and bias is not None
    labels_c = tokens.gather(labels)
    ignored = labels_c == transform.ignore_index
    grad_logp = grad_logp.to(ops.acc_dtype).masked_fill(ignored, 0.0)
    if grad_entropy is not None:
        grad_entropy = grad_entropy.to(ops.acc_dtype).masked_fill(ignored, 0.0)
    tile_rows, tile_cols = backward_tiles(n_tokens, vocab_size, bytes_per_token_row(1, weight), budget)
    row_ranges = index_ranges(n_tokens, tile_rows)
    col_ranges = index_ranges(vocab_size, tile_cols)

    if n_tokens == 0:  # no token: zero gradients (never uninitialized memory)
        return (torch.zeros_like(hidden) if need_hidden else None,
                torch.zeros_like(weight) if need_weight else None,
                torch.zeros_like(bias) if need_bias else None)
    grad_hidden = grad_weight = grad_bias = hidden_acc = None
    if need_hidden:
        if len(col_ranges) == 1:
            grad_hidden = _scattered_grad_hidden(hidden, tokens)
        else:
            hidden_acc = torch.zeros((n_tokens, hidden.shape[1]), dtype=ops.acc_dtype, device=hidden.device)
    if need_weight:
        grad_weight = torch.empty_like(weight)
        weight_acc_dtype = resolve_accum_dtype(accum_dtype, weight)
    if need_bias:
        grad_bias = torch.empty_like(bias)
    # the gathered hidden rows are reused by every column tile when the token axis is one tile
    whole = tokens.rows(hidden, 0, n_tokens) if len(row_ranges) == 1 else None

    for v0, v1 in col_ranges:
        bias_v = None if bias is None else bias[v0:v1]
        weight_acc = None
        if need_weight and len(row_ranges) > 1 and weight_acc_dtype != weight.dtype:
            weight_acc = torch.zeros((v1 - v0, weight.shape[1]), dtype=weight_acc_dtype, device=weight.device)
        bias_acc = torch.zeros(v1 - v0, dtype=ops.acc_dtype, device=weight.device) if need_bias else None
        for r, (t0, t1) in enumerate(row_ranges):
            h = whole if whole is not None else tokens.rows(hidden, t0, t1)
            logits = ops.logits(h, v0, v1)
            grad_x = engine.grad_logits(logits, bias_v, labels_c[t0:t1], lse[t0:t1], grad_logp[t0:t1], transform,
                                        ops.grad_dtype, label_offset=v0,
                                        entropy=None if grad_entropy is None else entropy[t0:t1],
                                        grad_entropy=None if grad_entropy is None else grad_entropy[t0:t1])
            if need_hidden:
                if hidden_acc is None:
                    _write_rows(grad_hidden, tokens, t0, t1, ops.grad_hidden(grad_x, v0, v1))
                else:
                    ops.add_grad_hidden(hidden_acc[t0:t1], grad_x, v0, v1)
            if need_weight:
                if weight_acc is not None:
                    ops.add_grad_weight(weight_acc, grad_x, h)
                elif r == 0:
                    grad_weight[v0:v1] = ops.grad_weight(grad_x, h)
                else:  # accumulate in the weight's dtype
                    ops.add_grad_weight(grad_weight[v0:v1], grad_x, h)
            if need_bias:
                bias_acc += grad_x.sum(0, dtype=ops.acc_dtype)
            del logits, grad_x, h
        if weight_acc is not None:
            grad_weight[v0:v1] = weight_acc
        if need_bias:
            grad_bias[v0:v1] = bias_acc
    if hidden_acc is not None:
        grad_hidden = _scattered_grad_hidden(hidden, tokens)
        _write_rows(grad_hidden, tokens, 0, n_tokens, hidden_acc.to(hidden.dtype))
    return grad_hidden, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# Gradients inside the forward (6NHV)
# ---------------------------------------------------------------------------------------------

ChunkGradient = Callable[[int, torch.Tensor, "torch.Tensor | None", torch.Tensor],
                         "tuple[torch.Tensor, torch.Tensor | None]"]
"""``chunk_gradient(chunk_index, logp [n_c], entropy [n_c] | None, positions [n_c]) -> (grad_logp, grad_entropy | None)``.

Called once per chunk, in order, with the chunk's detached log-probs (and entropies, when the
pass computes them) of its valid tokens and their flat positions (int64, compute device); returns
``d loss / d logp`` (and ``d loss / d entropy``, or None when the loss does not depend on it), each
``[n_c]``."""


@dataclass
class InForwardGradients:
    """What :func:`forward_with_grad` returns.

    ``logp``/``entropy``: ``[n]`` per valid token (compute dtype; entropy None unless asked);
    ``grad_hidden [N, H]``, ``grad_weight [V, H]``, ``grad_bias [V]`` in the input dtypes, or None
    where not needed.
    """

    logp: torch.Tensor
    entropy: torch.Tensor | None
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None


def forward_with_grad(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      labels: torch.Tensor, transform: LogitTransform, engine,
                      chunk_ranges: Sequence[tuple[int, int]], chunk_gradient: ChunkGradient, *,
                      tokens: ValidTokens | None = None, entropy: bool = False, need_hidden: bool = True,
                      need_weight: bool = True, need_bias: bool = True,
                      accum_dtype="fp32") -> InForwardGradients:
    """Log-probs (and entropies) and the gradients of a loss on them in one pass over the logits (6nHV).

    Args:
        hidden ``[N, H]``, weight, bias, labels ``[N]``, tokens: as in :func:`forward_logprobs`.
        chunk_ranges: token ranges ``[t0, t1)`` covering ``[0, N)`` in order; the caller chooses
            them so that each holds whole loss groups and its valid tokens fit the budget.
        chunk_gradient: see :data:`ChunkGradient`; called for every chunk, even one without
            valid tokens.
        entropy: compute the entropies (in the same sweep as the log-sum-exp).
        accum_dtype: ``dW`` accumulation across chunks, "fp32" or the weight's dtype
            (:func:`dftkern.engines.resolve_accum_dtype`); one chunk needs no accumulator.
    Returns:
        :class:`InForwardGradients`.
    """
    tokens = ValidTokens.all(hidden.shape[0]) if tokens is None else tokens
    ops = MatmulOps(weight)
    device = hidden.device
    need_bias = need_bias and bias is not None
    single = len(chunk_ranges) == 1
    offsets = tokens.compact_offsets([t0 for t0, _ in chunk_ranges] + [chunk_ranges[-1][1]]) if chunk_ranges else [0]
    n = tokens.num_valid
    logp = torch.empty(n, dtype=ops.acc_dtype, device=device)
    ent = torch.empty(n, dtype=ops.acc_dtype, device=device) if entropy else None
    grad_hidden = _scattered_grad_hidden(hidden, tokens) if need_hidden else None
    grad_weight = weight_acc = None
    if need_weight and not single:
        acc_dtype = resolve_accum_dtype(accum_dtype, weight)
        if acc_dtype == weight.dtype:
            grad_weight = torch.zeros_like(weight)  # accumulated in place
        else:
            weight_acc = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
    bias_acc = torch.zeros(weight.shape[0], dtype=ops.acc_dtype, device=weight.device) if need_bias else None
    labels_c = tokens.gather(labels)
    for c, (c0, c1) in enumerate(zip(offsets[:-1], offsets[1:])):
        h = tokens.rows(hidden, c0, c1)
        logits = ops.logits(h)
        # lse_and_logp only reads ``logits``; the gradient epilogue then reuses them (no recompute)
        out = engine.lse_and_logp(logits, bias, labels_c[c0:c1], transform, entropy=entropy)
        logp[c0:c1] = out[0]
        ent_c = out[2] if entropy else None
        if entropy:
            ent[c0:c1] = ent_c
        grad_logp, grad_ent = chunk_gradient(c, out[0], ent_c, tokens.positions_on(device, c0, c1))
        ignored = labels_c[c0:c1] == transform.ignore_index
        grad_logp = grad_logp.to(ops.acc_dtype).masked_fill(ignored, 0.0)
        if grad_ent is not None:
            grad_ent = grad_ent.to(ops.acc_dtype).masked_fill(ignored, 0.0)
        if c1 > c0:
            grad_x = engine.grad_logits(logits, bias, labels_c[c0:c1], out[1], grad_logp, transform,
                                        ops.grad_dtype, entropy=ent_c if grad_ent is not None else None,
                                        grad_entropy=grad_ent)
            if need_hidden:
                _write_rows(grad_hidden, tokens, c0, c1, ops.grad_hidden(grad_x))
            if need_weight:
                if single:
                    grad_weight = ops.grad_weight(grad_x, h)
                else:
                    ops.add_grad_weight(weight_acc if weight_acc is not None else grad_weight, grad_x, h)
            if need_bias:
                bias_acc += grad_x.sum(0, dtype=ops.acc_dtype)
            del grad_x
        del logits, out, h
    if weight_acc is not None:
        grad_weight = weight_acc.to(weight.dtype)
        del weight_acc
    if need_weight and grad_weight is None:  # a single chunk without valid tokens
        grad_weight = torch.zeros_like(weight)
    grad_bias = bias_acc.to(bias.dtype) if need_bias else None
    return InForwardGradients(logp, ent, grad_hidden, grad_weight, grad_bias)


# ---------------------------------------------------------------------------------------------
# Workspace formula (documented in docs/benchmarks.md, "Workspace"; checked by tests/test_memory_account.py)
# ---------------------------------------------------------------------------------------------


def workspace_bound(path: str, *, n_tokens: int, n_valid: int, chunk_valid: int, hidden_size: int,
                    vocab_size: int, dtype: torch.dtype, engine: str, device: str = "cuda",
                    accum_dtype: str = "fp32", chunks: int = 1, budget: int | None = None,
                    grads: bool = True) -> int:
    """Upper bound, in bytes, of the memory one call allocates on top of its inputs.

    Args:
        path: "forward" (token op without gradient), "recompute" (token op forward + backward,
            the grouped "recompute" schedule) or "fused" (gradients in the forward: CE,
            ``fused_token_loss``, the grouped "fused" schedule).
        n_tokens, n_valid: N and n (valid tokens). chunk_valid: c, the valid tokens of the
            largest chunk (at most ``budget // (4 V)``).
        dtype: input dtype; engine: "triton" or "torch"; device: "cuda" or "cpu" (the CPU
            multiplies half-precision operands upcast to fp32).
        accum_dtype: "fp32" or "weight"; chunks: forward chunks (dW accumulates across them).
        budget: the chunk budget (bounds the backward tile); grads: dH/dW produced.

    The terms: the gradients ``dH [N, H]`` and ``dW [V, H]`` (input dtype); the chunk's fp32
    logits ``c·V·4``; the torch engine's row-block scratch (2 blocks in the forward epilogue, 3
    in the gradient one, each at most the chunk); the gathered hidden rows of a chunk when tokens
    are ignored; the fp32 ``dW`` accumulator ``V·H·4`` (fused, several chunks, accum "fp32",
    half-precision weight); in the backward by recomputation a tile of at most the budget, the
    fp32 ``dH`` accumulator when the vocabulary is tiled, a per-tile fp32 ``dW`` block when the
    tokens are; on CPU for fp16/bf16 the fp32 copy of ``W``; and per-token vectors (64 B/token).
    """
    from .engines import torch_epilogue_block_bytes

    e = torch.finfo(dtype).bits // 8
    a = 8 if dtype == torch.float64 else 4
    half_upcast = device != "cuda" and dtype in (torch.float16, torch.bfloat16)
    N, n, c, H, V = n_tokens, n_valid, chunk_valid, hidden_size, vocab_size
    compacted = n < N
    block = torch_epilogue_block_bytes(torch.device(device))
    temporaries = 2 if path == "forward" else 3

    def scratch(tile: int) -> int:
        return 0 if engine == "triton" else temporaries * min(tile, block)

    def rows(r: int) -> int:
        return (r * H * e if compacted else 0) + (r * H * a if half_upcast else 0)

    small = 64 * 1024 + 64 * N
    upcast_weight = V * H * a if half_upcast else 0
    logits = c * V * a
    if path == "forward":
        return logits + scratch(logits) + rows(c) + upcast_weight + small
    outputs = (N * H * e + V * H * e) if grads else 0
    if path == "recompute":
        whole = n * V * a
        tile = min(max(budget, min(V, MIN_VOCAB_TILE) * a) if budget is not None else whole, whole)
        hidden_acc = n * H * (a + e) if tile < whole else 0
        weight_acc = min(V, MIN_VOCAB_TILE) * H * a if tile < n * min(V, MIN_VOCAB_TILE) * a else 0
        return (outputs + max(logits + scratch(logits), tile + scratch(tile)) + rows(n) + hidden_acc
                + upcast_weight + weight_acc + small)
    if path == "fused":
        if chunks > 1 and accum_dtype == "fp32" and e != a:
            accumulator = V * H * a
        elif half_upcast:
            accumulator = max(V * H * a if chunks == 1 else 0, logits)  # the fp32 product before its cast
        else:
            accumulator = 0
        return outputs + logits + scratch(logits) + rows(c) + accumulator + upcast_weight + small
    raise ValueError(f"path must be 'forward', 'recompute' or 'fused', got {path!r}")
