"""The 100-action bandit of Tajwar et al. (2024), run through dftkern's fused losses.

Claim under test ("Preference Fine-Tuning of LLMs Should Leverage Suboptimal, On-Policy
Data", didactic bandit): objectives that sample on-policy or push probability *down* on some
responses (a "negative gradient": DPO, IPO, REINFORCE/RLOO, DFT's negatives) are
mode-seeking and relocate probability mass faster than maximum-likelihood objectives
(best-of-N SFT, RWR), most clearly when the reward's optimum lies where the reference
policy puts little mass.

Setup
-----
* Actions ``a in {0, ..., 99}``. The reference policy ``pi_ref`` is the histogram over
  ``[-1, 1]`` (100 equal bins) of ``tanh(x)``, ``x ~ Cauchy(-0.7, 0.4)``; it is computed
  *exactly* from the Cauchy CDF (the limit of the sampled histogram), so it is identical
  on every run. Its interior mode is at action 16; the Cauchy tails are squashed by
  ``tanh`` into the two end bins (``pi_ref(0) = 7.8 %``, ``pi_ref(99) = 4.2 %``).
* Rewards: ``R_far(a) = exp(-((a - 70) / 10)^2)`` (optimum where ``pi_ref`` is small) and
  ``R_near(a) = exp(-((a - 20) / 10)^2)`` (optimum at the reference mode).
* Policy: a categorical distribution over the 100 actions, initialised at ``pi_ref``:
  ``"logits"`` (the logits are the free parameters) or ``"mlp"`` (a tiny network).
  It is expressed as the input of the fused ops: every sampled action is a one-token
  "sequence" whose label is the action and whose hidden state ``h`` is constant, with
  ``weight [100, H]`` trainable, so ``log pi(a) = log_softmax(weight @ h)[a]`` is exactly the
  sequence log-probability the losses compute. All seeds of a run are trained together in
  one fused call: seed ``s`` owns block ``s`` of the hidden dimension (``h = e_s``, one-hot,
  for the logits policy, so ``weight[:, s]`` are seed ``s``'s logits; ``h = [tanh(A_s c_s +
  b_s), 1]`` in block ``s`` for the network), which gives each seed the gradient of its own
  run (see :class:`LogitPolicy`, :class:`MLPPolicy`). Everything is float64, and banks have
  power-of-two sizes, so a bank reproduces separate runs to float64 rounding (see
  :func:`train_seeds`).

Data and methods
----------------
Every gradient step sees a batch of ``groups`` groups of ``group_size`` (= n) actions,
drawn from ``pi_ref`` (regime ``offline``: an unlimited offline dataset, the most
favourable offline setting) or from the current policy (regime ``on_policy``). A batch is
redrawn every ``reuse`` steps (sample reuse). All methods see the same samples; they
differ only in the loss, always computed by :func:`dftkern.fused_preference_loss` or
:func:`dftkern.fused_dft_loss`:

=========  ================================================================================
bon_sft    best-of-n filtered SFT: ``-log pi(best of the group)``                 (``"sft"``)
rwr        reward-weighted regression over the whole group, temperature ``rwr_beta``  (``"rwr"``)
dpo        DPO on (chosen = best, rejected = worst) of the group, ``dpo_beta``      (``"dpo"``)
ipo        IPO on the same pairs, ``ipo_beta``                                      (``"ipo"``)
rloo       REINFORCE with the leave-one-out baseline over the group                (``"rloo"``)
dft        DFT: positive = best of the group, negatives = the other n - 1 samples,
           ``ref_logps = log pi_ref(negatives)``, ``tau = dft_tau``, ``gamma = dft_gamma``
dft2       DFT2 (no reference term), same groups, ``dft2_tau``, ``dft2_gamma``
reinforce  REINFORCE with the group-mean baseline (not run by default: its gradient is
           ``(n-1)/n`` times rloo's)                                          (``"reinforce"``)
=========  ================================================================================

Preferences are noiseless: "best"/"worst" are by the true reward (first one on ties). The
positive of DFT is the best of the group (not a fresh draw from the reward-tilted
distribution), so ``dft`` is exactly ``bon_sft`` plus a weighted negative gradient on the
rest of the group: the comparison isolates the negative term. DFT's moving-average state
has one entry per (seed, group slot), i.e. ``u`` of slot ``g`` averages over the batches
(the bandit has a single prompt, so every slot estimates the same quantity). Because the policy is a
categorical distribution, the expected reward ``sum_a pi(a) R(a)`` is computed exactly
after every step. Optimiser: Adam with the same learning rate for every method.

Run ``python -m dftkern.experiments.bandit --help``; ``--quick`` is the CI setting.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "NUM_ACTIONS",
    "METHODS",
    "ALL_METHODS",
    "REGIMES",
    "REWARDS",
    "BanditConfig",
    "QUICK_OVERRIDES",
    "reference_policy",
    "gaussian_reward",
    "bandit_reward",
    "expected_reward",
    "LogitPolicy",
    "MLPPolicy",
    "make_policy",
    "method_loss",
    "train_seeds",
    "train_run",
    "run_experiment",
    "summarize",
    "write_outputs",
    "main",
]

NUM_ACTIONS = 100
REFERENCE_LOC = -0.7
REFERENCE_SCALE = 0.4
REWARD_WIDTH = 10.0
#: reward name -> action at which the Gaussian bump peaks
REWARDS: dict[str, int] = {"far": 70, "near": 20}
#: methods run by default, in plotting order (maximum likelihood first)
METHODS: tuple[str, ...] = ("bon_sft", "rwr", "dpo", "ipo", "rloo", "dft", "dft2")
ALL_METHODS: tuple[str, ...] = METHODS + ("reinforce",)
REGIMES: tuple[str, ...] = ("offline", "on_policy")
POLICIES: tuple[str, ...] = ("logits", "mlp")

METHOD_LABELS = {
    "bon_sft": "best-of-N SFT",
    "rwr": "RWR",
    "dpo": "DPO",
    "ipo": "IPO",
    "rloo": "REINFORCE (RLOO)",
    "dft": "DFT",
    "dft2": "DFT2",
    "reinforce": "REINFORCE (mean baseline)",
}
#: methods whose loss has a term that lowers the probability of some sampled actions
NEGATIVE_GRADIENT = {"dpo", "ipo", "rloo", "reinforce", "dft", "dft2"}


# --------------------------------------------------------------------------------------
# Problem definition
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Policies expressed as inputs of the fused ops
# --------------------------------------------------------------------------------------


def _policy_dtype(log_probs: torch.Tensor) -> torch.dtype:
    """float64 policies for float64 ``log_probs`` (what the experiment trains), float32 otherwise."""
    return torch.float64 if log_probs.dtype == torch.float64 else torch.float32


class _PolicyBank(nn.Module):
    """``S`` independent categorical policies (one per seed) behind one set of fused-op inputs.

    Seed ``s`` owns a disjoint block of the hidden dimension: its rows carry the hidden state
    ``seed_features()[s]``, which is zero outside block ``s``, so its logits (and gradients) only
    involve its own block of ``weight``. One fused call therefore trains all seeds at once, as
    separate runs would (Adam acts per coordinate; the bank's loss is the *sum* of the per-seed
    losses, see :func:`method_loss`; :func:`train_seeds` on why float64 and power-of-two banks).
    """

    num_seeds: int
    weight: nn.Parameter

    def seed_features(self) -> torch.Tensor:  # pragma: no cover - abstract
        """``[S, H]`` hidden state of each seed's rows (the policy's dtype; differentiable)."""
        raise NotImplementedError

    def fused_inputs(self, rows_per_seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Inputs of the fused ops for ``S * rows_per_seed`` one-token rows, seed-major.

        Returns:
            ``(hidden [S * rows_per_seed, 1, H], weight [V, H], bias=None)`` in the policy's dtype:
            rows ``s * rows_per_seed ... (s + 1) * rows_per_seed - 1`` belong to seed ``s``.
        """
        features = self.seed_features()
        return features.repeat_interleave(rows_per_seed, dim=0).unsqueeze(1), self.weight, None

    def logits(self) -> torch.Tensor:
        """``[S, V]`` logits of every seed's policy (the policy's dtype; differentiable)."""
        return self.seed_features() @ self.weight.t()


