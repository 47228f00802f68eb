"""The preference-optimization family on fused sequence log-probs.

Notation: ``s`` is a row's sequence log-prob (sum of response-token log-probs, or their mean
with ``average=True``), ``r`` the reference model's (``ref_logps``, per row, no gradient; 0 when
not given for losses where it is optional). Every loss is averaged over groups. The math of each
loss is a pure function in :mod:`dftkern.losses.formulas`, listed in :data:`dftkern.losses.registry.LOSSES`.

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

Hyper-parameter ranges (checked; the message states them): ``beta`` in [1e-6, 1e6] (so that
``1 / (2 beta)`` and ``beta * margin`` stay finite in float32), ``simpo_gamma`` in [-1e6, 1e6],
``unlikelihood_alpha`` in [0, 1e6], ``baseline`` "mean", "none" or a number in [-1e9, 1e9].
"""

from __future__ import annotations

import torch

from ..functional import follows_autocast
from ..grouped import grouped_sequence_loss
from ._common import check_bool, check_float_tensor, count_rows, loss_dtype
from .registry import check_hyperparameter, get_loss, loss_names

__all__ = ["fused_preference_loss", "PREFERENCE_LOSSES"]

_FAMILIES = ("sft", "pairwise", "group")
PREFERENCE_LOSSES = tuple(name for family in _FAMILIES for name in loss_names(family))
"""The losses :func:`fused_preference_loss` takes: the registry's sft, pairwise and group families."""


