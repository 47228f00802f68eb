"""Every knob of one bandit experiment (each is also a command-line flag)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .env import REGIMES, REWARDS
from .methods import ALL_METHODS, METHODS
from .policies import POLICIES

__all__ = ["BanditConfig", "QUICK_OVERRIDES"]


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
