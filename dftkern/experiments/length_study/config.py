"""Settings of the length study (:class:`LengthStudyConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .rewards import LENGTH_REWARDS

__all__ = ["LOSSES", "VARIANTS", "GROUP_LOSSES", "POLICY_LOSSES", "ON_POLICY_ONLY", "MAXIMUM_LIKELIHOOD",
           "ARMS", "arms_of", "trainer_loss", "LengthStudyConfig"]

#: the compared losses: ``rwr`` (reward-weighted regression over the group: maximum likelihood,
#: no negative gradient); ``dpo`` (reference = the initial model in both arms), ``reinforce``,
#: ``ppo`` and ``grpo`` (all push some samples down); two on-policy variants: ``dpo_sampler``
#: (DPO whose reference is the moving sampler: the trainer's ``--on-policy-reference sampler``)
#: and ``ppo_2ep`` (PPO with two updates per sampled window, ``--ppo-epochs 2``: the clip acts)
LOSSES = ("rwr", "dpo", "dpo_sampler", "reinforce", "ppo", "ppo_2ep", "grpo")
#: study losses that are a trainer loss with options: name -> (trainer ``--loss``, TrainConfig keywords)
VARIANTS = {"dpo_sampler": ("dpo", {"on_policy_reference": "sampler"}), "ppo_2ep": ("ppo", {"ppo_epochs": 2})}
#: losses whose rows are the n samples of a prompt with their rewards
GROUP_LOSSES = frozenset({"rwr", "reinforce"})
#: the token-level policy losses (on-policy only: their importance ratio needs the sampler's log-probs)
POLICY_LOSSES = frozenset({"ppo", "ppo_2ep", "grpo"})
#: losses run on-policy only (offline they are either undefined or the same run as another loss)
ON_POLICY_ONLY = POLICY_LOSSES | {"dpo_sampler"}
#: the arm every other loss is compared with, seed by seed
MAXIMUM_LIKELIHOOD = "rwr"
ARMS = ("offline", "on_policy")


def arms_of(loss: str) -> tuple[str, ...]:
    """The arms a loss is run in: ``("on_policy",)`` for :data:`ON_POLICY_ONLY`, else :data:`ARMS`."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return ("on_policy",) if loss in ON_POLICY_ONLY else ARMS


def trainer_loss(loss: str) -> str:
    """The trainer's ``--loss`` of a study loss (``dpo_sampler`` is ``dpo``, ``ppo_2ep`` is ``ppo``)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return VARIANTS[loss][0] if loss in VARIANTS else loss


@dataclass
class LengthStudyConfig:
    """Sizes and settings; ``quick=True`` shrinks everything for CI (see :meth:`resolved`).

    ``steps`` (S), ``prompts_per_step`` (B) and ``samples_per_prompt`` (n) are shared by every arm.
    Learning rates are per loss and equal across arms (all 1e-4 by default: AdamW's update size
    hardly depends on the scale of a loss's gradient). ``workers > 1`` trains that many runs at once,
    each in a spawned process with ``threads`` torch threads; results do not depend on it.
    """

    out: str = "docs/length_study"
    work: str | None = None  # reference model + scratch runs; default: runs/length_study (git-ignored)
    quick: bool = False
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    # reference model
    max_digits: int = 3
    num_warmup_records: int = 3000
    hidden_size: int = 128
    num_layers: int = 4
    warmup_steps: int = 300
    warmup_lr: float = 2e-3
    warmup_batch_size: int = 32
    # the study
    steps: int = 160
    prompts_per_step: int = 16
    samples_per_prompt: int = 4
    refresh_every: int = 1
    lr: dict = field(default_factory=lambda: {loss: 1e-4 for loss in LOSSES})
    dpo_beta: float = 0.1
    rwr_beta: float = 0.1  # RWR temperature: weights softmax(reward / rwr_beta) within a prompt's samples
    mode_width: float = 1.0
    max_new_tokens: int | None = None  # default: max_digits + 3
    eval_prompts: int = 128
    eval_samples: int = 4
    num_checkpoints: int = 8
    rewards: tuple[str, ...] = LENGTH_REWARDS
    losses: tuple[str, ...] = LOSSES
    threads: int | None = 1
    workers: int = 1  # runs trained in parallel, each in its own process with ``threads`` torch threads
    progress: bool = False

    def resolved(self) -> LengthStudyConfig:
        """Apply ``quick`` (a smaller model, fewer steps, one seed) and the derived defaults; validate."""
        cfg = self
        if cfg.quick:
            cfg = replace(cfg, quick=False, seeds=cfg.seeds[:1], num_warmup_records=512, hidden_size=64,
                          num_layers=2, warmup_steps=60, steps=4, prompts_per_step=8, eval_prompts=32,
                          eval_samples=2, num_checkpoints=2)
        if cfg.max_new_tokens is None:
            cfg = replace(cfg, max_new_tokens=cfg.max_digits + 3)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        for name in ("max_digits", "num_warmup_records", "hidden_size", "num_layers", "warmup_steps",
                     "warmup_batch_size", "steps", "prompts_per_step", "samples_per_prompt", "refresh_every",
                     "eval_prompts", "eval_samples", "num_checkpoints", "max_new_tokens", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2 (pairs and groups need two samples), "
                             f"got {self.samples_per_prompt}")
        if self.num_checkpoints > self.steps:
            raise ValueError(f"num_checkpoints ({self.num_checkpoints}) must be <= steps ({self.steps})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty sequence of distinct integers, got {self.seeds!r}")
        bad = [r for r in self.rewards if r not in LENGTH_REWARDS]
        if bad or not self.rewards:
            raise ValueError(f"rewards must be a non-empty subset of {LENGTH_REWARDS}, got {self.rewards!r}")
        bad = [loss for loss in self.losses if loss not in LOSSES]
        if bad or not self.losses:
            raise ValueError(f"losses must be a non-empty subset of {LOSSES}, got {self.losses!r}")
        missing = [loss for loss in self.losses if not (isinstance(self.lr.get(loss), (int, float))
                                                         and self.lr[loss] > 0)]
        if missing:
            raise ValueError(f"lr must map every loss to a learning rate > 0; missing or invalid: {missing}")
        for name in ("warmup_lr", "dpo_beta", "rwr_beta", "mode_width"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4 (the number of heads), got {self.hidden_size}")

    def checkpoint_steps(self) -> list[int]:
        """The steps at which the policy is evaluated (0 = the reference), S included."""
        return [0] + [round(self.steps * (i + 1) / self.num_checkpoints) for i in range(self.num_checkpoints)]

    def reference_key(self) -> dict:
        """The settings that determine the reference model (a cached one is reused when they match)."""
        return {k: getattr(self, k) for k in ("max_digits", "num_warmup_records", "hidden_size", "num_layers",
                                              "warmup_steps", "warmup_lr", "warmup_batch_size")}

