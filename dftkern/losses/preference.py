"""The preference-optimization family on fused sequence log-probs.

Notation: ``s`` is a row's sequence log-prob (sum of response-token log-probs, or their mean
with ``average=True``), ``r`` the reference model's (``ref_logps``, per row, no gradient; 0 when
not given for losses where it is optional). Every loss is averaged over groups.

Pairwise losses (groups of 2 rows: chosen, rejected), ``margin = (s_c - r_c) - (s_r - r_r)``:

* ``"dpo"``   ``-log sigmoid(beta * margin)``  — Rafailov et al. 2023, "Direct Preference Optimization".
* ``"ipo"``   ``(margin - 1 / (2 beta))^2``     — Azar et al. 2023, "A General Theoretical Paradigm to
  Understand Learning from Human Preferences".
* ``"hinge"`` ``max(0, 1 - beta * margin)``     — Zhao et al. 2023, "SLiC-HF".
* ``"simpo"`` ``-log sigmoid(beta * (s̄_c - s̄_r) - simpo_gamma)`` with mean token log-probs s̄,
  reference-free — Meng et al. 2024, "SimPO".
* ``"unlikelihood"`` ``-s_c - alpha * sum_t log(1 - p_t)`` over the rejected row's tokens —
  Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training".

Single-row / group losses:

* ``"sft"``  ``-s`` per row (groups of 1) — maximum likelihood.
* ``"rwr"``  ``-sum_j softmax_j(R_j / beta) * s_j`` per group — reward-weighted regression
  (Peters & Schaal 2007; as compared in Tajwar et al. 2024).
* ``"reinforce"`` ``-(1/n) sum_j (R_j - b) * s_j`` with baseline ``b`` = the group mean reward
  (``baseline="mean"``), 0 (``"none"``) or a given number — Williams 1992.
* ``"rloo"`` ``-(1/n) sum_j (R_j - mean_{k != j} R_k) * s_j`` — Ahmadian et al. 2024, "Back to
  Basics: REINFORCE style optimization" (needs n >= 2).

Rewards ``[G, n]`` belong to the group losses; a group loss's ``n`` is ``rewards.shape[1]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..functional import grouped_sequence_loss
from ._common import check_float, check_float_tensor, count_rows

__all__ = ["fused_preference_loss", "PREFERENCE_LOSSES"]

_PAIRWISE = ("dpo", "ipo", "hinge", "simpo", "unlikelihood")
_GROUP = ("rwr", "reinforce", "rloo")
PREFERENCE_LOSSES = ("sft",) + _PAIRWISE + _GROUP
_USES_REF = ("dpo", "ipo", "hinge")


def _unlikelihood_token_term(token_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - p_t) = log(-expm1(logp_t)), finite for logp_t < 0 (clamped just below 0)."""
    return torch.log(-torch.expm1(token_logp.clamp(max=-1e-6)))