class LogitPolicy(_PolicyBank):
    """Categorical policies whose logits are the free parameters.

    Fused-op form: hidden size ``H = S``; a row of seed ``s`` has the one-hot hidden state
    ``e_s`` and ``weight[:, s]`` (``weight [V, S]``) holds seed ``s``'s logits, so the
    one-token sequence log-probability of label ``a`` is ``log pi_s(a)``.

    Args:
        log_probs: ``[V]`` initial log-probabilities (every seed starts there); float64 gives a
            float64 policy, any other dtype a float32 one.
        num_seeds: ``S``.
    """

    def __init__(self, log_probs: torch.Tensor, num_seeds: int = 1):
        super().__init__()
        if log_probs.dim() != 1:
            raise ValueError(f"log_probs must be 1-D [V], got shape {tuple(log_probs.shape)}")
        if isinstance(num_seeds, bool) or not isinstance(num_seeds, int) or num_seeds < 1:
            raise ValueError(f"num_seeds must be a positive int, got {num_seeds!r}")
        self.num_seeds = num_seeds
        dtype = _policy_dtype(log_probs)
        init = log_probs.detach().to(dtype).reshape(-1, 1).repeat(1, num_seeds)
        self.weight = nn.Parameter(init)
        self.register_buffer("identity", torch.eye(num_seeds, dtype=dtype))

    def seed_features(self) -> torch.Tensor:
        return self.identity


