"""Discriminative Fine-Tuning losses (DFT and DFT2) on the fused log-prob layer.

Guo et al. 2025, "Discriminative Finetuning of Generative LLMs without Reward Models and Human
Preference Data". For group i with positive y_i and K negatives y'_ij sampled from the base model:

* ``s(y)`` = sum of response-token log-probs (DFT) or their mean ``s̄(y)`` (DFT2).
* DFT:  ``d_ij = s(y'_ij) / tau - r_ij`` with ``r_ij = log pi_ref(y'_ij | x_i)`` (precomputed).
  DFT2: ``d_ij = s̄(y'_ij) / tau``.
* batch estimate ``w_i = log(gamma) + logsumexp_j d_ij - log K``; moving average in log space
  ``u_i <- logaddexp(log(1 - gamma) + u_i(prev), w_i)`` (with ``gamma = 1``: ``u_i = w_i``);
  without a state, ``u_i = logsumexp_j d_ij - log K``.
* ``omega_ij = exp(d_ij - u_i)`` (constants: no gradient).
* ``loss_i = -s(y_i) + (1/K) sum_j omega_ij * s(y'_ij)``; ``loss = mean_i loss_i``.

The math is the pure :func:`dftkern.losses.formulas.dft_step`; :class:`DFTState` owns the state.

Non-finite inputs. The state never becomes non-finite: a group whose ``d_ij`` or positive score
is NaN/inf, or whose negatives have no response token at all (all ignored, or ``T = 0``), is
*not* written (its ``u`` keeps the previous value, ``num_updates`` does not move); the call's
``stats["skipped_groups"]`` counts them. The *loss* of such a call may be non-finite (a NaN in a
hidden row gives a NaN loss): the trainer checks the loss and skips that optimizer step.
"""

from __future__ import annotations

import torch

from ..functional import follows_autocast
from ..grouped import grouped_sequence_loss
from ._common import (
    check_bool,
    check_float_tensor,
    check_ids,
    check_int,
    count_rows,
    in_backward_recompute,
    loss_dtype,
)
from .formulas import dft_step
from .registry import get_loss, loss_names
from .state import DFTState

__all__ = ["fused_dft_loss", "DFT_DEFAULTS"]

DFT_DEFAULTS = {name: dict(get_loss(name).defaults) for name in loss_names("dft")}
"""Per-variant defaults (from the registry): DFT tau 1.0 / gamma 0.85, DFT2 tau 0.3 / gamma 0.9."""


