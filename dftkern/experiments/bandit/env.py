"""The bandit itself: actions, the reference policy ``pi_ref``, the two rewards, sampling regimes."""

from __future__ import annotations

import math

import torch

__all__ = ["NUM_ACTIONS", "REWARDS", "REGIMES", "reference_policy", "gaussian_reward", "bandit_reward",
           "expected_reward"]


NUM_ACTIONS = 100
REFERENCE_LOC = -0.7
REFERENCE_SCALE = 0.4
REWARD_WIDTH = 10.0
#: reward name -> action at which the Gaussian bump peaks
REWARDS: dict[str, int] = {"far": 70, "near": 20}
#: where a batch is drawn from: ``pi_ref`` (an unlimited offline dataset) or the current policy
REGIMES: tuple[str, ...] = ("offline", "on_policy")


def reference_policy(
    num_actions: int = NUM_ACTIONS,
    loc: float = REFERENCE_LOC,
    scale: float = REFERENCE_SCALE,
) -> torch.Tensor:
    """Exact histogram of ``tanh(x)``, ``x ~ Cauchy(loc, scale)``, over ``num_actions`` bins.

    Bin ``k`` is ``[e_k, e_{k+1})`` with ``e = linspace(-1, 1, num_actions + 1)``; its mass
    is ``F(atanh(e_{k+1})) - F(atanh(e_k))`` with ``F`` the Cauchy CDF (``atanh(+-1) =
    +-inf``), i.e. the histogram of infinitely many samples.

    Returns:
        ``[num_actions]`` float64 probabilities, all positive, summing to 1.
    """
    if not isinstance(num_actions, int) or isinstance(num_actions, bool) or num_actions < 2:
        raise ValueError(f"num_actions must be an int >= 2, got {num_actions!r}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    edges = torch.linspace(-1.0, 1.0, num_actions + 1, dtype=torch.float64)
    cdf = 0.5 + torch.atan((torch.atanh(edges) - loc) / scale) / math.pi
    cdf[0], cdf[-1] = 0.0, 1.0  # atanh(-1) = -inf and atanh(1) = inf, exactly
    probs = cdf[1:] - cdf[:-1]
    return probs / probs.sum()


def gaussian_reward(center: float, width: float = REWARD_WIDTH, num_actions: int = NUM_ACTIONS) -> torch.Tensor:
    """``R(a) = exp(-((a - center) / width)^2)`` for ``a = 0..num_actions-1``.

    Returns:
        ``[num_actions]`` float64 rewards in ``(0, 1]``.
    """
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    actions = torch.arange(num_actions, dtype=torch.float64)
    return torch.exp(-(((actions - center) / width) ** 2))


def bandit_reward(name: str) -> torch.Tensor:
    """The named reward of the experiment: ``"far"`` (peak at action 70) or ``"near"`` (20).

    Returns:
        ``[NUM_ACTIONS]`` float64.
    """
    if name not in REWARDS:
        raise ValueError(f"reward must be one of {sorted(REWARDS)}, got {name!r}")
    return gaussian_reward(REWARDS[name])


def expected_reward(probs: torch.Tensor, reward: torch.Tensor) -> float:
    """Exact ``sum_a probs[a] * reward[a]`` for a ``[V]`` distribution and a ``[V]`` reward."""
    if probs.shape != reward.shape or probs.dim() != 1:
        raise ValueError(
            f"probs and reward must be 1-D of the same length, got {tuple(probs.shape)} "
            f"and {tuple(reward.shape)}"
        )
    return float((probs.double() * reward.double()).sum())