def fused_preference_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, loss: str,
                          beta: float = 0.1, ref_logps: torch.Tensor | None = None,
                          rewards: torch.Tensor | None = None, average: bool = False, simpo_gamma: float = 0.5,
                          unlikelihood_alpha: float = 1.0, baseline="mean", cu_seqlens=None,
                          ignore_index: int = -100, temperature: float = 1.0, softcap: float | None = None,
                          bias: torch.Tensor | None = None, return_stats: bool = False, backend: str = "auto",
                          chunk_bytes: int | None = None, schedule: str = "auto", validate: bool | None = None):
    """A preference / policy-gradient loss on fused sequence log-probs (formulas in the module doc).

    Args:
        hidden: ``[R, T, H]`` (or packed ``[N, H]`` with ``cu_seqlens [R+1]``); weight ``[V, H]``;
            labels int64 ``[R, T]`` (``[N]``), aligned, prompt/padding = ignore_index.
            Rows are grouped consecutively: pairs (chosen, rejected) for pairwise losses, ``n``
            samples for group losses, single rows for "sft".
        loss: one of :data:`PREFERENCE_LOSSES`.
        beta: > 0 (DPO/IPO/hinge strength, SimPO scale, RWR temperature; unused by sft/reinforce/rloo).
        ref_logps: float ``[R]`` per-row reference log-probs (dpo/ipo/hinge; 0 when omitted is
            *not* allowed for dpo/ipo — pass them; hinge treats None as 0).
        rewards: float ``[G, n]`` for rwr/reinforce/rloo.
        average: use the mean token log-prob per row instead of the sum (SimPO always does).
        return_stats: also return ``seq_logps [R]``, ``token_counts [R]``, ``scores [R]``,
            ``group_losses [G]`` and, for pairwise losses, ``margins [G]``.
    Returns:
        scalar float32 loss (and stats).
    """
    if loss not in PREFERENCE_LOSSES:
        raise ValueError(f"loss must be one of {PREFERENCE_LOSSES}, got {loss!r}")
    beta = check_float("beta", beta, low=0.0)
    n_rows = count_rows(hidden, cu_seqlens)
    device = hidden.device
    if loss == "sft":
        group = 1
    elif loss in _PAIRWISE:
        group = 2
    else:
        if rewards is None:
            raise ValueError(f"rewards [G, n] are required for loss={loss!r}")
        if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2 or rewards.shape[1] < 1:
            raise ValueError(f"rewards must be a [G, n] tensor, got "
                             f"{tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__}")
        group = rewards.shape[1]
        if loss == "rloo" and group < 2:
            raise ValueError("loss='rloo' needs groups of n >= 2 samples (rewards [G, n>=2])")
    if n_rows <= 0 or n_rows % group != 0:
        origin = f"rewards.shape[1] = {group} sets the group size" if loss in _GROUP else f"groups of {group} rows"
        raise ValueError(f"the number of rows ({n_rows}) must be a positive multiple of the group size for "
                         f"loss={loss!r} ({origin})")
    n_groups = n_rows // group
    if loss in _GROUP:
        rewards = check_float_tensor("rewards", rewards, (n_groups, group), device, validate)
    elif rewards is not None:
        raise ValueError(f"rewards are only used by {_GROUP}, not loss={loss!r}")
    ref = None
    if loss in _USES_REF:
        if ref_logps is None and loss != "hinge":
            raise ValueError(f"ref_logps [R={n_rows}] (reference per-row log-probs) are required for loss={loss!r}")
        if ref_logps is not None:
            ref = check_float_tensor("ref_logps", ref_logps, (n_rows,), device, validate).reshape(n_groups, group)
    elif ref_logps is not None:
        raise ValueError(f"ref_logps are not used by loss={loss!r}")
    if loss == "reinforce" and not (baseline in ("mean", "none") or isinstance(baseline, (int, float))):
        raise ValueError(f"baseline must be 'mean', 'none' or a number, got {baseline!r}")
    if loss == "simpo":
        check_float("simpo_gamma", simpo_gamma)
    if loss == "unlikelihood":
        check_float("unlikelihood_alpha", unlikelihood_alpha, low=0.0, low_open=False)
    use_mean = average or loss == "simpo"

    def head(seq_sums: torch.Tensor, counts: torch.Tensor, g0: int, g1: int, token_term_sums=None):
        n_g = g1 - g0
        sums = seq_sums.float()
        scores = (sums / counts.clamp_min(1) if use_mean else sums).reshape(n_g, group)
        stats = {"scores": scores.detach().reshape(-1)}
        if loss == "sft":
            per_group = -scores[:, 0]
        elif loss in ("dpo", "ipo", "hinge", "simpo"):
            if loss == "simpo":
                margin = scores[:, 0] - scores[:, 1]
            else:
                r = ref[g0:g1] if ref is not None else torch.zeros_like(scores)
                margin = (scores[:, 0] - r[:, 0]) - (scores[:, 1] - r[:, 1])
            if loss == "dpo":
                per_group = -F.logsigmoid(beta * margin)
            elif loss == "ipo":
                per_group = (margin - 1.0 / (2.0 * beta)) ** 2
            elif loss == "hinge":
                per_group = torch.relu(1.0 - beta * margin)
            else:
                per_group = -F.logsigmoid(beta * margin - simpo_gamma)
            stats["margins"] = margin.detach()
        elif loss == "unlikelihood":
            rejected_term = token_term_sums.float().reshape(n_g, group)[:, 1]
            per_group = -scores[:, 0] - unlikelihood_alpha * rejected_term
        else:
            rew = rewards[g0:g1]
            if loss == "rwr":
                coef = torch.softmax(rew / beta, dim=1)
                per_group = -(coef * scores).sum(1)
            else:
                if loss == "rloo":
                    adv = rew - (rew.sum(1, keepdim=True) - rew) / (group - 1)
                elif baseline == "mean":
                    adv = rew - rew.mean(1, keepdim=True)
                elif baseline == "none":
                    adv = rew
                else:
                    adv = rew - float(baseline)
                per_group = -(adv * scores).mean(1)
                stats["advantages"] = adv.reshape(-1)
        stats["group_losses"] = per_group.detach()
        return per_group, stats

    if loss == "unlikelihood":
        head.token_term = _unlikelihood_token_term  # type: ignore[attr-defined]

    total, seq_logps, counts, stats = grouped_sequence_loss(
        hidden, weight, labels, rows_per_group=group, head=head, cu_seqlens=cu_seqlens, bias=bias,
        ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
        chunk_bytes=chunk_bytes, schedule=schedule, validate=validate)
    if not return_stats:
        return total
    return total, dict(stats, seq_logps=seq_logps, token_counts=counts)
