"""Sequence ops and grouped sequence losses: row layouts, group planning, the group-loss protocol.

* :func:`sequence_logprobs` — per-row sums/means of token log-probs.
* :func:`grouped_sequence_loss` — the layer under every sequence loss: a scalar loss that is a
  sum of per-group terms of sequence log-probs (:data:`GroupLoss`). When each group fits the
  chunk budget its gradients are computed inside the forward pass (schedule "fused", 6nHV, no
  recompute); otherwise schedule "recompute" (token op + autograd, 8nHV).

Rows are a padded ``[R, T]`` batch or a packed one with ``cu_seqlens`` (:class:`RowLayout`).
Only valid tokens (label != ignore_index) enter the products; per-row sums run over them in
"compact" order (:meth:`RowLayout.compact`). The autograd Functions are in :mod:`dftkern.functional`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ._validation import check_row_layout, cu_seqlens_bounds
from .chunking import ValidTokens, tokens_per_chunk
from .functional import (
    TokenCall,
    compact_token_logprobs,
    find_valid_tokens,
    follows_autocast,
    in_forward_gradients,
    input_grads_wanted,
    prepare_inputs,
    row_sums,
    with_precomputed_gradients,
)

__all__ = [
    "RowLayout",
    "make_layout",
    "sequence_logprobs",
    "GroupLoss",
    "TokenTerm",
    "grouped_sequence_loss",
]


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

    def compact(self, tokens: ValidTokens) -> RowLayout:
        """The same rows over the valid tokens only (compact order; packed unless nothing is dropped)."""
        if tokens.all_valid:
            return self
        return RowLayout(tuple(tokens.compact_offsets(self.bounds)), None)

    def token_counts(self, device: torch.device) -> torch.Tensor:
        """float32 ``[R]`` tokens per row (of a compact layout: valid tokens per row); no device sync."""
        return torch.tensor([b1 - b0 for b0, b1 in zip(self.bounds, self.bounds[1:])], dtype=torch.float32,
                            device=device)

    def segment_sum(self, token_values: torch.Tensor, row0: int = 0, row1: int | None = None) -> torch.Tensor:
        """Differentiable per-row sums of ``token_values`` (the tokens of rows ``row0..row1``).

        Padded rows sum by a reshape; packed rows by :func:`dftkern.functional.row_sums` (fp64,
        deterministic; a NaN or inf in one row, forward or backward, never reaches another row).
        """
        row1 = self.num_rows if row1 is None else row1
        if self.padded_len is not None:
            return token_values.reshape(row1 - row0, self.padded_len).sum(1)
        t0 = self.bounds[row0]
        local = torch.tensor([b - t0 for b in self.bounds[row0:row1 + 1]], device=token_values.device)
        return row_sums(token_values, local)


def make_layout(hidden: torch.Tensor, labels: torch.Tensor, cu_seqlens) -> tuple[torch.Tensor, torch.Tensor, RowLayout]:
    """Flatten ``hidden``/``labels`` and describe the rows.

    Padded: hidden ``[R, T, H]``, labels ``[R, T]``, cu_seqlens None. Packed: hidden ``[N, H]``,
    labels ``[N]``, cu_seqlens ``[R+1]`` int (host list/tensor preferred: a CUDA tensor costs one sync).
    """
    check_row_layout(hidden, cu_seqlens)
    if cu_seqlens is None:
        rows, seq_len = hidden.shape[0], hidden.shape[1]
        layout = RowLayout(tuple(range(0, rows * seq_len + 1, seq_len)) if seq_len > 0 else (0,) * (rows + 1),
                           seq_len if seq_len > 0 else None)
        return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), layout
    bounds = cu_seqlens_bounds(cu_seqlens)
    if isinstance(bounds, torch.Tensor):
        bounds = [int(b) for b in bounds.tolist()]
    if len(bounds) < 1 or bounds[0] != 0 or bounds[-1] != hidden.shape[0]:
        raise ValueError(f"cu_seqlens must start at 0 and end at N={hidden.shape[0]}, got "
                         f"{bounds[:3]}...{bounds[-2:]}")
    if any(b1 < b0 for b0, b1 in zip(bounds, bounds[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")
    return hidden, labels, RowLayout(tuple(bounds), None)


def _prepare_rows(hidden, weight, labels, cu_seqlens, *, bias, ignore_index, temperature, softcap, backend,
                  chunk_bytes, validate, valid_positions, accum_dtype, grouped) -> tuple[TokenCall, RowLayout]:
    """Checks (the layout first), the flat token rows, their row layout and the valid tokens."""
    check_row_layout(hidden, cu_seqlens)
    labels, engine, budget, transform = prepare_inputs(hidden, weight, labels, bias, ignore_index, temperature,
                                                       softcap, backend, chunk_bytes, validate, accum_dtype,
                                                       grouped=grouped)
    hidden2d, labels1d, layout = make_layout(hidden, labels, cu_seqlens)
    tokens = find_valid_tokens(labels1d, ignore_index, valid_positions, validate)
    return TokenCall(hidden2d, labels1d, labels, engine, budget, transform, tokens), layout


@follows_autocast
def sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                      average: bool = False, cu_seqlens=None, bias: torch.Tensor | None = None,
                      ignore_index: int = -100, temperature: float = 1.0, softcap: float | None = None,
                      backend: str = "auto", chunk_bytes: int | None = None,
                      validate: bool | None = None, valid_positions: torch.Tensor | None = None,
                      accum_dtype="fp32") -> torch.Tensor:
    """Sequence log-probs: the sum (or, with ``average=True``, the mean) of each row's token log-probs.

    Args:
        hidden: ``[B, T, H]`` with labels ``[B, T]``; or packed ``[N, H]`` with labels ``[N]`` and
            ``cu_seqlens`` ``[B+1]``. Other arguments as in :func:`dftkern.fused_linear_logprobs`.
    Returns:
        float32 ``[B]``. A row with no non-ignored token gives 0 (never NaN).
    """
    if not isinstance(average, bool):
        raise TypeError(f"average must be a bool, got {type(average).__name__}")
    call, layout = _prepare_rows(hidden, weight, labels, cu_seqlens, bias=bias, ignore_index=ignore_index,
                                 temperature=temperature, softcap=softcap, backend=backend, chunk_bytes=chunk_bytes,
                                 validate=validate, valid_positions=valid_positions, accum_dtype=accum_dtype,
                                 grouped=False)
    token_logp = compact_token_logprobs(call.hidden2d, weight, bias, call.labels1d, call.tokens, call.transform,
                                        call.engine, call.budget, accum_dtype=accum_dtype)
    rows = layout.compact(call.tokens)
    sums = rows.segment_sum(token_logp)
    if not average:
        return sums
    return sums / rows.token_counts(sums.device).to(sums.dtype).clamp_min(1)


# ---------------------------------------------------------------------------------------------
# Grouped sequence losses
# ---------------------------------------------------------------------------------------------

GroupLoss = Callable[..., tuple[torch.Tensor, dict]]
"""``group_loss(seq_sums [r], token_counts [r], g0, g1, token_term_sums=None) -> (per_group_loss [g1 - g0], stats)``.

