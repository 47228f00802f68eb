"""Autograd layer: thin ``torch.autograd.Function`` wrappers over :mod:`dftkern.chunking`.

* :func:`fused_linear_logprobs` — token log-probs ``log softmax(h W^T + b)[y]``; forward 2NHV,
  backward recomputes the logits (6NHV): works for any upstream gradient.
* :func:`sequence_logprobs` — per-row sums/means of those.
* :func:`grouped_sequence_loss` — the layer under every sequence loss: a scalar loss that is a sum
  of per-group terms of sequence log-probs. When each group fits the chunk budget its gradients
  are computed inside the forward pass (schedule "fused", 6NHV, no recompute); otherwise
  schedule "recompute" (token op + autograd, 8NHV).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ._validation import check_label_range, check_linear_inputs
from .chunking import (
    backward_logprobs,
    forward_logprobs,
    forward_with_grad,
    index_ranges,
    resolve_chunk_bytes,
    tokens_per_chunk,
)
from .engines import LogitTransform, TorchRowEngine, TritonRowEngine, compute_dtype

__all__ = [
    "fused_linear_logprobs",
    "fused_linear_cross_entropy",
    "sequence_logprobs",
    "grouped_sequence_loss",
    "RowLayout",
    "select_engine",
]

_BACKENDS = ("auto", "triton", "torch")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton missing or broken
        return False
    return True


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_engine(backend: str, device: torch.device, dtype: torch.dtype):
    """Pick the row engine. ``DFTKERN_BACKEND`` (triton|torch) overrides ``backend="auto"``.

    auto: Triton for CUDA tensors of fp32/fp16/bf16, the PyTorch engine otherwise (CPU, fp64).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("DFTKERN_BACKEND", "auto").strip().lower() or "auto"
        if env not in _BACKENDS:
            raise ValueError(f"DFTKERN_BACKEND must be one of {_BACKENDS}, got {env!r}")
        backend = env
    if backend == "auto":
        use_triton = device.type == "cuda" and dtype != torch.float64 and _triton_available()
        return TritonRowEngine() if use_triton else TorchRowEngine()
    if backend == "torch":
        return TorchRowEngine()
    if not _triton_available():
        raise ValueError("backend='triton' needs the triton package, which is not importable")
    if device.type != "cuda" and not _interpreter_on():
        raise ValueError(f"backend='triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1")
    if dtype == torch.float64:
        raise ValueError("backend='triton' supports float32/float16/bfloat16 inputs, got float64; use 'torch'")
    return TritonRowEngine()


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, tf, engine, budget):
        logp, lse = forward_logprobs(hidden, weight, bias, labels, tf, engine, budget)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.tf, ctx.engine, ctx.budget = tf, engine, budget
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h, grad_w, grad_b = backward_logprobs(
            hidden, weight, bias, labels, lse, grad_logp.contiguous(), ctx.tf, ctx.engine, ctx.budget,
            need_hidden=need_h, need_weight=need_w, need_bias=need_b)
        return grad_h, grad_w, grad_b, None, None, None, None


