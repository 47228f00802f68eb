"""One registry of every loss: what it is, which rows and inputs it needs, its defaults and its paper.

The fused entry points (:func:`dftkern.fused_preference_loss`, :func:`dftkern.fused_dft_loss`,
:func:`dftkern.fused_policy_loss`), the trainer and the experiments read this table instead of
keeping their own lists. Each entry points at a pure function of :mod:`dftkern.losses.formulas`
(``spec.fn``) that can be called on plain tensors of scores::

    from dftkern.losses.registry import get_loss
    dpo = get_loss("dpo")
    per_group = dpo(scores, ref=ref)             # defaults filled and ranges checked: beta = 0.1
    per_group = dpo.fn(scores, ref=ref, beta=0.3)  # the bare math, every hyper-parameter explicit

Families and their rows (``rows_per_group``; None = the group size is ``rewards.shape[1]``):

==========  ====================================================================================
sft         1 row: the target
pairwise    2 rows: (chosen, rejected)
group       n rows: samples with rewards ``[G, n]``
dft         1 + K rows: the positive, then K negatives sampled from the base model
policy      token level: any rows, with per-row (or per-token) advantages; ``fn`` works on
            per-token log-probs ``[R, T]`` (:func:`dftkern.losses.formulas.policy_loss`)
==========  ====================================================================================

Adding a loss
-------------
Write its math as one pure function in :mod:`dftkern.losses.formulas` with the uniform signature
``fn(scores [G, n], *, ref=None, rewards=None, counts=None, token_term_sums=None, **hp) -> [G]``
(hyper-parameters keyword-only, no defaults there), then add one :class:`LossSpec` entry to
:data:`LOSSES` below (family, rows per group, which inputs it needs, ``defaults``, paper, and a
``token_term`` if it needs per-row sums of a per-token function). A hyper-parameter name that
is new also gets one line in :data:`HYPERPARAMETERS` (its documented range). That is all:
``fused_preference_loss`` (families sft/pairwise/group) and the trainer pick it up from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from . import formulas as f

__all__ = ["LossSpec", "HyperParameter", "HYPERPARAMETERS", "LOSSES", "FAMILIES", "get_loss", "loss_names"]

FAMILIES = ("sft", "pairwise", "group", "dft", "policy")


# ---------------------------------------------------------------------------------------------
# hyper-parameters and their documented ranges
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HyperParameter:
    """A hyper-parameter's type and documented range (checked by :meth:`check`).

    ``low``/``high`` bound a real (or integer) value, open or closed; ``choices`` are the accepted
    strings (a value may be a choice or, when ``numeric``, a number); ``optional``: None allowed.
    """

    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    numeric: bool = True
    integer: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False

    def describe(self) -> str:
        """E.g. ``'mean', 'none' or a finite number in [-1e+09, 1e+09]``."""
        parts = [f"{c!r}" for c in self.choices]
        if self.numeric:
            lo = ("(" if self.low_open else "[") + ("-inf" if self.low is None else f"{self.low:g}")
            hi = ("inf" if self.high is None else f"{self.high:g}") + (")" if self.high_open else "]")
            parts.append(("an int" if self.integer else "a finite number") + f" in {lo}, {hi}")
        if self.optional:
            parts.append("None")
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]

    def check(self, name: str, value):
        """Return ``value`` normalized (float / int / str / None); TypeError or ValueError naming ``name``."""
        if value is None and self.optional:
            return None
        if isinstance(value, str) and self.choices:  # a string where strings are accepted: an unknown choice
            if value in self.choices:
                return value
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        if not self.numeric or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or (self.integer and not isinstance(value, int)):
            raise TypeError(f"{name} must be {self.describe()}, got {type(value).__name__} {value!r}")
        ok = math.isfinite(value)
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        if not ok:
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        return int(value) if self.integer else float(value)


HYPERPARAMETERS: Mapping[str, HyperParameter] = MappingProxyType({
    # bounded away from 0 and infinity so that beta * margin, 1 / (2 beta) (IPO) and R / beta (RWR)
    # stay finite in float32 for any finite margin a sequence log-prob can have
    "beta": HyperParameter("DPO/IPO/hinge strength, SimPO scale, RWR temperature", 1e-6, 1e6),
    "simpo_gamma": HyperParameter("SimPO target reward margin", -1e6, 1e6),
    "unlikelihood_alpha": HyperParameter("weight of the unlikelihood term", 0.0, 1e6),
    "baseline": HyperParameter("REINFORCE baseline", -1e9, 1e9, choices=("mean", "none")),
    "tau": HyperParameter("DFT temperature of the negatives' scores", 1e-6, 1e6),
    "gamma": HyperParameter("DFT moving-average weight of the new batch estimate", 0.0, 1.0, low_open=True),
    "clip_eps": HyperParameter("PPO clip range below (and above, unless clip_eps_high) 1", 0.0, 1e6,
                               low_open=True),
    "clip_eps_high": HyperParameter("upper clip range (DAPO's clip-higher); None = clip_eps", 0.0, 1e6,
                                    optional=True),
    "kl_beta": HyperParameter("weight of the k3 KL to the reference", 0.0, 1e6),
    "entropy_coef": HyperParameter("weight of the entropy bonus (negative: a penalty)", -1e6, 1e6),
    "aggregation": HyperParameter("how token terms are averaged", numeric=False, choices=f.AGGREGATIONS),
    "max_tokens": HyperParameter("Dr. GRPO's constant normalizer (max response tokens)", 1, None, integer=True,
                                 optional=True),
})


def check_hyperparameter(name: str, value):
    """Check ``value`` against :data:`HYPERPARAMETERS` ``[name]`` (TypeError/ValueError with the range)."""
    return HYPERPARAMETERS[name].check(name, value)


# ---------------------------------------------------------------------------------------------
# the spec
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LossSpec:
    """Everything a caller needs to know about one loss (see the module docstring)."""

    name: str
    family: str
    """"sft" | "pairwise" | "group" | "dft" | "policy"."""
    fn: Callable[..., torch.Tensor]
    """The pure math (:mod:`dftkern.losses.formulas`)."""
    paper: str
    formula: str
    rows_per_group: int | None
    """Rows per group, or None: the group size is ``rewards.shape[1]`` (group family) / any (policy)."""
    rows: str
    """What the rows of one group are, in order."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """Hyper-parameter name -> default (the names ``fn`` takes; ranges in :data:`HYPERPARAMETERS`)."""
    needs_ref: bool = False
    """Reference-model log-probs are used (per row; for DFT per negative; for policy losses per token
    when ``kl_beta > 0``, which the default decides)."""
    ref_optional: bool = False
    """A missing reference means 0 (hinge) instead of an error."""
    needs_rewards: bool = False
    needs_negatives: bool = False
    """Rows other than the known-good answer are needed (sampled negatives / rejected answers)."""
    needs_old_logps: bool = False
    """Token-level losses with importance ratios: the sampler's per-token log-probs."""
    min_rows_per_group: int = 1
    mean_scores: bool = False
    """Scores are always mean token log-probs (SimPO, DFT2); otherwise sums (``average=True`` switches)."""
    token_term: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Per-token function whose per-row sums ``fn`` receives as ``token_term_sums``."""
    level: str = "sequence"
    """"sequence" (``fn`` on per-row scores ``[G, n]``) or "token" (``fn`` on per-token log-probs)."""
    stats_fn: Callable[..., dict] | None = None
    """Extra detached statistics of a call, ``stats_fn(scores, ref=, rewards=, **hp) -> dict``."""
    advantage: str | None = None
    """Policy losses: how rewards become advantages (:func:`~dftkern.losses.formulas.group_advantages`
    ``scale=``): "std" or "none"."""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"LossSpec {self.name!r}: family must be one of {FAMILIES}, got {self.family!r}")
        if self.level not in ("sequence", "token"):
            raise ValueError(f"LossSpec {self.name!r}: level must be 'sequence' or 'token', got {self.level!r}")
        unknown = sorted(set(self.defaults) - set(HYPERPARAMETERS))
        if unknown:
            raise ValueError(f"LossSpec {self.name!r}: hyper-parameters {unknown} have no entry in HYPERPARAMETERS")
        for name, value in self.defaults.items():  # a default outside its own range is a registry bug
            check_hyperparameter(name, value)
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    def hyperparameters(self, **given) -> dict:
        """``defaults`` overridden by ``given``, each checked against its documented range.

        Raises TypeError for a name this loss does not take, and TypeError/ValueError (naming the
        hyper-parameter and its range) for a bad value.
        """
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise TypeError(f"loss {self.name!r} has no hyper-parameter(s) {unknown}; it takes {sorted(self.defaults)}")
        merged = dict(self.defaults, **given)
        return {name: check_hyperparameter(name, value) for name, value in merged.items()}

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        """``fn`` with the defaults filled in and every hyper-parameter checked."""
        hp = {k: kwargs.pop(k) for k in list(kwargs) if k in self.defaults}
        return self.fn(*args, **kwargs, **self.hyperparameters(**hp))


def _margin_stats(scores, *, ref=None, rewards=None, **hp) -> dict:
    return {"margins": f.pairwise_margins(scores, ref).detach()}


def _reinforce_stats(scores, *, ref=None, rewards=None, baseline="mean", **hp) -> dict:
    return {"advantages": f.reinforce_advantages(rewards, baseline).reshape(-1)}


def _rloo_stats(scores, *, ref=None, rewards=None, **hp) -> dict:
    return {"advantages": f.rloo_advantages(rewards).reshape(-1)}


_PAIR = "(chosen, rejected)"
_SAMPLES = "n samples of the same prompt, with rewards [G, n]"
_DFT_ROWS = "(positive, K negatives sampled from the base model)"
_POLICY_ROWS = "any rows (samples), token level; advantages per row or per token"
_PPO = "Schulman et al. 2017, Proximal Policy Optimization Algorithms"
_DFT = ("Guo et al. 2025, Discriminative Finetuning of Generative LLMs without Reward Models and Human "
        "Preference Data")
_DFT_FORMULA = ("-s(y) + (1/K) sum_j omega_j s(y'_j), omega_j = exp(d_j - u), d_j = s(y'_j)/tau - r_j, "
                "u <- logaddexp(log(1-gamma) + u, log(gamma) + logsumexp_j d_j - log K)")
_POLICY_FORMULA = ("sum_t w_t [-min(r_t A, clip(r_t, 1-eps, 1+eps_high) A) + kl_beta k3_t - entropy_coef H_t], "
                   "r_t = exp(logp_t - old_t), k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1; w_t by aggregation")

LOSSES: Mapping[str, LossSpec] = MappingProxyType({spec.name: spec for spec in (
    LossSpec("sft", "sft", f.sft_loss, "maximum likelihood (supervised fine-tuning)", "-s", 1, "(target,)"),
    LossSpec("dpo", "pairwise", f.dpo_loss,
             "Rafailov et al. 2023, Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
             "-log sigmoid(beta * ((s_c - r_c) - (s_r - r_r)))", 2, _PAIR, {"beta": 0.1},
             needs_ref=True, needs_negatives=True, stats_fn=_margin_stats),
    LossSpec("ipo", "pairwise", f.ipo_loss,
             "Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human Preferences",
             "((s_c - r_c) - (s_r - r_r) - 1/(2 beta))^2", 2, _PAIR, {"beta": 0.1},
             needs_ref=True, needs_negatives=True, stats_fn=_margin_stats),
    LossSpec("hinge", "pairwise", f.hinge_loss,
             "Zhao et al. 2023, SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
             "max(0, 1 - beta * ((s_c - r_c) - (s_r - r_r)))", 2, _PAIR, {"beta": 0.1},
             needs_ref=True, ref_optional=True, needs_negatives=True, stats_fn=_margin_stats),
    LossSpec("simpo", "pairwise", f.simpo_loss,
             "Meng et al. 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward",
             "-log sigmoid(beta * (s̄_c - s̄_r) - simpo_gamma)", 2, _PAIR, {"beta": 0.1, "simpo_gamma": 0.5},
             needs_negatives=True, mean_scores=True, stats_fn=_margin_stats),
    LossSpec("unlikelihood", "pairwise", f.unlikelihood_loss,
             "Welleck et al. 2019, Neural Text Generation with Unlikelihood Training",
             "-s_c - alpha * sum_{t in rejected} log(1 - p_t)", 2, _PAIR, {"unlikelihood_alpha": 1.0},
             needs_negatives=True, token_term=f.unlikelihood_token_term),
    LossSpec("rwr", "group", f.rwr_loss,
             "Peters & Schaal 2007, Reinforcement Learning by Reward-Weighted Regression for Operational Space "
             "Control (as compared in Tajwar et al. 2024)",
             "-sum_j softmax_j(R_j / beta) s_j", None, _SAMPLES, {"beta": 0.1},
             needs_rewards=True, needs_negatives=True),
    LossSpec("reinforce", "group", f.reinforce_loss,
             "Williams 1992, Simple Statistical Gradient-Following Algorithms for Connectionist Reinforcement "
             "Learning", "-(1/n) sum_j (R_j - b) s_j, b = group mean | 0 | a number", None, _SAMPLES,
             {"baseline": "mean"}, needs_rewards=True, needs_negatives=True, stats_fn=_reinforce_stats),
    LossSpec("rloo", "group", f.rloo_loss,
             "Ahmadian et al. 2024, Back to Basics: Revisiting REINFORCE Style Optimization for Learning from "
             "Human Feedback in LLMs", "-(1/n) sum_j (R_j - mean_{k != j} R_k) s_j", None, _SAMPLES,
             needs_rewards=True, needs_negatives=True, min_rows_per_group=2, stats_fn=_rloo_stats),
    LossSpec("dft", "dft", f.dft_loss, _DFT, _DFT_FORMULA + " (s = sum of token log-probs)", None, _DFT_ROWS,
             {"tau": 1.0, "gamma": 0.85}, needs_ref=True, needs_negatives=True, min_rows_per_group=2),
    LossSpec("dft2", "dft", f.dft_loss, _DFT, _DFT_FORMULA + " with s = mean token log-prob and r = 0", None,
             _DFT_ROWS, {"tau": 0.3, "gamma": 0.9}, needs_negatives=True, min_rows_per_group=2, mean_scores=True),
    LossSpec("ppo", "policy", f.policy_loss, _PPO + " (clipped surrogate; no learned critic here: group "
             "advantages)", _POLICY_FORMULA + "; token_mean", None, _POLICY_ROWS,
             {"clip_eps": 0.2, "clip_eps_high": None, "kl_beta": 0.0, "entropy_coef": 0.0,
              "aggregation": "token_mean", "max_tokens": None},
             needs_rewards=True, needs_old_logps=True, level="token", advantage="std"),
    LossSpec("grpo", "policy", f.policy_loss, "Shao et al. 2024, DeepSeekMath: Pushing the Limits of Mathematical "
             "Reasoning in Open Language Models (GRPO)", _POLICY_FORMULA + "; sequence_mean", None, _POLICY_ROWS,
             {"clip_eps": 0.2, "clip_eps_high": None, "kl_beta": 0.04, "entropy_coef": 0.0,
              "aggregation": "sequence_mean", "max_tokens": None},
             needs_ref=True, needs_rewards=True, needs_old_logps=True, level="token", advantage="std"),
    LossSpec("dapo", "policy", f.policy_loss, "Yu et al. 2025, DAPO: An Open-Source LLM Reinforcement Learning "
             "System at Scale", _POLICY_FORMULA + "; token_mean, clip-higher eps_high = 0.28, no KL", None,
             _POLICY_ROWS, {"clip_eps": 0.2, "clip_eps_high": 0.28, "kl_beta": 0.0, "entropy_coef": 0.0,
                            "aggregation": "token_mean", "max_tokens": None},
             needs_rewards=True, needs_old_logps=True, level="token", advantage="std"),
    LossSpec("dr_grpo", "policy", f.policy_loss, "Liu et al. 2025, Understanding R1-Zero-Like Training: A Critical "
             "Perspective (Dr. GRPO)", _POLICY_FORMULA + "; constant = sum / (R * max_tokens), advantages "
             "without the std", None, _POLICY_ROWS,
             {"clip_eps": 0.2, "clip_eps_high": None, "kl_beta": 0.0, "entropy_coef": 0.0,
              "aggregation": "constant", "max_tokens": None},
             needs_rewards=True, needs_old_logps=True, level="token", advantage="none"),
)})


def get_loss(name: str) -> LossSpec:
    """The :class:`LossSpec` of ``name`` (ValueError listing the known names otherwise)."""
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {name!r}")
    return LOSSES[name]


def loss_names(family: str | None = None) -> tuple[str, ...]:
    """Names of all losses, or of one family (``"sft"``, ``"pairwise"``, ``"group"``, ``"dft"``, ``"policy"``)."""
    if family is None:
        return tuple(LOSSES)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} or None, got {family!r}")
    return tuple(name for name, spec in LOSSES.items() if spec.family == family)