``seq_sums`` are the differentiable sums of token log-probs of rows ``g0*n .. g1*n`` (n rows per
group), ``token_counts`` their numbers of valid tokens (float32); ``stats`` maps names to
detached tensors with leading dim ``g1 - g0``. ``token_term_sums [r]`` (the per-row sums of
:data:`TokenTerm` over valid tokens) is passed only when the call has a ``token_term``.
"""

TokenTerm = Callable[[torch.Tensor], torch.Tensor]
"""``token_term(token_logp [n]) -> [n]``: an elementwise differentiable function of valid tokens' log-probs."""


def _plan_group_chunks(bounds: Sequence[int], rows_per_group: int, max_tokens: int) -> list[tuple[int, int]] | None:
    """Greedy chunks ``(g0, g1)`` of whole groups whose token spans (``bounds``) hold at most
    ``max_tokens`` tokens each; None if a group is too big."""
    n_groups = (len(bounds) - 1) // rows_per_group
    chunks, g0 = [], 0
    while g0 < n_groups:
        g1 = g0
        start = bounds[g0 * rows_per_group]
        while g1 < n_groups and bounds[(g1 + 1) * rows_per_group] - start <= max_tokens:
            g1 += 1
        if g1 == g0:
            return None
        chunks.append((g0, g1))
        g0 = g1
    return chunks


def _cat_stats(parts: Sequence[dict]) -> dict:
    if not parts:
        return {}
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _resolve_group_loss(group_loss, head) -> GroupLoss:
    if group_loss is not None and head is not None:
        raise TypeError("pass group_loss (head is its old name), not both")
    group_loss = group_loss if group_loss is not None else head
    if group_loss is None:
        raise TypeError("grouped_sequence_loss needs group_loss=(seq_sums, token_counts, g0, g1) -> "
                        "(per_group_loss, stats)")
    if not callable(group_loss):
        raise TypeError(f"group_loss must be callable, got {type(group_loss).__name__}")
    return group_loss