def _prepare(hidden, weight, labels, bias, ignore_index, temperature, softcap, backend, chunk_bytes, validate,
             grouped=False):
    labels = check_linear_inputs(hidden, weight, labels, bias, ignore_index, temperature, softcap)
    check_label_range(labels, weight.shape[0], ignore_index, validate)
    engine = select_engine(backend, hidden.device, hidden.dtype)
    budget = resolve_chunk_bytes(chunk_bytes, hidden.device, grouped=grouped)
    tf = LogitTransform(float(temperature), None if softcap is None else float(softcap), ignore_index)
    return labels, engine, budget, tf


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: torch.Tensor | None = None, ignore_index: int = -100,
                          temperature: float = 1.0, softcap: float | None = None,
                          backend: str = "auto", chunk_bytes: int | None = None,
                          validate: bool | None = None) -> torch.Tensor:
    """Per-token log-probabilities of ``labels`` under ``softmax(z)``, never materializing ``[N, V]``.

    ``z = (hidden @ weight.T + bias) / temperature``, then ``softcap * tanh(z / softcap)`` if set.

    Args:
        hidden: ``[..., H]`` float32/float16/bfloat16 (float64 on the torch engine), any strides.
        weight: ``[V, H]``, same dtype and device (may be tied to an input embedding).
        labels: int64 ``[...]`` = hidden's leading shape, already aligned: ``labels[..., t]`` is
            predicted from ``hidden[..., t]`` (no shift inside).
        bias: ``[V]`` or None. ignore_index: label value whose log-prob is 0 and gets no gradient.
        backend: "auto" (Triton on CUDA, PyTorch otherwise; env ``DFTKERN_BACKEND`` overrides),
            "triton" or "torch".
        chunk_bytes: workspace budget (see :mod:`dftkern.chunking`); env ``DFTKERN_CHUNK_BYTES``.
        validate: check label range on CUDA too (costs one host sync; env ``DFTKERN_VALIDATE=1``).
            On CPU labels are always checked; on CUDA without validation an out-of-range label
            yields NaN at that position.

    Returns:
        float32 tensor of shape ``labels.shape`` (float64 for float64 inputs); 0.0 where
        ``labels == ignore_index``. Differentiable w.r.t. hidden, weight and bias for any upstream
        gradient; the gradients come back in the input dtypes. Cost: 2NHV forward, 6NHV backward.
    """
    labels, engine, budget, tf = _prepare(hidden, weight, labels, bias, ignore_index, temperature, softcap,
                                          backend, chunk_bytes, validate)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    logp = _LinearLogprobs.apply(hidden2d, weight, bias, labels.reshape(-1), tf, engine, budget)
    return logp.view(labels.shape)


