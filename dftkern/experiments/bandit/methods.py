"""The compared methods: which rows of a group each one trains on, and its loss from the registry.

A method is a loss of :mod:`dftkern.losses.registry` applied to rows built from a group of ``n``
sampled actions. Every action is a one-token "sequence", so its score (sequence log-prob) is
exactly ``log pi(a)``: the bandit evaluates the registry's pure math (:mod:`dftkern.losses.formulas`)
on the policy's exact log-probabilities. Rows per family:

======== ===========================================================================================
sft      ``bon_sft`` (best-of-N SFT): the best action of the group
pairwise (chosen = best, rejected = worst) of the group, ``ref = log pi_ref`` of both
group    all ``n`` actions with their rewards
dft      the best action (positive), then the other ``n - 1`` by decreasing reward (negatives),
         ``ref = log pi_ref`` of the negatives (DFT); ``dft_unselected``: the best, then *all*
         ``n`` actions in sampling order (negatives not selected by reward; an ablation)
policy   all ``n`` actions, token level (one token each): group advantages as the registry says
         (``(R - mean) / std`` for PPO/GRPO/DAPO, ``R - mean`` for Dr. GRPO), importance ratios
         against the sampler's log-probs, ``ref = log pi_ref`` for the KL term
======== ===========================================================================================

"Best"/"worst" are by the true reward, first one on ties.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dftkern.losses import formulas
from dftkern.losses.registry import LossSpec, get_loss, loss_names

if TYPE_CHECKING:
    from .config import BanditConfig
    from .policies import _PolicyBank

__all__ = ["METHODS", "ALL_METHODS", "DFT_METHODS", "POLICY_METHODS", "METHOD_LABELS", "NEGATIVE_GRADIENT",
           "registry_loss", "method_hyperparameters", "method_loss"]

#: bandit method -> registry loss; every registry loss is a method (``sft`` as best-of-N SFT)
_REGISTRY_NAME: dict[str, str] = {("bon_sft" if name == "sft" else name): name for name in loss_names()}
_REGISTRY_NAME["dft_unselected"] = "dft"

#: methods run by default, in plotting order (maximum likelihood first); the token-level ones
#: (``ppo``, ``grpo``, ...) run with ``--methods`` (committed in docs/bandit/ppo*)
METHODS: tuple[str, ...] = ("bon_sft", "rwr", "dpo", "ipo", "rloo", "dft", "dft2")
#: every method: the registry's losses, plus the ``dft_unselected`` ablation
ALL_METHODS: tuple[str, ...] = tuple(_REGISTRY_NAME)
#: methods that keep a :class:`dftkern.DFTState`
DFT_METHODS = frozenset(m for m, name in _REGISTRY_NAME.items() if get_loss(name).family == "dft")
#: token-level methods (importance ratios against the sampler's log-probs)
POLICY_METHODS = frozenset(m for m, name in _REGISTRY_NAME.items() if get_loss(name).family == "policy")

METHOD_LABELS = {
    "bon_sft": "best-of-N SFT",
    "rwr": "RWR",
    "dpo": "DPO",
    "ipo": "IPO",
    "hinge": "SLiC hinge",
    "simpo": "SimPO",
    "unlikelihood": "unlikelihood",
    "rloo": "REINFORCE (RLOO)",
    "reinforce": "REINFORCE (mean baseline)",
    "dft": "DFT",
    "dft2": "DFT2",
    "dft_unselected": "DFT, unselected negatives",
    "ppo": "PPO (clip)",
    "grpo": "GRPO",
    "dapo": "DAPO",
    "dr_grpo": "Dr. GRPO",
}
#: methods whose loss has no term that lowers the probability of a sampled action
_MAXIMUM_LIKELIHOOD = {"bon_sft", "rwr"}
#: methods whose loss has a term that lowers the probability of some sampled actions
NEGATIVE_GRADIENT = frozenset(m for m in ALL_METHODS if m not in _MAXIMUM_LIKELIHOOD)


def registry_loss(method: str) -> LossSpec:
    """The :class:`~dftkern.losses.registry.LossSpec` a method trains with."""
    if method not in _REGISTRY_NAME:
        raise ValueError(f"method must be one of {ALL_METHODS}, got {method!r}")
    return get_loss(_REGISTRY_NAME[method])


def method_hyperparameters(method: str, config: BanditConfig) -> dict:
    """The registry's defaults of the method's loss, overridden by the config's knobs, range-checked.

    ``dpo``/``ipo``/``rwr``: ``beta`` = ``dpo_beta``/``ipo_beta``/``rwr_beta``; ``dft`` (and its
    ablation) and ``dft2``: ``tau``, ``gamma``; Dr. GRPO: ``max_tokens = 1`` (one-token rows);
    every other loss runs at its registry defaults.
    """
    given = {
        "dpo": {"beta": config.dpo_beta},
        "ipo": {"beta": config.ipo_beta},
        "rwr": {"beta": config.rwr_beta},
        "dft": {"tau": config.dft_tau, "gamma": config.dft_gamma},
        "dft_unselected": {"tau": config.dft_tau, "gamma": config.dft_gamma},
        "dft2": {"tau": config.dft2_tau, "gamma": config.dft2_gamma},
    }.get(method, {})
    spec = registry_loss(method)
    if "max_tokens" in spec.defaults and spec.defaults.get("aggregation") == "constant":
        given = dict(given, max_tokens=1)
    return spec.hyperparameters(**given)


def _rows(method: str, family: str, actions: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """``[S*G, rows]`` indices into the group's ``n`` actions, per the table in the module docstring."""
    best = rewards.argmax(dim=1, keepdim=True)
    if family == "sft":
        return best
    if family == "pairwise":
        return torch.cat([best, rewards.argmin(dim=1, keepdim=True)], dim=1)
    if family == "dft":
        if method == "dft_unselected":
            everything = torch.arange(actions.shape[1]).expand_as(actions)
            return torch.cat([best, everything], dim=1)
        return torch.argsort(rewards, dim=1, descending=True, stable=True)
    return torch.arange(actions.shape[1]).expand_as(actions)  # group, policy: all n