@follows_autocast
def fused_dft_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, num_negatives: int,
                   ids: torch.Tensor | None = None, state: DFTState | None = None,
                   ref_logps: torch.Tensor | None = None, tau: float | None = None, gamma: float | None = None,
                   variant: str = "dft", ignore_index: int = -100, temperature: float = 1.0,
                   softcap: float | None = None, bias: torch.Tensor | None = None, return_stats: bool = False,
                   cu_seqlens=None, backend: str = "auto", chunk_bytes: int | None = None,
                   schedule: str = "auto", validate: bool | None = None,
                   valid_positions: torch.Tensor | None = None, accum_dtype="fp32"):
    """DFT / DFT2 loss with fused log-probs (no ``[N, V]`` logits).

    Args:
        hidden: ``[G*(1+K), T, H]`` (float32/float16/bfloat16), rows grouped per example: row
            ``g*(1+K)`` is group g's positive, the next K rows its negatives. Or packed ``[N, H]``
            with ``cu_seqlens [G*(1+K)+1]``.
        weight: ``[V, H]`` LM-head weight; labels: int64 ``[G*(1+K), T]`` (or ``[N]``), aligned
            (no shift inside), prompt/padding tokens = ignore_index.
        num_negatives: K >= 1 (an int).
        ids: int64 ``[G]`` example ids into ``state`` (required with a state).
        state: :class:`DFTState`, updated in place exactly once per call, in the forward. None:
            ``u`` is the batch estimate and ``gamma`` is unused.
        ref_logps: ``[G, K]`` reference sequence log-probs of the negatives: required for
            variant "dft", rejected for "dft2".
        tau: in [1e-6, 1e6]; None -> the paper's default for the variant (DFT 1.0, DFT2 0.3).
        gamma: in (0, 1]; None -> the variant's default (DFT 0.85, DFT2 0.9).
        schedule: "auto" | "fused" (gradients computed in the forward, 6NHV) | "recompute" (8NHV).
        valid_positions: optional int64 1-D tensor (CPU preferred) of the flat positions of
            ``labels`` that are not ``ignore_index``, increasing; saves the engine's one host sync
            on CUDA (see :func:`dftkern.fused_token_loss`).
        accum_dtype: ``dW`` accumulation across chunks: "fp32" (default) or the weight's dtype
            ("weight"); see :func:`dftkern.fused_linear_cross_entropy`.
        return_stats: bool; also return a dict of detached tensors: ``seq_logps [R]`` (sums),
            ``token_counts [R]``, ``scores [G, 1+K]`` (s, or s̄ for dft2), ``d [G, K]``,
            ``weights [G, K]`` (omega), ``u [G]`` (the normalizer used), ``group_losses [G]`` and
            ``skipped_groups`` (int64 scalar: groups whose batch estimate is unusable — non-finite,
            or no negative response token — so that a state keeps their previous ``u``; counted
            the same way without a state, where nothing is written).

    Returns:
        scalar float32 loss (float64 for float64 inputs), and stats. The loss may be NaN/inf when
        the inputs are; the state stays finite.
    """
    if variant not in DFT_DEFAULTS:
        raise ValueError(f"variant must be one of {tuple(DFT_DEFAULTS)}, got {variant!r}")
    spec = get_loss(variant)
    k = check_int("num_negatives", num_negatives, 1)
    check_bool("return_stats", return_stats)
    hp = spec.hyperparameters(**{name: value for name, value in (("tau", tau), ("gamma", gamma))
                                 if value is not None})
    tau, gamma = hp["tau"], hp["gamma"]
    n_rows = count_rows(hidden, labels, cu_seqlens)
    if n_rows <= 0 or n_rows % (1 + k) != 0:
        raise ValueError(f"the number of rows ({n_rows}) must be a positive multiple of 1 + num_negatives = {1 + k}")
    n_groups = n_rows // (1 + k)
    device, dtype = hidden.device, loss_dtype(hidden)
    if spec.needs_ref:
        if ref_logps is None:
            raise ValueError(f"ref_logps [G, K] is required for variant={variant!r} (reference log-probs of the "
                             f"negatives)")
        ref = check_float_tensor("ref_logps", ref_logps, (n_groups, k), device, validate, dtype=dtype)
    else:
        if ref_logps is not None:
            raise ValueError(f"ref_logps must be None for variant={variant!r} (reference-free)")
        ref = None
    if state is not None:
        if not isinstance(state, DFTState):
            raise TypeError(f"state must be a DFTState or None, got {type(state).__name__}")
        if ids is None:
            raise ValueError("ids [G] are required when a state is given")
        ids = check_ids(ids, n_groups, state.num_examples, state.device, validate)
    elif ids is not None:
        ids = check_ids(ids, n_groups, 2**62, device, validate)

    recompute = state is not None and in_backward_recompute()
    recomputed_u = state.take_recomputed_values(ids) if recompute else None
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (u, update) per chunk of groups

    def group_loss(seq_sums: torch.Tensor, counts: torch.Tensor, g0: int, g1: int, token_term_sums=None):
        sums = seq_sums.reshape(g1 - g0, 1 + k).to(dtype)
        group_counts = counts.reshape(g1 - g0, 1 + k)
        scores = sums / group_counts.clamp_min(1) if spec.mean_scores else sums
        u_prev = u_replay = None
        if recompute and recomputed_u is not None:
            u_replay = recomputed_u[g0:g1].to(scores.device)
        elif state is not None:
            u_prev = state.u[ids[g0:g1]].to(scores.device)
        step = dft_step(scores, ref=None if ref is None else ref[g0:g1], counts=group_counts, tau=tau, gamma=gamma,
                        u_prev=u_prev, u=u_replay)
        if u_prev is not None:
            pending.append((step.u, step.update))
        stats = {"scores": scores.detach(), "d": step.d, "weights": step.weights, "u": step.u,
                 "group_losses": step.per_group.detach(), "skipped": ~step.update}
        return step.per_group, stats

    loss, seq_logps, counts, stats = grouped_sequence_loss(
        hidden, weight, labels, rows_per_group=1 + k, group_loss=group_loss, cu_seqlens=cu_seqlens, bias=bias,
        ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
        chunk_bytes=chunk_bytes, schedule=schedule, validate=validate, valid_positions=valid_positions,
        accum_dtype=accum_dtype)
    if pending:  # every group was evaluated: commit the state once (finite, non-empty groups only)
        state.write(ids, torch.cat([u for u, _ in pending]), update=torch.cat([m for _, m in pending]))
    if not return_stats:
        return loss
    stats = dict(stats)
    skipped = stats.pop("skipped", None)
    stats["skipped_groups"] = (skipped.sum() if skipped is not None else torch.zeros((), dtype=torch.int64)).to(
        torch.int64)
    return loss, dict(stats, seq_logps=seq_logps, token_counts=counts)