def _input_grads_wanted(hidden, weight, bias) -> bool:
    """Whether autograd will want gradients of these inputs (decides the in-forward gradient paths)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))


def _scaled_saved_grads(ctx, grad_loss: torch.Tensor) -> tuple:
    """Backward of a scalar loss whose input gradients were computed in the forward and saved:
    ``(grad_hidden, grad_weight, grad_bias) * grad_loss`` (None stays None)."""
    return tuple(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)


class _FusedTokenCrossEntropy(torch.autograd.Function):
    """``-scale * sum_t logp_t`` with its gradients computed inside the forward (6NHV)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, tf, engine, chunk_ranges, scale):
        def head(c: int, logp_chunk: torch.Tensor) -> torch.Tensor:
            return (-scale).to(logp_chunk.dtype).expand_as(logp_chunk)

        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        logp, grad_h, grad_w, grad_b = forward_with_grad(hidden, weight, bias, labels, tf, engine, chunk_ranges,
                                                         head, need_hidden=need_h, need_weight=need_w,
                                                         need_bias=need_b)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return -(logp.sum() * scale.to(logp.dtype))

    @staticmethod
    def backward(ctx, grad_loss):
        return _scaled_saved_grads(ctx, grad_loss) + (None,) * 5


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               reduction: str = "mean", bias: torch.Tensor | None = None,
                               ignore_index: int = -100, temperature: float = 1.0,
                               softcap: float | None = None, backend: str = "auto",
                               chunk_bytes: int | None = None, validate: bool | None = None) -> torch.Tensor:
    """Cross-entropy ``-log p(label)`` of the fused head, reduced to a scalar: the SFT token loss.

    Because the loss is a scalar, its gradient w.r.t. every log-prob is known in the forward, so
    the gradients are computed there from the same logits (6NHV, the matmul floor) and backward
    only scales them — unlike :func:`fused_linear_logprobs` (8NHV), which accepts any upstream
    gradient.

    Its default chunk budget is the sequence losses' (4 GiB on CUDA): fewer chunks mean fewer
    passes over the fp32 ``dW`` accumulator.

    Args:
        as :func:`fused_linear_logprobs`; reduction: "mean" (over non-ignored tokens; 0 when there
        are none), "sum", or "none" (per-token ``-logp``, through :func:`fused_linear_logprobs`).
    Returns:
        float32 scalar (``labels.shape`` for "none").
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if reduction == "none":
        return -fused_linear_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                      temperature=temperature, softcap=softcap, backend=backend,
                                      chunk_bytes=chunk_bytes, validate=validate)
    labels, engine, budget, tf = _prepare(hidden, weight, labels, bias, ignore_index, temperature, softcap,
                                          backend, chunk_bytes, validate, grouped=True)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    labels1d = labels.reshape(-1)
    acc_dtype = compute_dtype(weight.dtype)
    if reduction == "mean":  # a device tensor: no host sync
        scale = 1.0 / (labels1d != ignore_index).sum().clamp_min(1).to(acc_dtype)
    else:
        scale = torch.ones((), dtype=acc_dtype, device=hidden.device)
    if not _input_grads_wanted(hidden, weight, bias):
        with torch.no_grad():
            logp, _ = forward_logprobs(hidden2d, weight, bias, labels1d, tf, engine, budget)
        return -(logp.sum() * scale)
    rows = tokens_per_chunk(budget, weight, engine.name, tf, bias is not None)
    chunk_ranges = index_ranges(hidden2d.shape[0], rows) or [(0, 0)]
    return _FusedTokenCrossEntropy.apply(hidden2d, weight, bias, labels1d, tf, engine, chunk_ranges, scale)


# ---------------------------------------------------------------------------------------------
# Row layouts (padded [R, T] or packed with cu_seqlens) and segment sums
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowLayout:
    """Where each sequence (row) lives in the flattened token axis.

    ``bounds`` is a host list of R+1 token offsets (``cu_seqlens``); ``padded_len`` is T for a
    padded ``[R, T]`` layout (rows are equal-length, contiguous) and None for a packed one.
    """

    bounds: tuple[int, ...]
    padded_len: int | None

    @property
    def num_rows(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_tokens(self) -> int:
        return self.bounds[-1]

    def segment_sum(self, token_values: torch.Tensor, row0: int = 0, row1: int | None = None) -> torch.Tensor:
        """Differentiable per-row sums of ``token_values`` (the tokens of rows ``row0..row1``).

        Padded rows sum by a reshape; packed rows by an fp64 prefix sum (deterministic on CUDA).
        """
        row1 = self.num_rows if row1 is None else row1
        if self.padded_len is not None:
            return token_values.reshape(row1 - row0, self.padded_len).sum(1)
        t0 = self.bounds[row0]
        local = torch.tensor([b - t0 for b in self.bounds[row0:row1 + 1]], device=token_values.device)
        prefix = torch.cat([token_values.new_zeros(1, dtype=torch.float64),
                            torch.cumsum(token_values.to(torch.float64), 0)])
        return (prefix[local[1:]] - prefix[local[:-1]]).to(token_values.dtype)


def make_layout(hidden: torch.Tensor, labels: torch.Tensor, cu_seqlens) -> tuple[torch.Tensor, torch.Tensor, RowLayout]:
    """Flatten ``hidden``/``labels`` and describe the rows.

    Padded: hidden ``[R, T, H]``, labels ``[R, T]``, cu_seqlens None. Packed: hidden ``[N, H]``,
    labels ``[N]``, cu_seqlens ``[R+1]`` int (host list/tensor preferred: a CUDA tensor costs one sync).
    """
    if cu_seqlens is None:
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be [R, T, H] (or [N, H] with cu_seqlens), got shape {tuple(hidden.shape)}")
        rows, seq_len = hidden.shape[0], hidden.shape[1]
        layout = RowLayout(tuple(range(0, rows * seq_len + 1, seq_len)) if seq_len > 0 else (0,) * (rows + 1),
                           seq_len if seq_len > 0 else None)
        return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), layout
    if hidden.dim() != 2:
        raise ValueError(f"with cu_seqlens, hidden must be packed [N, H], got shape {tuple(hidden.shape)}")
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.is_floating_point() or cu_seqlens.dim() != 1:
            raise TypeError(f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        bounds = [int(b) for b in cu_seqlens.tolist()]
    else:
        bounds = [int(b) for b in cu_seqlens]
    if len(bounds) < 1 or bounds[0] != 0 or bounds[-1] != hidden.shape[0]:
        raise ValueError(f"cu_seqlens must start at 0 and end at N={hidden.shape[0]}, got "
                         f"{bounds[:3]}...{bounds[-2:]}")
    if any(b1 < b0 for b0, b1 in zip(bounds, bounds[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")
    return hidden, labels, RowLayout(tuple(bounds), None)


def sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                      average: bool = False, cu_seqlens=None, bias: torch.Tensor | None = None,
                      ignore_index: int = -100, temperature: float = 1.0, softcap: float | None = None,
                      backend: str = "auto", chunk_bytes: int | None = None,
                      validate: bool | None = None) -> torch.Tensor:
    """Sequence log-probs: the sum (or, with ``average=True``, the mean) of each row's token log-probs.

    Args:
        hidden: ``[B, T, H]`` with labels ``[B, T]``; or packed ``[N, H]`` with labels ``[N]`` and
            ``cu_seqlens`` ``[B+1]``. Other arguments as in :func:`fused_linear_logprobs`.
    Returns:
        float32 ``[B]``. A row with no non-ignored token gives 0 (never NaN).
    """
    token_logp = fused_linear_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                       temperature=temperature, softcap=softcap, backend=backend,
                                       chunk_bytes=chunk_bytes, validate=validate)
    _, flat_labels, layout = make_layout(hidden, labels, cu_seqlens)
    sums = layout.segment_sum(token_logp.reshape(-1))
    if not average:
        return sums
    counts = layout.segment_sum((flat_labels != ignore_index).to(sums.dtype))
    return sums / counts.clamp_min(1)


# ---------------------------------------------------------------------------------------------
# Grouped sequence losses
# ---------------------------------------------------------------------------------------------

GroupHead = Callable[..., tuple[torch.Tensor, dict]]
"""``head(seq_sums [r], token_counts [r], g0, g1) -> (per_group_loss [g1 - g0], stats)``.