def method_loss(
    method: str,
    policy: _PolicyBank,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    ref_log_probs: torch.Tensor,
    config: BanditConfig,
    dft_state=None,
    old_log_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss of ``method`` on one batch: the registry's pure math on ``log pi``.

    Args:
        method: one of :data:`ALL_METHODS`.
        policy: a :class:`LogitPolicy` or :class:`MLPPolicy` bank of ``S`` seeds.
        actions: ``[S, G, n]`` int64 sampled actions, ``G`` groups of ``n`` per seed
            (``[G, n]`` is accepted when ``S = 1``).
        rewards: floating rewards of ``actions``, same shape.
        ref_log_probs: ``[V]`` ``log pi_ref`` (floating; cast to the policy's dtype).
        config: hyper-parameters (see :func:`method_hyperparameters`).
        dft_state: :class:`dftkern.DFTState` with ``S * G`` entries for the :data:`DFT_METHODS`
            (group ``g`` of seed ``s`` uses entry ``s * G + g`` in every batch; its ``u`` is read as
            ``u_prev`` and written back); None there = the stateless batch estimate.
        old_log_probs: :data:`POLICY_METHODS` only: ``[S, V]`` (or ``[V]``) log-probs of the policy
            that sampled ``actions`` (detached); None = the current policy (ratio 1).

    Returns:
        Scalar loss in the policy's dtype (float32 or float64): the *sum over seeds* of each seed's
        loss (a seed's loss is the mean over its groups; for the token-level losses, the
        registry's aggregation over the seed's rows), so every seed gets exactly the gradient of
        its own run.
    """
    spec = registry_loss(method)
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
    hp = method_hyperparameters(method, config)
    log_pi = torch.log_softmax(policy.logits(), dim=-1)  # [S, V], differentiable
    dtype = log_pi.dtype
    ref_log_probs = ref_log_probs.to(dtype)
    _, groups, group_size = actions.shape
    seed_of_row = torch.arange(num_seeds).repeat_interleave(groups)  # [S*G]
    actions = actions.reshape(-1, group_size)  # [S*G, n], seed-major
    rewards = rewards.reshape(-1, group_size).to(dtype)
    picked = actions.gather(1, _rows(method, spec.family, actions, rewards))  # [S*G, rows] action ids
    scores = log_pi[seed_of_row[:, None], picked]  # [S*G, rows] = log pi(a) of one-token rows

    if spec.family == "policy":
        return _policy_loss(spec, hp, log_pi, scores, seed_of_row, picked, rewards, ref_log_probs, old_log_probs)
    if spec.family == "dft":
        ref = None if method == "dft2" else ref_log_probs[picked[:, 1:]]
        u_prev = ids = None
        if dft_state is not None:
            ids = torch.arange(scores.shape[0], dtype=torch.int64)
            u_prev = dft_state.u[ids]
        step = formulas.dft_step(scores, ref=ref, u_prev=u_prev, **hp)
        if dft_state is not None:
            dft_state.write(ids, step.u, update=step.update)
        per_group = step.per_group
    else:
        ref = ref_log_probs[picked] if spec.needs_ref else None
        token_term_sums = spec.token_term(scores) if spec.token_term is not None else None
        per_group = spec.fn(scores, ref=ref, rewards=rewards if spec.needs_rewards else None,
                            token_term_sums=token_term_sums, **hp)
    return per_group.view(num_seeds, groups).mean(dim=1).sum()


def _policy_loss(spec: LossSpec, hp: dict, log_pi: torch.Tensor, scores: torch.Tensor, seed_of_row: torch.Tensor,
                 picked: torch.Tensor, rewards: torch.Tensor, ref_log_probs: torch.Tensor,
                 old_log_probs: torch.Tensor | None) -> torch.Tensor:
    """Token-level losses: ``spec.fn`` (the registry's aggregation) per seed on its ``G * n`` one-token rows."""
    num_seeds = log_pi.shape[0]
    advantages = formulas.group_advantages(rewards, scale=spec.advantage)  # [S*G, n]
    old = None
    if old_log_probs is not None:
        old_log_probs = old_log_probs.detach().to(log_pi.dtype).expand_as(log_pi)
        old = old_log_probs[seed_of_row[:, None], picked]
    entropy = -(log_pi.exp() * log_pi).sum(dim=-1)  # [S] exact entropy of each seed's policy
    total = scores.new_zeros(())
    for seed in range(num_seeds):
        mine = seed_of_row == seed
        total = total + spec.fn(
            scores[mine].reshape(-1, 1), advantages=advantages[mine].reshape(-1),
            old_logps=None if old is None else old[mine].reshape(-1, 1),
            ref_logps=ref_log_probs[picked[mine]].reshape(-1, 1) if hp["kl_beta"] else None,
            entropy=entropy[seed].expand(int(mine.sum()) * picked.shape[1], 1) if hp["entropy_coef"] else None,
            **hp,
        )
    return total
