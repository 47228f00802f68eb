"""The loss math on scores: pure, differentiable functions of small tensors (no LM head, no state).

Every function here works on plain tensors (any float dtype, any device) and is what the fused
entry points (:func:`dftkern.fused_preference_loss`, :func:`dftkern.fused_dft_loss`,
:func:`dftkern.fused_policy_loss`) evaluate per group of rows; :mod:`dftkern.losses.registry`
describes each of them (family, rows, inputs, defaults, paper). The design follows Liger-Kernel's
``chunked_loss`` — loss math kept apart from the fused machinery — with our own code.

Sequence-level losses share one signature::

    fn(scores [G, n], *, ref=None, rewards=None, counts=None, token_term_sums=None, **hp) -> [G]

* ``scores``: per-row sequence log-probs, ``n`` rows per group in the order the loss documents
  (the sum of the row's response-token log-probs, or their mean where the loss says so).
  Differentiable: the returned per-group losses are differentiable in ``scores``.
* ``ref`` ``[G, n]``: the reference model's sequence log-probs of the same rows (no gradient);
  for DFT ``[G, K]``, the negatives' only.
* ``rewards`` ``[G, n]``; ``counts`` ``[G, n]``: number of response tokens per row;
  ``token_term_sums`` ``[G, n]``: per-row sums of the loss's token term (unlikelihood).
* Inputs a loss does not use are ignored (the uniform signature lets callers pass what they have).
* Hyper-parameters are keyword-only and have no defaults here: the defaults and their documented
  ranges live in the registry (``get_loss(name)(scores, ...)`` fills and checks them).

The token-level (policy) losses work on per-token log-probs instead: :func:`policy_token_terms`,
:func:`aggregation_weights`, :func:`policy_loss`.

Rounding: the math runs in the dtype of ``scores`` (float64 inputs give float64 results).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "sft_loss", "dpo_loss", "ipo_loss", "hinge_loss", "simpo_loss", "unlikelihood_loss",
    "unlikelihood_token_term", "rwr_loss", "reinforce_loss", "rloo_loss", "dft_loss", "dft_step",
    "DFTStep", "pairwise_margins", "reinforce_advantages", "rloo_advantages", "group_advantages",
    "policy_token_terms", "aggregation_weights", "policy_loss", "AGGREGATIONS",
]

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# maximum likelihood
# ---------------------------------------------------------------------------------------------


def sft_loss(scores: Tensor, *, ref=None, rewards=None, counts=None, token_term_sums=None) -> Tensor:
    """Maximum likelihood: ``loss_g = -s_g`` (groups of one row). ``scores [G, 1]`` -> ``[G]``."""
    return -scores[:, 0]


# ---------------------------------------------------------------------------------------------
# pairwise preference losses: rows (chosen, rejected)
# ---------------------------------------------------------------------------------------------


def pairwise_margins(scores: Tensor, ref: Tensor | None = None) -> Tensor:
    """``(s_c - r_c) - (s_r - r_r)`` per pair (``r = 0`` when ``ref`` is None). ``[G, 2]`` -> ``[G]``."""
    if ref is None:
        return scores[:, 0] - scores[:, 1]
    return (scores[:, 0] - ref[:, 0]) - (scores[:, 1] - ref[:, 1])


def dpo_loss(scores: Tensor, *, ref: Tensor, rewards=None, counts=None, token_term_sums=None,
             beta: float) -> Tensor:
    """DPO: ``-log sigmoid(beta * margin)``, margin as :func:`pairwise_margins` (Rafailov et al. 2023)."""
    return -F.logsigmoid(beta * pairwise_margins(scores, ref))


def ipo_loss(scores: Tensor, *, ref: Tensor, rewards=None, counts=None, token_term_sums=None,
             beta: float) -> Tensor:
    """IPO: ``(margin - 1 / (2 beta))^2`` (Azar et al. 2023)."""
    return (pairwise_margins(scores, ref) - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(scores: Tensor, *, ref: Tensor | None = None, rewards=None, counts=None, token_term_sums=None,
               beta: float) -> Tensor:
    """SLiC hinge: ``max(0, 1 - beta * margin)``; ``ref=None`` means a zero reference (Zhao et al. 2023)."""
    return torch.relu(1.0 - beta * pairwise_margins(scores, ref))


def simpo_loss(scores: Tensor, *, ref=None, rewards=None, counts=None, token_term_sums=None,
               beta: float, simpo_gamma: float) -> Tensor:
    """SimPO: ``-log sigmoid(beta * (s̄_c - s̄_r) - simpo_gamma)`` on mean token log-probs, reference-free
    (``ref`` is ignored) (Meng et al. 2024)."""
    return -F.logsigmoid(beta * pairwise_margins(scores) - simpo_gamma)


def unlikelihood_token_term(token_logp: Tensor) -> Tensor:
    """``log(1 - p_t) = log(-expm1(logp_t))`` per token, finite for ``logp_t < 0`` (clamped to <= -1e-6)."""
    return torch.log(-torch.expm1(token_logp.clamp(max=-1e-6)))


def unlikelihood_loss(scores: Tensor, *, ref=None, rewards=None, counts=None, token_term_sums: Tensor,
                      unlikelihood_alpha: float) -> Tensor:
    """Unlikelihood: ``-s_c - alpha * sum_t log(1 - p_t)`` over the rejected row's tokens (Welleck et al. 2019).

    ``token_term_sums [G, 2]``: per-row sums of :func:`unlikelihood_token_term` (column 1 is used).
    """
    if token_term_sums is None:
        raise ValueError("unlikelihood_loss needs token_term_sums [G, 2] (per-row sums of log(1 - p_t))")
    return -scores[:, 0] - unlikelihood_alpha * token_term_sums[:, 1]


# ---------------------------------------------------------------------------------------------
# group (reward-weighted / policy-gradient) losses: n sampled rows with rewards
# ---------------------------------------------------------------------------------------------


def rwr_loss(scores: Tensor, *, ref=None, rewards: Tensor, counts=None, token_term_sums=None,
             beta: float) -> Tensor:
    """Reward-weighted regression: ``-sum_j softmax_j(R_j / beta) * s_j`` (Peters & Schaal 2007)."""
    return -(torch.softmax(rewards / beta, dim=1) * scores).sum(1)


def reinforce_advantages(rewards: Tensor, baseline) -> Tensor:
    """``R - b`` with ``b`` = the group mean (``"mean"``), 0 (``"none"``) or a number. ``[G, n]``."""
    if isinstance(baseline, str):
        if baseline == "mean":
            return rewards - rewards.mean(1, keepdim=True)
        if baseline == "none":
            return rewards
        raise ValueError(f"baseline must be 'mean', 'none' or a finite number, got {baseline!r}")
    return rewards - float(baseline)


def reinforce_loss(scores: Tensor, *, ref=None, rewards: Tensor, counts=None, token_term_sums=None,
                   baseline) -> Tensor:
    """REINFORCE: ``-(1/n) sum_j (R_j - b) * s_j`` (Williams 1992), ``b`` see :func:`reinforce_advantages`."""
    return -(reinforce_advantages(rewards, baseline) * scores).mean(1)


def rloo_advantages(rewards: Tensor) -> Tensor:
    """Leave-one-out: ``R_j - mean_{k != j} R_k`` (needs n >= 2). ``[G, n]``."""
    n = rewards.shape[1]
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (n - 1)


def rloo_loss(scores: Tensor, *, ref=None, rewards: Tensor, counts=None, token_term_sums=None) -> Tensor:
    """RLOO: ``-(1/n) sum_j (R_j - mean_{k != j} R_k) * s_j`` (Ahmadian et al. 2024)."""
    return -(rloo_advantages(rewards) * scores).mean(1)


def group_advantages(rewards: Tensor, *, scale: str = "std", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages for the policy losses, ``[G, n]`` -> ``[G, n]``.

    ``scale="std"`` (GRPO, DAPO): ``(R - mean_g R) / (std_g R + eps)`` with the unbiased
    standard deviation of the group (a group of one has std 0); ``scale="none"`` (Dr. GRPO):
    ``R - mean_g R``.
    """
    centered = rewards - rewards.mean(1, keepdim=True)
    if scale == "none":
        return centered
    if scale != "std":
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    std = rewards.std(1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(rewards[:, :1])
    return centered / (std + eps)


# ---------------------------------------------------------------------------------------------
# DFT / DFT2: rows (positive, K negatives)
# ---------------------------------------------------------------------------------------------


class DFTStep(NamedTuple):
    """One DFT evaluation of ``G`` groups (see :func:`dft_step`)."""

    per_group: Tensor
    """``[G]`` ``-s(y_i) + (1/K) sum_j omega_ij s(y'_ij)``, differentiable in the scores."""
    u: Tensor
    """``[G]`` the normalizer used in the weights (detached): the new moving average, or the batch estimate."""
    weights: Tensor
    """``[G, K]`` ``omega_ij = exp(d_ij - u_i)`` (detached)."""
    d: Tensor
    """``[G, K]`` ``d_ij = s(y'_ij) / tau - r_ij`` (detached)."""
    update: Tensor
    """``[G]`` bool: whether ``u_i`` may be written to a state: ``d_i``, ``s(y_i)`` and ``u_i`` finite
    and (when ``counts`` are given) some negative has a response token."""


def dft_step(scores: Tensor, *, ref: Tensor | None = None, counts: Tensor | None = None, tau: float, gamma: float,
             u_prev: Tensor | None = None, u: Tensor | None = None) -> DFTStep:
    """DFT / DFT2 (Guo et al. 2025, "Discriminative Finetuning of Generative LLMs without Reward Models and
    Human Preference Data") with the moving-average normalizer as a pure function.

    Args:
        scores: ``[G, 1+K]`` (positive first): sequence log-prob sums (DFT) or means (DFT2).
        ref: ``[G, K]`` reference log-probs of the negatives (DFT) or None (DFT2).
        counts: ``[G, 1+K]`` response tokens per row, or None (then every group counts as non-empty).
        tau: > 0. gamma: in (0, 1] (used only with ``u_prev``).
        u_prev: ``[G]`` the state's previous ``u`` of each group, or None for the stateless batch
            estimate ``u_i = logsumexp_j d_ij - log K``. With it,
            ``u_i = logaddexp(log(1 - gamma) + u_prev_i, log(gamma) + logsumexp_j d_ij - log K)``.
        u: ``[G]`` use this normalizer instead (an activation-checkpoint replay of a step whose ``u``
            was already written).

    Returns:
        :class:`DFTStep` ``(per_group, u, weights, d, update)``. The caller owns the state: it
        writes ``u`` where ``update`` is True (``DFTState`` does exactly that).
    """
    pos, neg = scores[:, 0], scores[:, 1:]
    k = neg.shape[1]
    d = neg.detach() / tau
    if ref is not None:
        d = d - ref
    if u is None:
        lse = torch.logsumexp(d, dim=1)
        if u_prev is None:
            u = lse - math.log(k)
        else:
            log_one_minus_gamma = math.log1p(-gamma) if gamma < 1.0 else -math.inf
            u = torch.logaddexp(log_one_minus_gamma + u_prev.to(d), math.log(gamma) + lse - math.log(k))
    u = u.to(d)
    weights = torch.exp(d - u.unsqueeze(1))
    per_group = -pos + (weights * neg).mean(dim=1)
    update = torch.isfinite(d).all(dim=1) & torch.isfinite(pos.detach()) & torch.isfinite(u)
    if counts is not None:
        update = update & (counts[:, 1:].sum(dim=1) > 0)
    return DFTStep(per_group, u, weights, d, update)


def dft_loss(scores: Tensor, *, ref: Tensor | None = None, rewards=None, counts=None, token_term_sums=None,
             tau: float, gamma: float, u_prev: Tensor | None = None) -> Tensor:
    """DFT / DFT2 per-group loss ``[G]`` (the ``per_group`` of :func:`dft_step`); DFT2 passes mean scores
    and no ``ref``."""
    return dft_step(scores, ref=ref, counts=counts, tau=tau, gamma=gamma, u_prev=u_prev).per_group


# ---------------------------------------------------------------------------------------------
# token-level policy losses (PPO-clip / GRPO family)
# ---------------------------------------------------------------------------------------------

AGGREGATIONS = ("token_mean", "sequence_mean", "constant")


def policy_token_terms(logp: Tensor, *, advantages: Tensor, old_logps: Tensor | None = None,
                       ref_logps: Tensor | None = None, entropy: Tensor | None = None, clip_eps: float,
                       clip_eps_high: float | None = None, kl_beta: float = 0.0,
                       entropy_coef: float = 0.0) -> Tensor:
    """Per-token PPO-clip term with k3 KL and entropy bonus (elementwise; all inputs broadcast to ``logp``).

    ``r = exp(logp - old)`` (``old = logp.detach()`` when None: ``r = 1`` with the gradient of
    ``logp``); ``surr = -min(r A, clip(r, 1 - clip_eps, 1 + eps_high) A)`` with ``eps_high =
    clip_eps_high`` or ``clip_eps``; ``kl = exp(ref - logp) - (ref - logp) - 1`` (Schulman's k3
    estimator) added as ``kl_beta * kl`` when ``kl_beta != 0``; ``- entropy_coef * H`` when
    ``entropy_coef != 0``. ``advantages``, ``old_logps``, ``ref_logps`` are constants (detached).
    """
    old = logp.detach() if old_logps is None else old_logps.detach()
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    adv = advantages.detach()
    ratio = torch.exp(logp - old)
    terms = -torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high) * adv)
    if kl_beta != 0.0:
        if ref_logps is None:
            raise ValueError("kl_beta != 0 needs ref_logps (the reference model's per-token log-probs)")
        delta = ref_logps.detach() - logp
        terms = terms + kl_beta * (torch.exp(delta) - delta - 1.0)
    if entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy_coef != 0 needs the per-token entropy")
        terms = terms - entropy_coef * entropy
    return terms


