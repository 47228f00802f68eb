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
"""

from __future__ import annotations

import math

import torch

from ..functional import grouped_sequence_loss
from ._common import check_float, check_float_tensor, check_ids, check_int, count_rows, in_backward_recompute
from .state import DFTState

__all__ = ["fused_dft_loss", "DFT_DEFAULTS"]

DFT_DEFAULTS = {"dft": {"tau": 1.0, "gamma": 0.85}, "dft2": {"tau": 0.3, "gamma": 0.9}}


def fused_dft_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, num_negatives: int,
                   ids: torch.Tensor | None = None, state: DFTState | None = None,
                   ref_logps: torch.Tensor | None = None, tau: float | None = None, gamma: float | None = None,
                   variant: str = "dft", ignore_index: int = -100, temperature: float = 1.0,
                   softcap: float | None = None, bias: torch.Tensor | None = None, return_stats: bool = False,
                   cu_seqlens=None, backend: str = "auto", chunk_bytes: int | None = None,
                   schedule: str = "auto", validate: bool | None = None):
    """DFT / DFT2 loss with fused log-probs (no ``[N, V]`` logits).

    Args:
        hidden: ``[G*(1+K), T, H]`` (float32/float16/bfloat16), rows grouped per example: row
            ``g*(1+K)`` is group g's positive, the next K rows its negatives. Or packed ``[N, H]``
            with ``cu_seqlens [G*(1+K)+1]``.
        weight: ``[V, H]`` LM-head weight; labels: int64 ``[G*(1+K), T]`` (or ``[N]``), aligned
            (no shift inside), prompt/padding tokens = ignore_index.
        num_negatives: K >= 1.
        ids: int64 ``[G]`` example ids into ``state`` (required with a state).
        state: :class:`DFTState`, updated in place exactly once per call, in the forward. None:
            ``u`` is the batch estimate and ``gamma`` is unused.
        ref_logps: ``[G, K]`` reference sequence log-probs of the negatives: required for
            variant "dft", rejected for "dft2".
        tau: temperature > 0; None -> the paper's default for the variant (DFT 1.0, DFT2 0.3).
        gamma: in (0, 1]; None -> the variant's default (DFT 0.85, DFT2 0.9).
        schedule: "auto" | "fused" (gradients computed in the forward, 6NHV) | "recompute" (8NHV).
        return_stats: also return a dict of detached tensors: ``seq_logps [R]`` (sums), ``token_counts
            [R]``, ``scores [G, 1+K]`` (s, or s̄ for dft2), ``d [G, K]``, ``weights [G, K]`` (omega),
            ``u [G]``, ``group_losses [G]``.

    Returns:
        scalar float32 loss (and stats).
    """
    if variant not in DFT_DEFAULTS:
        raise ValueError(f"variant must be 'dft' or 'dft2', got {variant!r}")
    k = check_int("num_negatives", num_negatives, 1)
    tau = DFT_DEFAULTS[variant]["tau"] if tau is None else tau
    gamma = DFT_DEFAULTS[variant]["gamma"] if gamma is None else gamma
    tau = check_float("tau", tau, low=0.0)
    gamma = check_float("gamma", gamma, low=0.0, high=1.0)
    n_rows = count_rows(hidden, cu_seqlens)
    if n_rows <= 0 or n_rows % (1 + k) != 0:
        raise ValueError(f"the number of rows ({n_rows}) must be a positive multiple of 1 + num_negatives = {1 + k}")
    n_groups = n_rows // (1 + k)
    device = hidden.device
    if variant == "dft":
        if ref_logps is None:
            raise ValueError("ref_logps [G, K] is required for variant='dft' (reference log-probs of the negatives)")
        ref = check_float_tensor("ref_logps", ref_logps, (n_groups, k), device, validate)
    else:
        if ref_logps is not None:
            raise ValueError("ref_logps must be None for variant='dft2' (DFT2 is reference-free)")
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
    log_k = math.log(k)
    log_gamma = math.log(gamma)
    log_one_minus_gamma = math.log1p(-gamma) if gamma < 1.0 else -math.inf
    pending_u: list[torch.Tensor] = []

    def head(seq_sums: torch.Tensor, counts: torch.Tensor, g0: int, g1: int):
        sums = seq_sums.reshape(g1 - g0, 1 + k).float()
        scores = sums if variant == "dft" else sums / counts.reshape(g1 - g0, 1 + k).clamp_min(1)
        pos, neg = scores[:, 0], scores[:, 1:]
        d = neg.detach() / tau
        if ref is not None:
            d = d - ref[g0:g1]
        lse = torch.logsumexp(d, dim=1)
        if state is None:
            u = lse - log_k
        elif recompute and recomputed_u is not None:
            u = recomputed_u[g0:g1].to(d.device)
        else:
            u_prev = state.u[ids[g0:g1]].to(d.device)
            u = torch.logaddexp(log_one_minus_gamma + u_prev, log_gamma + lse - log_k)
            pending_u.append(u)
        weights = torch.exp(d - u.unsqueeze(1))
        per_group = -pos + (weights * neg).mean(dim=1)
        stats = {"scores": scores.detach(), "d": d, "weights": weights, "u": u, "group_losses": per_group.detach()}
        return per_group, stats

    loss, seq_logps, counts, stats = grouped_sequence_loss(
        hidden, weight, labels, rows_per_group=1 + k, head=head, cu_seqlens=cu_seqlens, bias=bias,
        ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
        chunk_bytes=chunk_bytes, schedule=schedule, validate=validate)
    if pending_u:  # every group succeeded: commit the state once
        state.write(ids, torch.cat(pending_u))
    if not return_stats:
        return loss
    stats = dict(stats, seq_logps=seq_logps, token_counts=counts)
    return loss, stats