``seq_sums`` are the differentiable sums of token log-probs of rows ``g0*n .. g1*n`` (n rows
per group); ``stats`` maps names to detached tensors with leading dim ``g1 - g0``. A head with
an attribute ``token_term`` (a function of token log-probs) also receives
``token_term_sums [r]``, the per-row sums of ``token_term(logp_t)`` over non-ignored tokens.
"""


def _plan_group_chunks(layout: RowLayout, rows_per_group: int, max_tokens: int) -> list[tuple[int, int]] | None:
    """Greedy chunks of whole groups with at most ``max_tokens`` tokens each; None if a group is too big."""
    n_groups = layout.num_rows // rows_per_group
    chunks, g0 = [], 0
    while g0 < n_groups:
        g1 = g0
        start = layout.bounds[g0 * rows_per_group]
        while g1 < n_groups and layout.bounds[(g1 + 1) * rows_per_group] - start <= max_tokens:
            g1 += 1
        if g1 == g0:
            return None
        chunks.append((g0, g1))
        g0 = g1
    return chunks


class _FusedGroupedLoss(torch.autograd.Function):
    """Loss and its input gradients in one forward pass; backward only scales by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, tf, engine, layout, rows_per_group, group_chunks,
                head, counts, outputs):
        n_groups = layout.num_rows // rows_per_group
        token_ranges = [(layout.bounds[g0 * rows_per_group], layout.bounds[g1 * rows_per_group])
                        for g0, g1 in group_chunks]
        per_group_losses, seq_parts, stat_parts = [], [], []
        valid = labels != tf.ignore_index

        def chunk_head(c: int, logp_chunk: torch.Tensor) -> torch.Tensor:
            g0, g1 = group_chunks[c]
            r0, r1 = g0 * rows_per_group, g1 * rows_per_group
            with torch.enable_grad():
                lp = logp_chunk.detach().requires_grad_(True)
                sums = layout.segment_sum(lp, r0, r1)
                extra = _token_term_sums(head, lp, valid[token_ranges[c][0]:token_ranges[c][1]], layout, r0, r1)
                per_group, stats = head(sums, counts[r0:r1], g0, g1, **extra)
                (grad,) = torch.autograd.grad(per_group.sum() / n_groups, lp)
            per_group_losses.append(per_group.detach())
            seq_parts.append(sums.detach())
            stat_parts.append(stats)
            return grad

        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        _, grad_h, grad_w, grad_b = forward_with_grad(hidden, weight, bias, labels, tf, engine, token_ranges,
                                                      chunk_head, need_hidden=need_h, need_weight=need_w,
                                                      need_bias=need_b)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        outputs["seq_logps"] = torch.cat(seq_parts) if seq_parts else counts.new_zeros(0)
        outputs["stats"] = _cat_stats(stat_parts)
        loss = torch.cat(per_group_losses).sum() / n_groups if per_group_losses else counts.new_zeros(())
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return _scaled_saved_grads(ctx, grad_loss) + (None,) * 9