@follows_autocast
def grouped_sequence_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          rows_per_group: int, group_loss: GroupLoss | None = None, head: GroupLoss | None = None,
                          token_term: TokenTerm | None = None, cu_seqlens=None,
                          bias: torch.Tensor | None = None, ignore_index: int = -100,
                          temperature: float = 1.0, softcap: float | None = None, backend: str = "auto",
                          chunk_bytes: int | None = None, schedule: str = "auto",
                          validate: bool | None = None, valid_positions: torch.Tensor | None = None,
                          accum_dtype="fp32"):
    """A scalar ``loss = (1/G) sum_g group_loss(group g)`` over groups of ``rows_per_group`` consecutive rows.

    Args:
        hidden/labels/cu_seqlens: a padded ``[R, T, H]``/``[R, T]`` or packed layout (see
            :func:`sequence_logprobs`); ``R = G * rows_per_group``.
        group_loss: the per-group loss on sequence log-prob sums (see :data:`GroupLoss`), called
            exactly once for every group in a call (per chunk of groups under the fused
            schedule). ``head`` is its old name, still accepted.
        token_term: optional :data:`TokenTerm`; its per-row sums reach ``group_loss`` as
            ``token_term_sums``.
        schedule: "auto" (fused when every group fits the chunk budget and a gradient is needed),
            "fused" (gradients in the forward, 6nHV), "recompute" (token op + autograd, 8nHV).
            Groups are planned on their full token spans (prompt and padding included), so a
            chunk's logits never exceed the budget whatever the mask.
        valid_positions, accum_dtype, validate: as in :func:`dftkern.fused_token_loss`.

    Returns:
        ``(loss, seq_logps [R] detached, token_counts [R], stats)`` with stats the concatenated
        per-group stats of ``group_loss``.
    """
    group_loss = _resolve_group_loss(group_loss, head)
    if token_term is not None and not callable(token_term):
        raise TypeError(f"token_term must be callable or None, got {type(token_term).__name__}")
    if isinstance(rows_per_group, bool) or not isinstance(rows_per_group, int) or rows_per_group < 1:
        raise ValueError(f"rows_per_group must be an int >= 1, got {rows_per_group!r}")
    if schedule not in ("auto", "fused", "recompute"):
        raise ValueError(f"schedule must be 'auto', 'fused' or 'recompute', got {schedule!r}")
    call, layout = _prepare_rows(hidden, weight, labels, cu_seqlens, bias=bias, ignore_index=ignore_index,
                                 temperature=temperature, softcap=softcap, backend=backend, chunk_bytes=chunk_bytes,
                                 validate=validate, valid_positions=valid_positions, accum_dtype=accum_dtype,
                                 grouped=True)
    if layout.num_rows == 0 or layout.num_rows % rows_per_group != 0:
        raise ValueError(f"the number of rows ({layout.num_rows}) must be a positive multiple of the group "
                         f"size {rows_per_group}")
    n_groups = layout.num_rows // rows_per_group
    rows = layout.compact(call.tokens)
    counts = rows.token_counts(hidden.device)
    wants_grad = input_grads_wanted(hidden, weight, bias)

    def call_group_loss(token_logp, r0, r1, g0, g1):
        sums = rows.segment_sum(token_logp, r0, r1)
        extra = {} if token_term is None else {"token_term_sums": rows.segment_sum(token_term(token_logp), r0, r1)}
        per_group, stats = group_loss(sums, counts[r0:r1], g0, g1, **extra)
        return sums, per_group, stats

    group_chunks = None
    if wants_grad and schedule != "recompute":
        max_tokens = tokens_per_chunk(call.budget, weight)
        group_chunks = _plan_group_chunks(layout.bounds, rows_per_group, max_tokens)
        if group_chunks is None and schedule == "fused":
            raise ValueError(f"schedule='fused' needs every group to fit the chunk budget ({call.budget} bytes = "
                             f"{max_tokens} tokens); raise chunk_bytes or use schedule='recompute'")

    if group_chunks is None:
        token_logp = compact_token_logprobs(call.hidden2d, weight, bias, call.labels1d, call.tokens, call.transform,
                                            call.engine, call.budget, accum_dtype=accum_dtype)
        sums, per_group, stats = call_group_loss(token_logp, 0, layout.num_rows, 0, n_groups)
        return per_group.sum() / n_groups, sums.detach(), counts, stats

    per_group_losses, seq_parts, stat_parts = [], [], []

    def chunk_gradient(c, logp, entropy, positions):
        g0, g1 = group_chunks[c]
        with torch.enable_grad():
            lp = logp.detach().requires_grad_(True)
            sums, per_group, stats = call_group_loss(lp, g0 * rows_per_group, g1 * rows_per_group, g0, g1)
            total = per_group.sum() / n_groups
            grad = torch.autograd.grad(total, lp, allow_unused=True)[0] if total.requires_grad else None
        per_group_losses.append(per_group.detach())
        seq_parts.append(sums.detach())
        stat_parts.append(stats)
        return (torch.zeros_like(logp) if grad is None else grad), None

    token_ranges = [(layout.bounds[g0 * rows_per_group], layout.bounds[g1 * rows_per_group]) for g0, g1 in group_chunks]
    grads = in_forward_gradients(call, weight, bias, chunk_gradient, chunk_ranges=token_ranges, accum_dtype=accum_dtype)
    loss = torch.cat(per_group_losses).sum() / n_groups
    return (with_precomputed_gradients(loss, call.hidden2d, weight, bias, grads), torch.cat(seq_parts), counts,
            _cat_stats(stat_parts))
