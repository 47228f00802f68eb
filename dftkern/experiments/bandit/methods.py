"""The compared methods and their training losses, each computed by one dftkern fused op."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import BanditConfig
    from .policies import _PolicyBank

__all__ = ["METHODS", "ALL_METHODS", "DFT_METHODS", "METHOD_LABELS", "NEGATIVE_GRADIENT", "method_loss"]


#: methods run by default, in plotting order (maximum likelihood first)
METHODS: tuple[str, ...] = ("bon_sft", "rwr", "dpo", "ipo", "rloo", "dft", "dft2")
#: every method; ``reinforce`` and ``dft_unselected`` (an ablation) are not run by default
ALL_METHODS: tuple[str, ...] = METHODS + ("reinforce", "dft_unselected")
#: methods that keep a :class:`dftkern.DFTState`
DFT_METHODS = frozenset({"dft", "dft2", "dft_unselected"})
METHOD_LABELS = {
    "bon_sft": "best-of-N SFT",
    "rwr": "RWR",
    "dpo": "DPO",
    "ipo": "IPO",
    "rloo": "REINFORCE (RLOO)",
    "dft": "DFT",
    "dft2": "DFT2",
    "reinforce": "REINFORCE (mean baseline)",
    "dft_unselected": "DFT, unselected negatives",
}
#: methods whose loss has a term that lowers the probability of some sampled actions
NEGATIVE_GRADIENT = {"dpo", "ipo", "rloo", "reinforce", "dft", "dft2", "dft_unselected"}


def _best_worst(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group index of the highest and lowest reward (first one on ties): two ``[G]`` int64."""
    return rewards.argmax(dim=1), rewards.argmin(dim=1)


def method_loss(
    method: str,
    policy: _PolicyBank,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    ref_log_probs: torch.Tensor,
    config: BanditConfig,
    dft_state=None,
) -> torch.Tensor:
    """The training loss of ``method`` on one batch, computed by one call of a dftkern fused op.

    Args:
        method: one of :data:`ALL_METHODS`.
        policy: a :class:`LogitPolicy` or :class:`MLPPolicy` bank of ``S`` seeds.
        actions: ``[S, G, n]`` int64 sampled actions, ``G`` groups of ``n`` per seed
            (``[G, n]`` is accepted when ``S = 1``).
        rewards: floating rewards of ``actions``, same shape.
        ref_log_probs: ``[V]`` ``log pi_ref`` (floating; cast to the policy's dtype where used).
        config: hyper-parameters (betas, tau, gamma).
        dft_state: :class:`dftkern.DFTState` with ``S * G`` entries for the :data:`DFT_METHODS`
            (group ``g`` of seed ``s`` uses entry ``s * G + g`` in every batch); unused otherwise.

    Returns:
        Scalar loss in the policy's dtype (float32 or float64): the *sum over seeds* of each
        seed's loss (the loss of one seed is the mean over its groups), so every seed gets the
        gradient of its own run.
    """
    from dftkern import fused_dft_loss, fused_preference_loss

    num_seeds = policy.num_seeds
    if actions.dim() == 2 and num_seeds == 1:
        actions, rewards = actions.unsqueeze(0), rewards.unsqueeze(0)
    if actions.dim() != 3 or actions.shape != rewards.shape or actions.shape[0] != num_seeds:
        raise ValueError(
            f"actions and rewards must both be [S={num_seeds}, G, n] (or [G, n] for one seed), got "
            f"{tuple(actions.shape)} and {tuple(rewards.shape)}"
        )
    if actions.dtype != torch.int64:
        raise TypeError(f"actions must be int64, got {actions.dtype}")
    _, groups_per_seed, group_size = actions.shape
    dtype = policy.weight.dtype
    actions = actions.reshape(-1, group_size)  # [S*G, n], seed-major
    rewards = rewards.reshape(-1, group_size).to(dtype)
    ref_log_probs = ref_log_probs.to(dtype)
    best, worst = _best_worst(rewards)

    def fused_rows(rows: torch.Tensor):
        hidden, weight, bias = policy.fused_inputs(rows.numel() // num_seeds)
        return hidden, weight, bias, rows.reshape(-1, 1)

    if method == "bon_sft":
        rows = actions.gather(1, best[:, None]).reshape(-1)
        hidden, weight, bias, labels = fused_rows(rows)
        loss = fused_preference_loss(hidden, weight, labels, loss="sft", bias=bias)
    elif method in ("dpo", "ipo"):
        chosen = actions.gather(1, best[:, None])[:, 0]
        rejected = actions.gather(1, worst[:, None])[:, 0]
        rows = torch.stack([chosen, rejected], dim=1).reshape(-1)  # chosen_0, rejected_0, chosen_1, ...
        hidden, weight, bias, labels = fused_rows(rows)
        beta = config.dpo_beta if method == "dpo" else config.ipo_beta
        loss = fused_preference_loss(
            hidden, weight, labels, loss=method, beta=beta, ref_logps=ref_log_probs[rows], bias=bias
        )
    elif method in ("rwr", "rloo", "reinforce"):
        rows = actions.reshape(-1)  # group-major: group g is rows g*n .. g*n+n-1
        hidden, weight, bias, labels = fused_rows(rows)
        kwargs = {"beta": config.rwr_beta} if method == "rwr" else {}
        loss = fused_preference_loss(hidden, weight, labels, loss=method, rewards=rewards, bias=bias, **kwargs)
    elif method in DFT_METHODS:
        if method == "dft_unselected":
            # ablation: the positive (best of the group), then all n samples as negatives, in
            # sampling order: the negatives are a plain sample of the sampler, not selected by reward
            grouped = torch.cat([actions.gather(1, best[:, None]), actions], dim=1)
        else:
            # positive (best of the group; first one on ties) first, then the other n - 1 samples
            grouped = actions.gather(1, torch.argsort(rewards, dim=1, descending=True, stable=True))
        hidden, weight, bias, labels = fused_rows(grouped.reshape(-1))
        ids = torch.arange(grouped.shape[0], dtype=torch.int64)
        common = dict(num_negatives=grouped.shape[1] - 1, ids=ids, state=dft_state, bias=bias)
        if method == "dft2":
            loss = fused_dft_loss(
                hidden, weight, labels, tau=config.dft2_tau, gamma=config.dft2_gamma, variant="dft2", **common
            )
        else:
            loss = fused_dft_loss(
                hidden, weight, labels, ref_logps=ref_log_probs[grouped[:, 1:]], tau=config.dft_tau,
                gamma=config.dft_gamma, variant="dft", **common,
            )
    else:
        raise ValueError(f"method must be one of {ALL_METHODS}, got {method!r}")
    return loss * num_seeds