@follows_autocast
def fused_preference_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, loss: str,
                          beta: float = 0.1, ref_logps: torch.Tensor | None = None,
                          rewards: torch.Tensor | None = None, average: bool = False, simpo_gamma: float = 0.5,
                          unlikelihood_alpha: float = 1.0, baseline="mean", cu_seqlens=None,
                          ignore_index: int = -100, temperature: float = 1.0, softcap: float | None = None,
                          bias: torch.Tensor | None = None, return_stats: bool = False, backend: str = "auto",
                          chunk_bytes: int | None = None, schedule: str = "auto", validate: bool | None = None,
                          valid_positions: torch.Tensor | None = None, accum_dtype="fp32"):
    """A preference / policy-gradient loss on fused sequence log-probs (formulas in the module doc).

    Args:
        hidden: ``[R, T, H]`` (or packed ``[N, H]`` with ``cu_seqlens [R+1]``); weight ``[V, H]``;
            labels int64 ``[R, T]`` (``[N]``), aligned, prompt/padding = ignore_index.
            Rows are grouped consecutively: pairs (chosen, rejected) for pairwise losses, ``n``
            samples for group losses, single rows for "sft".
        loss: one of :data:`PREFERENCE_LOSSES` (any registry entry of the sft/pairwise/group families).
        beta: in [1e-6, 1e6] (DPO/IPO/hinge strength, SimPO scale, RWR temperature; unused by
            sft/reinforce/rloo/unlikelihood, but checked).
        ref_logps: float ``[R]`` per-row reference log-probs (dpo/ipo/hinge; 0 when omitted is
            *not* allowed for dpo/ipo — pass them; hinge treats None as 0).
        rewards: float ``[G, n]`` for rwr/reinforce/rloo.
        average: bool; use the mean token log-prob per row instead of the sum (SimPO always does).
        simpo_gamma, unlikelihood_alpha, baseline: see the module doc (checked only for the loss
            that uses them).
        return_stats: bool; also return ``seq_logps [R]``, ``token_counts [R]``, ``scores [R]``,
            ``group_losses [G]`` and, for dpo/ipo/hinge/simpo, ``margins [G]``; for
            reinforce/rloo ``advantages [R]``.
        valid_positions: optional int64 1-D tensor (CPU preferred) of the flat positions of
            ``labels`` that are not ``ignore_index``, increasing; saves the engine's one host sync
            on CUDA (see :func:`dftkern.fused_token_loss`).
        accum_dtype: ``dW`` accumulation across chunks: "fp32" (default) or the weight's dtype
            ("weight"); see :func:`dftkern.fused_linear_cross_entropy`.
    Returns:
        scalar float32 loss (float64 for float64 inputs), and stats.
    """
    names = tuple(name for family in _FAMILIES for name in loss_names(family))  # read now: the registry decides
    if not isinstance(loss, str) or loss not in names:
        raise ValueError(f"loss must be one of {names}, got {loss!r}")
    spec = get_loss(loss)
    check_bool("average", average)
    check_bool("return_stats", return_stats)
    check_hyperparameter("beta", beta)
    hp = spec.hyperparameters(**{name: value for name, value in
                                 (("beta", beta), ("simpo_gamma", simpo_gamma),
                                  ("unlikelihood_alpha", unlikelihood_alpha), ("baseline", baseline))
                                 if name in spec.defaults})
    n_rows = count_rows(hidden, labels, cu_seqlens)
    device, dtype = hidden.device, loss_dtype(hidden)
    if spec.needs_rewards:
        if rewards is None:
            raise ValueError(f"rewards [G, n] are required for loss={loss!r}")
        if not isinstance(rewards, torch.Tensor):
            raise TypeError(f"rewards must be a [G, n] float tensor, got {type(rewards).__name__}")
        if rewards.dim() != 2 or rewards.shape[1] < 1:
            raise ValueError(f"rewards must be a [G, n] tensor, got shape {list(rewards.shape)}")
        group = rewards.shape[1]
        if group < spec.min_rows_per_group:
            raise ValueError(f"loss={loss!r} needs groups of n >= {spec.min_rows_per_group} samples "
                             f"(rewards [G, n>={spec.min_rows_per_group}]), got rewards {list(rewards.shape)}")
    else:
        group = spec.rows_per_group
    if n_rows <= 0 or n_rows % group != 0:
        origin = f"rewards.shape[1] = {group} sets the group size" if spec.needs_rewards else f"groups of {group} rows"
        raise ValueError(f"the number of rows ({n_rows}) must be a positive multiple of the group size for "
                         f"loss={loss!r} ({origin})")
    n_groups = n_rows // group
    if spec.needs_rewards:
        rewards = check_float_tensor("rewards", rewards, (n_groups, group), device, validate, dtype=dtype)
    elif rewards is not None:
        raise ValueError(f"rewards are only used by {loss_names('group')}, not loss={loss!r}")
    ref = None
    if spec.needs_ref:
        if ref_logps is None and not spec.ref_optional:
            raise ValueError(f"ref_logps [R={n_rows}] (reference per-row log-probs) are required for loss={loss!r}")
        if ref_logps is not None:
            ref = check_float_tensor("ref_logps", ref_logps, (n_rows,), device, validate,
                                     dtype=dtype).reshape(n_groups, group)
    elif ref_logps is not None:
        raise ValueError(f"ref_logps are not used by loss={loss!r}")
    use_mean = average or spec.mean_scores

    def group_loss(seq_sums: torch.Tensor, counts: torch.Tensor, g0: int, g1: int, token_term_sums=None):
        n_g = g1 - g0
        sums = seq_sums.to(dtype)
        scores = (sums / counts.clamp_min(1) if use_mean else sums).reshape(n_g, group)
        inputs = {"ref": None if ref is None else ref[g0:g1], "rewards": None if rewards is None else rewards[g0:g1]}
        if token_term_sums is not None:
            inputs["token_term_sums"] = token_term_sums.to(dtype).reshape(n_g, group)
        per_group = spec.fn(scores, counts=counts.reshape(n_g, group), **inputs, **hp)
        stats = {"scores": scores.detach().reshape(-1)}
        if spec.stats_fn is not None:
            stats.update(spec.stats_fn(scores.detach(), ref=inputs["ref"], rewards=inputs["rewards"], **hp))
        stats["group_losses"] = per_group.detach()
        return per_group, stats

    total, seq_logps, counts, stats = grouped_sequence_loss(
        hidden, weight, labels, rows_per_group=group, group_loss=group_loss, token_term=spec.token_term,
        cu_seqlens=cu_seqlens, bias=bias, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
        backend=backend, chunk_bytes=chunk_bytes, schedule=schedule, validate=validate,
        valid_positions=valid_positions, accum_dtype=accum_dtype)
    if not return_stats:
        return total
    return total, dict(stats, seq_logps=seq_logps, token_counts=counts)