class MLPPolicy(_PolicyBank):
    """Categorical policies produced by tiny networks, initialised exactly at ``log_probs``.

    Seed ``s``: ``h_s = tanh(A_s c_s + b_s)`` (``[H]``) for a fixed random context ``c_s``
    (``[C]``); logits ``= W_s [h_s, 1]`` with ``W_s [V, H + 1]`` whose last column (the bias)
    starts at ``log_probs`` and the rest at zero. ``A_s``, ``b_s`` and ``W_s`` are trained.
    Fused-op form: ``H_total = S (H + 1)``, block-diagonal hidden states, ``weight = [W_0 ... W_{S-1}]``;
    gradients reach the encoders through the fused op's ``d hidden``.

    Args:
        log_probs: ``[V]`` initial log-probabilities (float64 gives a float64 policy, any other
            dtype a float32 one; the random initialisation is drawn in float32 either way).
        seeds: one int per network (initialises its encoder and context; a seed gives the same
            network whatever else is in the bank).
        hidden_size: ``H``; context_size: ``C``.
    """

    def __init__(self, log_probs: torch.Tensor, seeds: Sequence[int] = (0,), hidden_size: int = 16,
                 context_size: int = 8):
        super().__init__()
        if log_probs.dim() != 1:
            raise ValueError(f"log_probs must be 1-D [V], got shape {tuple(log_probs.shape)}")
        for name, value in (("hidden_size", hidden_size), ("context_size", context_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        seeds = list(seeds)
        if not seeds:
            raise ValueError("seeds must name at least one seed")
        self.num_seeds = len(seeds)
        bound = 1.0 / math.sqrt(context_size)
        contexts, enc_w, enc_b = [], [], []
        for seed in seeds:
            generator = torch.Generator().manual_seed(int(seed))
            contexts.append(torch.randn(context_size, generator=generator))
            enc_w.append((torch.rand(hidden_size, context_size, generator=generator) * 2 - 1) * bound)
            enc_b.append((torch.rand(hidden_size, generator=generator) * 2 - 1) * bound)
        dtype = _policy_dtype(log_probs)
        self.register_buffer("context", torch.stack(contexts).to(dtype))  # [S, C]
        self.encoder_weight = nn.Parameter(torch.stack(enc_w).to(dtype))  # [S, H, C]
        self.encoder_bias = nn.Parameter(torch.stack(enc_b).to(dtype))  # [S, H]
        weight = torch.zeros(log_probs.numel(), self.num_seeds, hidden_size + 1, dtype=dtype)
        weight[:, :, hidden_size] = log_probs.detach().to(dtype).reshape(-1, 1)
        self.weight = nn.Parameter(weight.reshape(log_probs.numel(), -1))  # [V, S * (H + 1)]

    def seed_features(self) -> torch.Tensor:
        h = torch.tanh(torch.einsum("shc,sc->sh", self.encoder_weight, self.context) + self.encoder_bias)
        blocks = torch.cat([h, torch.ones_like(h[:, :1])], dim=1)  # [S, H + 1]
        return torch.block_diag(*blocks.unbind(0))  # [S, S * (H + 1)]


def make_policy(kind: str, log_probs: torch.Tensor, seeds: Sequence[int] = (0,), hidden_size: int = 16) -> _PolicyBank:
    """A bank of ``len(seeds)`` ``"logits"`` or ``"mlp"`` policies, all at ``softmax(log_probs)``."""
    if kind == "logits":
        return LogitPolicy(log_probs, num_seeds=len(seeds))
    if kind == "mlp":
        return MLPPolicy(log_probs, seeds=seeds, hidden_size=hidden_size)
    raise ValueError(f"policy must be one of {POLICIES}, got {kind!r}")


def policy_probs(policy: _PolicyBank) -> torch.Tensor:
    """``[S, V]`` float64 probabilities of every seed's current policy (no grad)."""
    with torch.no_grad():
        return torch.softmax(policy.logits().double(), dim=-1)


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BanditConfig:
    """All knobs of one experiment (every field is also a command-line flag)."""

    steps: int = 300
    seeds: int = 5
    groups: int = 32  # G groups per batch
    group_size: int = 4  # n actions per group (DFT: 1 positive + n-1 negatives)
    reuse: int = 1  # gradient steps per sampled batch
    lr: float = 0.05
    policy: str = "logits"
    hidden_size: int = 16  # for policy="mlp"
    methods: tuple[str, ...] = METHODS
    regimes: tuple[str, ...] = REGIMES
    rewards: tuple[str, ...] = tuple(REWARDS)
    dpo_beta: float = 0.1
    ipo_beta: float = 0.1
    rwr_beta: float = 0.1
    dft_tau: float = 1.0
    dft_gamma: float = 0.85
    dft2_tau: float = 0.3
    dft2_gamma: float = 0.9
    threshold: float = 0.8  # report the first step with E[r] >= threshold
    eval_every: int = 1

    def validate(self) -> "BanditConfig":
        """Raise ValueError naming the first bad field; return self."""
        for name in ("steps", "seeds", "groups", "reuse", "hidden_size", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(
                f"group_size must be an int >= 2 (pairs, negatives and leave-one-out need two "
                f"samples), got {self.group_size!r}"
            )
        for name in ("lr", "dpo_beta", "ipo_beta", "rwr_beta", "dft_tau", "dft2_tau"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("dft_gamma", "dft2_gamma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        for name, allowed in (("methods", ALL_METHODS), ("regimes", REGIMES), ("rewards", tuple(REWARDS))):
            values = getattr(self, name)
            if isinstance(values, str) or not values:
                raise ValueError(f"{name} must be a non-empty sequence of names from {allowed}, got {values!r}")
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise ValueError(f"{name}: unknown {unknown}; choose from {allowed}")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has duplicates: {values!r}")
        return self


#: what ``--quick`` changes (CI: the whole grid, fewer steps and seeds, < 20 s)
QUICK_OVERRIDES = {"steps": 40, "seeds": 2, "groups": 16}


# --------------------------------------------------------------------------------------
# Losses: every method goes through dftkern
# --------------------------------------------------------------------------------------


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
        dft_state: :class:`dftkern.DFTState` with ``S * G`` entries for ``dft``/``dft2`` (group
            ``g`` of seed ``s`` uses entry ``s * G + g`` in every batch); unused otherwise.

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
    elif method in ("dft", "dft2"):
        # positive (best of the group; first one on ties) first, then the other n - 1 samples
        order = torch.argsort(rewards, dim=1, descending=True, stable=True)
        grouped = actions.gather(1, order)
        hidden, weight, bias, labels = fused_rows(grouped.reshape(-1))
        ids = torch.arange(grouped.shape[0], dtype=torch.int64)
        common = dict(num_negatives=group_size - 1, ids=ids, state=dft_state, bias=bias)
        if method == "dft":
            loss = fused_dft_loss(
                hidden, weight, labels, ref_logps=ref_log_probs[grouped[:, 1:]], tau=config.dft_tau,
                gamma=config.dft_gamma, variant="dft", **common,
            )
        else:
            loss = fused_dft_loss(
                hidden, weight, labels, tau=config.dft2_tau, gamma=config.dft2_gamma, variant="dft2", **common
            )
    else:
        raise ValueError(f"method must be one of {ALL_METHODS}, got {method!r}")
    return loss * num_seeds


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def _run_seed(seed: int, reward_name: str, regime: str) -> int:
    """Seed of a run's sampling stream: shared by all methods (common random numbers)."""
    return 1_000_003 * seed + 1_009 * list(REWARDS).index(reward_name) + 17 * REGIMES.index(regime) + 12_345


def train_seeds(method: str, regime: str, reward_name: str, seeds: Sequence[int], config: BanditConfig) -> dict:
    """Train one policy per seed (in banks of power-of-two size) and record their exact expected rewards.

    Seed ``s`` draws its samples from its own generator, so its run does not depend on which
    other seeds share the bank; the result equals separate runs to float64 rounding.

    Returns:
        ``{"curves": [S, E] float64 (E[r] before step 0 and after every ``eval_every`` steps, see
        :func:`eval_steps`), "final_probs": [S, V] float64, "samples": actions drawn per seed}``.
    """
    from dftkern import DFTState

    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    if method not in ALL_METHODS:
        raise ValueError(f"method must be one of {ALL_METHODS}, got {method!r}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    blocks = _power_of_two_blocks(len(seeds))
    if len(blocks) > 1:  # e.g. 5 seeds = a bank of 4 and a bank of 1 (see the comment below)
        runs, start = [], 0
        for size in blocks:
            runs.append(train_seeds(method, regime, reward_name, seeds[start:start + size], config))
            start += size
        return {"curves": torch.cat([r["curves"] for r in runs]),
                "final_probs": torch.cat([r["final_probs"] for r in runs]), "samples": runs[0]["samples"]}
    # Why a bank trains each seed exactly as its own run: Adam normalises every coordinate of the
    # gradient, so rounding noise on a coordinate whose exact gradient is ~0 (e.g. the logit of an
    # action nobody sampled under RLOO, whose advantages sum to 0) becomes a step of size up to
    # ~lr. In float32 a bank's different summation order gave such noise (~1e-9) and bank and
    # separate runs drifted apart by ~1e-5 in E[r] within a few steps; hence float64 throughout.
    # The fused losses average over all S*G groups in float32 and the bank multiplies by S: that
    # scale is exact only for S a power of two, hence the split into power-of-two banks above.
    ref_probs = reference_policy()
    ref_log_probs = ref_probs.log()
    reward = bandit_reward(reward_name)
    generators = [torch.Generator().manual_seed(_run_seed(seed, reward_name, regime)) for seed in seeds]
    policy = make_policy(config.policy, ref_log_probs, seeds=seeds, hidden_size=config.hidden_size)
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    dft_state = DFTState(len(seeds) * config.groups) if method in ("dft", "dft2") else None

    per_seed_rows = config.groups * config.group_size
    curves = [policy_probs(policy) @ reward]
    samples = 0
    for step in range(config.steps):
        if step % config.reuse == 0:
            probs = ref_probs.expand(len(seeds), -1) if regime == "offline" else policy_probs(policy)
            actions = torch.stack(
                [torch.multinomial(probs[i], per_seed_rows, replacement=True, generator=g)
                 for i, g in enumerate(generators)]
            ).view(len(seeds), config.groups, config.group_size)
            rewards = reward[actions]
            samples += per_seed_rows
        loss = method_loss(method, policy, actions, rewards, ref_log_probs, config, dft_state)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{method}/{regime}/{reward_name}: loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            curves.append(policy_probs(policy) @ reward)
    return {"curves": torch.stack(curves, dim=1), "final_probs": policy_probs(policy), "samples": samples}


def _power_of_two_blocks(count: int) -> list[int]:
    """Binary decomposition of ``count``, largest first: 5 -> [4, 1], 8 -> [8]."""
    return [1 << bit for bit in reversed(range(count.bit_length())) if count >> bit & 1]


def train_run(method: str, regime: str, reward_name: str, seed: int, config: BanditConfig) -> dict:
    """One seed of :func:`train_seeds`: ``{"curve": [E] float64, "final_probs": [V], "samples"}``."""
    run = train_seeds(method, regime, reward_name, [seed], config)
    return {"curve": run["curves"][0], "final_probs": run["final_probs"][0], "samples": run["samples"]}


def eval_steps(config: BanditConfig) -> list[int]:
    """Gradient-step indices at which :func:`train_run` records the expected reward."""
    steps = [0] + [s for s in range(1, config.steps + 1) if s % config.eval_every == 0]
    if steps[-1] != config.steps:
        steps.append(config.steps)
    return steps


def run_experiment(config: BanditConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run every (method, regime, reward, seed) combination.

    Returns:
        ``{"config", "steps": [S] ints, "curves": {(method, regime, reward): [seeds, S]
        float64}, "final_probs": {key: [seeds, V] float64}, "samples": {key: int},
        "seconds": float}``.
    """
    config.validate()
    start = time.perf_counter()
    curves, finals, samples = {}, {}, {}
    for reward_name in config.rewards:
        for regime in config.regimes:
            for method in config.methods:
                run = train_seeds(method, regime, reward_name, range(config.seeds), config)
                key = (method, regime, reward_name)
                curves[key], finals[key], samples[key] = run["curves"], run["final_probs"], run["samples"]
                if progress is not None:
                    final = curves[key][:, -1]
                    progress(
                        f"{reward_name:>4} {regime:>9} {method:>7}: final E[r] = {final.mean():.3f} "
                        f"+- {final.std(unbiased=False):.3f}  ({time.perf_counter() - start:.1f} s)"
                    )
    return {
        "config": config,
        "steps": eval_steps(config),
        "curves": curves,
        "final_probs": finals,
        "samples": samples,
        "seconds": time.perf_counter() - start,
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------
# Summaries, table, plots
# --------------------------------------------------------------------------------------


def summarize(results: dict) -> list[dict]:
    """One row per (reward, regime, method): final and mean-over-training E[r], steps to threshold.

    ``auc`` is the mean of E[r] over the recorded steps (a speed measure: higher means the
    mass moved earlier). ``steps_to_threshold`` lists, per seed, the first recorded step with
    ``E[r] >= threshold`` (``None`` if never).
    """
    config: BanditConfig = results["config"]
    steps = results["steps"]
    rows = []
    for (method, regime, reward_name), curve in results["curves"].items():
        reached = []
        for seed_curve in curve:
            hits = (seed_curve >= config.threshold).nonzero()
            reached.append(int(steps[int(hits[0])]) if hits.numel() else None)
        final, auc = curve[:, -1], curve.mean(dim=1)
        rows.append(
            {
                "method": method,
                "regime": regime,
                "reward": reward_name,
                "final_mean": float(final.mean()),
                "final_std": float(final.std(unbiased=False)),
                "final_min": float(final.min()),
                "final_max": float(final.max()),
                "auc_mean": float(auc.mean()),
                "auc_std": float(auc.std(unbiased=False)),
                "steps_to_threshold": reached,
                "samples": results["samples"][(method, regime, reward_name)],
            }
        )
    return rows


def _median_steps(reached: list) -> str:
    """Median first-hit step over the seeds that reach the threshold, ``(k/N seeds)`` if not all do."""
    hit = sorted(s for s in reached if s is not None)
    if not hit:
        return "never"
    mid = len(hit) // 2
    median = hit[mid] if len(hit) % 2 else (hit[mid - 1] + hit[mid]) / 2
    text = f"{median:g}"
    return text if len(hit) == len(reached) else f"{text} ({len(hit)}/{len(reached)} seeds)"


def markdown_table(results: dict) -> str:
    """Markdown tables (one per reward) of :func:`summarize`."""
    config: BanditConfig = results["config"]
    ref = reference_policy()
    lines = []
    summary = summarize(results)
    for reward_name in config.rewards:
        base = expected_reward(ref, bandit_reward(reward_name))
        lines.append(
            f"### R_{reward_name} (optimum at action {REWARDS[reward_name]}; E[r] under pi_ref = {base:.3f})\n"
        )
        lines.append(
            f"| method | regime | final E[r] (mean ± std) | min – max | mean E[r] over training | "
            f"steps to E[r] ≥ {config.threshold:g} (median over seeds reaching it) |"
        )
        lines.append("|---|---|---|---|---|---|")
        for row in summary:
            if row["reward"] != reward_name:
                continue
            lines.append(
                f"| {METHOD_LABELS[row['method']]} | {row['regime'].replace('_', '-')} | "
                f"{row['final_mean']:.3f} ± {row['final_std']:.3f} | {row['final_min']:.3f} – {row['final_max']:.3f} | "
                f"{row['auc_mean']:.3f} ± {row['auc_std']:.3f} | {_median_steps(row['steps_to_threshold'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def _colors(methods: Sequence[str]) -> dict:
    palette = {
        "bon_sft": "#1f77b4",
        "rwr": "#17becf",
        "dpo": "#d62728",
        "ipo": "#ff7f0e",
        "rloo": "#2ca02c",
        "dft": "#9467bd",
        "dft2": "#8c564b",
        "reinforce": "#bcbd22",
    }
    return {m: palette[m] for m in methods}


def plot_curves(results: dict, path: Path) -> None:
    """Expected reward vs gradient step: rows = rewards, columns = regimes; mean ± std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config: BanditConfig = results["config"]
    steps = torch.tensor(results["steps"])
    colors = _colors(config.methods)
    ref = reference_policy()
    fig, axes = plt.subplots(
        len(config.rewards), len(config.regimes), figsize=(5.2 * len(config.regimes), 3.6 * len(config.rewards)),
        squeeze=False, sharex=True,
    )
    for i, reward_name in enumerate(config.rewards):
        base = expected_reward(ref, bandit_reward(reward_name))
        for j, regime in enumerate(config.regimes):
            ax = axes[i][j]
            for method in config.methods:
                curve = results["curves"][(method, regime, reward_name)]
                mean, std = curve.mean(0), curve.std(0, unbiased=False)
                style = "-" if method in NEGATIVE_GRADIENT else "--"
                ax.plot(steps, mean, style, color=colors[method], label=METHOD_LABELS[method], lw=1.6)
                ax.fill_between(steps, mean - std, mean + std, color=colors[method], alpha=0.15, lw=0)
            ax.axhline(base, color="gray", lw=0.8, ls=":", label="pi_ref")
            ax.set_ylim(0, 1.02)
            ax.set_title(f"R_{reward_name} (optimum at a={REWARDS[reward_name]}), {regime.replace('_', '-')}")
            ax.grid(alpha=0.3)
            if i == len(config.rewards) - 1:
                ax.set_xlabel("gradient step")
            if j == 0:
                ax.set_ylabel("expected reward E_pi[R]")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(
        f"Bandit (100 actions): mean ± std over {config.seeds} seeds; "
        f"{config.groups} groups × {config.group_size} samples per step, reuse {config.reuse}, "
        f"Adam lr {config.lr:g}, {config.policy} policy; dashed = no negative gradient",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_final_policies(results: dict, path: Path) -> None:
    """Final policy (mean over seeds) of every method next to pi_ref and the reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config: BanditConfig = results["config"]
    colors = _colors(config.methods)
    ref = reference_policy()
    actions = torch.arange(NUM_ACTIONS)
    fig, axes = plt.subplots(
        len(config.rewards), len(config.regimes), figsize=(5.2 * len(config.regimes), 3.4 * len(config.rewards)),
        squeeze=False, sharex=True,
    )
    for i, reward_name in enumerate(config.rewards):
        reward = bandit_reward(reward_name)
        for j, regime in enumerate(config.regimes):
            ax = axes[i][j]
            ax.fill_between(actions, 0, ref, step="mid", color="gray", alpha=0.35, label="pi_ref")
            for method in config.methods:
                probs = results["final_probs"][(method, regime, reward_name)].mean(0)
                style = "-" if method in NEGATIVE_GRADIENT else "--"
                ax.plot(actions, probs, style, color=colors[method], label=METHOD_LABELS[method], lw=1.3)
            ax.set_yscale("log")
            ax.set_ylim(1e-4, 1.0)
            twin = ax.twinx()
            twin.plot(actions, reward, color="black", lw=0.8, ls=":")
            twin.set_ylim(0, 1.05)
            twin.set_yticks([])
            ax.set_title(f"final policy, R_{reward_name}, {regime.replace('_', '-')} (dotted: reward)", fontsize=9)
            if i == len(config.rewards) - 1:
                ax.set_xlabel("action")
            if j == 0:
                ax.set_ylabel("probability (log scale)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _samples_per_run(config: BanditConfig) -> int:
    return math.ceil(config.steps / config.reuse) * config.groups * config.group_size


def write_outputs(results: dict, out_dir: Path, command: str, plots: bool = True) -> dict:
    """Write ``results.md`` (table + command line), ``results.json`` and the PNGs to ``out_dir``.

    Returns:
        ``{name: Path}`` of the files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config: BanditConfig = results["config"]
    written = {}
    if plots:
        written["curves_png"] = out_dir / "reward_curves.png"
        plot_curves(results, written["curves_png"])
        written["policies_png"] = out_dir / "final_policies.png"
        plot_final_policies(results, written["policies_png"])

    header = [
        "# Bandit experiment: results",
        "",
        f"Command: `{command}`",
        "",
        f"Wall time: {results['seconds']:.1f} s on {platform.machine()} "
        f"({results['threads']} torch thread(s)), torch {torch.__version__}, Python {platform.python_version()}.",
        "",
        "Configuration: " + ", ".join(f"{k}={v}" for k, v in asdict(config).items()) + ".",
        "",
        f"Each gradient step uses {config.groups} groups × {config.group_size} sampled actions; a new batch is drawn "
        f"every {config.reuse} step(s), so a run draws {_samples_per_run(config)} actions per seed. "
        "E[r] is the exact expected reward of the policy; spread is over seeds (population std); "
        "\"mean E[r] over training\" averages the curve over all recorded steps (higher = mass moved earlier).",
        "",
    ]
    written["table_md"] = out_dir / "results.md"
    written["table_md"].write_text("\n".join(header) + "\n" + markdown_table(results))

    # curves thinned to at most ~100 points (the summary above uses every recorded step)
    stride = max(1, math.ceil((len(results["steps"]) - 1) / 100))
    keep = sorted(set(range(0, len(results["steps"]), stride)) | {len(results["steps"]) - 1})
    payload = {
        "command": command,
        "config": asdict(config),
        "seconds": round(results["seconds"], 2),
        "summary": summarize(results),
        "curve_steps": [results["steps"][i] for i in keep],
        "mean_curves": {
            "/".join(key): [round(float(curve[:, i].mean()), 4) for i in keep]
            for key, curve in results["curves"].items()
        },
        "std_curves": {
            "/".join(key): [round(float(curve[:, i].std(unbiased=False)), 4) for i in keep]
            for key, curve in results["curves"].items()
        },
    }
    written["json"] = out_dir / "results.json"
    written["json"].write_text(json.dumps(payload, indent=None, separators=(",", ":")) + "\n")
    return written


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    defaults = BanditConfig()
    parser = argparse.ArgumentParser(
        prog="python -m dftkern.experiments.bandit",
        description="Tajwar et al. (2024) 100-action bandit: on-policy / negative-gradient objectives vs "
        "maximum likelihood, every loss computed by dftkern.",
    )
    parser.add_argument("--out", type=Path, default=Path("bandit_out"), help="output folder (default: bandit_out)")
    parser.add_argument("--quick", action="store_true",
                        help=f"CI setting (< 20 s): overrides {QUICK_OVERRIDES} unless given explicitly")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNGs (table and JSON only)")
    parser.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the matrices are tiny, threads only add overhead)")
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, tuple):
            parser.add_argument(flag, nargs="+", default=None, metavar="NAME", help=f"default: {' '.join(value)}")
        elif name == "policy":
            parser.add_argument(flag, choices=POLICIES, default=None, help=f"default: {value}")
        else:
            parser.add_argument(flag, type=type(value), default=None, help=f"default: {value}")
    return parser


def config_from_args(args: argparse.Namespace) -> BanditConfig:
    """Defaults, then ``--quick`` overrides, then explicit flags."""
    config = BanditConfig()
    if args.quick:
        config = replace(config, **QUICK_OVERRIDES)
    explicit = {}
    for name in asdict(config):
        value = getattr(args, name)
        if value is not None:
            explicit[name] = tuple(value) if isinstance(value, list) else value
    return replace(config, **explicit).validate()


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point; returns ``{"results", "files"}`` for programmatic use."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        progress = None if args.quiet else (lambda line: print(line, flush=True))
        results = run_experiment(config, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python -m dftkern.experiments.bandit" + "".join(" " + shlex.quote(a) for a in argv_list)
    files = write_outputs(results, args.out, command, plots=not args.no_plot)
    if not args.quiet:
        print(f"done in {results['seconds']:.1f} s; wrote " + ", ".join(str(p) for p in files.values()))
    return {"results": results, "files": files}


if __name__ == "__main__":
    main()