def aggregation_weights(valid: Tensor, rows: Tensor, num_rows: int, aggregation: str,
                        max_tokens: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Weight of each token in the aggregated loss ``sum_t weight_t * term_t``.

    Args:
        valid: bool ``[N]`` tokens that are scored; rows: int64 ``[N]`` the row of each token;
            num_rows: ``R``.
        aggregation: ``"token_mean"`` (``1 / #valid``: PPO, DAPO), ``"sequence_mean"``
            (``1 / (#valid in the row * #rows with any valid token)``: GRPO) or ``"constant"``
            (``1 / (R * max_tokens)``: Dr. GRPO).
    Returns:
        ``[N]`` in ``dtype`` (0 at invalid tokens); all zero when no token is valid.
    """
    v = valid.to(dtype)
    if aggregation == "token_mean":
        return v / v.sum().clamp_min(1.0)
    if aggregation == "sequence_mean":
        per_row = torch.zeros(num_rows, dtype=dtype, device=v.device).index_add_(0, rows, v)
        nonempty = (per_row > 0).sum().clamp_min(1).to(dtype)
        return v / (per_row.clamp_min(1.0)[rows] * nonempty)
    if aggregation == "constant":
        if max_tokens is None:
            raise ValueError("aggregation='constant' needs max_tokens")
        return v / float(num_rows * max_tokens)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def policy_loss(logp: Tensor, *, advantages: Tensor, mask: Tensor | None = None, old_logps: Tensor | None = None,
                ref_logps: Tensor | None = None, entropy: Tensor | None = None, clip_eps: float,
                clip_eps_high: float | None, kl_beta: float, entropy_coef: float, aggregation: str,
                max_tokens: int | None = None) -> Tensor:
    """The aggregated policy loss on per-token log-probs ``logp [R, T]`` (scalar).

    ``advantages`` ``[R]`` (broadcast over the row) or ``[R, T]``; ``mask`` bool ``[R, T]`` (None =
    all tokens valid); ``old_logps``/``ref_logps``/``entropy`` ``[R, T]`` or None. Terms as
    :func:`policy_token_terms`, aggregated as :func:`aggregation_weights`.
    """
    n_rows, seq_len = logp.shape
    valid = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask.to(torch.bool)

    def at_valid(x: Tensor | None) -> Tensor | None:  # ignored positions may hold anything (even NaN)
        return None if x is None else torch.where(valid, x, torch.zeros_like(x))

    adv = advantages[:, None].expand_as(logp) if advantages.dim() == 1 else advantages
    rows = torch.arange(n_rows, device=logp.device).repeat_interleave(seq_len)
    weights = aggregation_weights(valid.reshape(-1), rows, n_rows, aggregation, max_tokens, dtype=logp.dtype)
    terms = policy_token_terms(at_valid(logp), advantages=at_valid(adv), old_logps=at_valid(old_logps),
                               ref_logps=at_valid(ref_logps), entropy=at_valid(entropy), clip_eps=clip_eps,
                               clip_eps_high=clip_eps_high, kl_beta=kl_beta, entropy_coef=entropy_coef)
    return (terms * weights.reshape(n_rows, seq_len)).sum()