def _token_term_sums(head, token_logp: torch.Tensor, valid: torch.Tensor, layout: RowLayout,
                     r0: int, r1: int | None) -> dict:
    """Per-row sums of ``head.token_term(logp_t)`` over non-ignored tokens, if the head asks for them."""
    token_term = getattr(head, "token_term", None)
    if token_term is None:
        return {}
    term = torch.where(valid, token_term(token_logp), torch.zeros_like(token_logp))
    return {"token_term_sums": layout.segment_sum(term, r0, r1)}


def _cat_stats(parts: Sequence[dict]) -> dict:
    if not parts:
        return {}
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def grouped_sequence_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          rows_per_group: int, head: GroupHead, cu_seqlens=None,
                          bias: torch.Tensor | None = None, ignore_index: int = -100,
                          temperature: float = 1.0, softcap: float | None = None, backend: str = "auto",
                          chunk_bytes: int | None = None, schedule: str = "auto",
                          validate: bool | None = None):
    """A scalar ``loss = (1/G) sum_g head(group g)`` over groups of ``rows_per_group`` consecutive rows.

    Args:
        hidden/labels/cu_seqlens: a padded ``[R, T, H]``/``[R, T]`` or packed layout (see
            :func:`sequence_logprobs`); ``R = G * rows_per_group``.
        head: the per-group loss on sequence log-prob sums (see :data:`GroupHead`). It is called
            exactly once for every group in a call (per chunk of groups under the fused schedule).
        schedule: "auto" (fused when every group fits the chunk budget and a gradient is needed),
            "fused" (gradients in the forward, 6NHV), "recompute" (token op + autograd, 8NHV).

    Returns:
        ``(loss, seq_logps [R] detached, token_counts [R], stats)`` with stats the concatenated
        per-group stats of ``head``.
    """
    if schedule not in ("auto", "fused", "recompute"):
        raise ValueError(f"schedule must be 'auto', 'fused' or 'recompute', got {schedule!r}")
    labels, engine, budget, tf = _prepare(hidden, weight, labels, bias, ignore_index, temperature, softcap,
                                          backend, chunk_bytes, validate, grouped=True)
    hidden2d, labels1d, layout = make_layout(hidden, labels, cu_seqlens)
    if layout.num_rows == 0 or layout.num_rows % rows_per_group != 0:
        raise ValueError(f"the number of rows ({layout.num_rows}) must be a positive multiple of the group "
                         f"size {rows_per_group}")
    n_groups = layout.num_rows // rows_per_group
    counts = layout.segment_sum((labels1d != ignore_index).to(torch.float32))
    wants_grad = _input_grads_wanted(hidden, weight, bias)

    group_chunks = None
    if wants_grad and schedule != "recompute":
        max_tokens = tokens_per_chunk(budget, weight, engine.name, tf, bias is not None)
        group_chunks = _plan_group_chunks(layout, rows_per_group, max_tokens)
        if group_chunks is None and schedule == "fused":
            raise ValueError(f"schedule='fused' needs every group to fit the chunk budget ({budget} bytes = "
                             f"{max_tokens} tokens); raise chunk_bytes or use schedule='recompute'")

    if group_chunks is not None:
        outputs: dict = {}
        loss = _FusedGroupedLoss.apply(hidden2d, weight, bias, labels1d, tf, engine, layout, rows_per_group,
                                       group_chunks, head, counts, outputs)
        return loss, outputs["seq_logps"], counts, outputs["stats"]

    if wants_grad:
        token_logp = _LinearLogprobs.apply(hidden2d, weight, bias, labels1d, tf, engine, budget)
    else:
        with torch.no_grad():
            token_logp, _ = forward_logprobs(hidden2d, weight, bias, labels1d, tf, engine, budget)
    sums = layout.segment_sum(token_logp)
    extra = _token_term_sums(head, token_logp, labels1d != ignore_index, layout, 0, None)
    per_group, stats = head(sums, counts, 0, n_groups, **extra)
    return per_group.sum() / n_groups, sums.detach(), counts, stats
