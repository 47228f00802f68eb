"""Training objectives: which rows a loss needs and how they are handed to dftkern's fused losses.

Every training example is one prompt with its rows: the good answer (row 0) and its K sampled
negatives (rows 1..K), or (on-policy) the data's answer and/or ``n`` fresh samples. Each loss
sees them as follows:

=================================  =============================================================
loss                               rows given to the fused loss
=================================  =============================================================
dft, dft2                          ``[pos, neg_1..neg_K]`` per example -> :func:`fused_dft_loss`
                                   (ids into the DFTState; DFT also the reference log-probs)
sft                                ``[pos]`` (negatives are never computed)
dpo, ipo, hinge, simpo,            K pairs ``(pos, neg_j)`` per example; the positive's hidden
unlikelihood                       states are computed once and reused for every pair
rwr, reinforce, rloo               one group ``[pos, neg_1..neg_K]`` with rewards ``[1+K]``
                                   (positive: ``positive_reward``, default 1.0; negatives: the
                                   rewards stored by ``generate --reward``)
ppo, grpo, dapo, dr_grpo           on-policy only: the ``n`` samples of a prompt, token level ->
                                   :func:`fused_policy_loss` with group advantages from the
                                   rewards, the sampler's per-token log-probs (``old_logps``) and,
                                   when ``kl_beta > 0``, the initial model's (``ref_logps``)
=================================  =============================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import dftkern
from dftkern.losses.formulas import group_advantages
from dftkern.losses.registry import HYPERPARAMETERS, LOSSES, get_loss

from .batching import Batch
from .options import AnyOf, Choice, Flag, Number, Spec, option, validate

__all__ = ["TRAINER_FAMILIES", "LOSS_NAMES", "LossSpec", "LOSS_SPECS", "POLICY_LOSS_NAMES", "POLICY_LOSS_SPECS",
           "TRAIN_LOSS_NAMES", "ObjectiveConfig", "Objective"]

ACCUM_DTYPES = ("fp32", "weight")
"""``--accum-dtype``: dftkern's ``accum_dtype`` for the LM-head ``dW`` (see :func:`dftkern.fused_token_loss`)."""

TRAINER_FAMILIES = ("sft", "pairwise", "group", "dft")
"""Sequence-level loss families the trainer feeds offline and on-policy (:data:`LOSS_NAMES`)."""


@dataclass(frozen=True)
class LossSpec:
    """What a loss needs from the data, as the trainer reads it from :data:`dftkern.losses.registry.LOSSES`."""

    name: str
    family: str  # "dft" | "sft" | "pairwise" | "group" | "policy"
    needs_negatives: bool
    needs_ref_logps: bool
    """Per-row (sequence) reference log-probs; the policy losses' per-token ones are decided by ``kl_beta``."""
    needs_rewards: bool
    min_rows_per_group: int = 1

    @classmethod
    def of(cls, name: str) -> LossSpec:
        """The trainer's view of registry entry ``name``."""
        spec = get_loss(name)
        if spec.family == "policy":  # samples with rewards; >= 2 per prompt for a group advantage
            return cls(spec.name, spec.family, False, False, True, 2)
        return cls(spec.name, spec.family, spec.needs_negatives, spec.needs_ref, spec.needs_rewards,
                   spec.min_rows_per_group)


LOSS_SPECS = {name: LossSpec.of(name) for name, spec in LOSSES.items() if spec.family in TRAINER_FAMILIES}
LOSS_NAMES = tuple(LOSS_SPECS)
"""Sequence-level losses: offline (``--negatives``) and on-policy."""
POLICY_LOSS_SPECS = {name: LossSpec.of(name) for name, spec in LOSSES.items() if spec.family == "policy"}
POLICY_LOSS_NAMES = tuple(POLICY_LOSS_SPECS)
"""Token-level policy losses (PPO-clip, GRPO, DAPO, Dr. GRPO): on-policy only (``--on-policy``)."""
TRAIN_LOSS_NAMES = LOSS_NAMES + POLICY_LOSS_NAMES
"""Every ``--loss`` the trainer accepts."""
_POLICY_OPTIONS = ("clip_eps", "clip_eps_high", "kl_beta", "entropy_coef")


def _hyperparameter(name: str, *, optional: bool = False) -> Spec:
    """The accepted values of a loss hyper-parameter: its range in the registry (:data:`HYPERPARAMETERS`)."""
    hp = HYPERPARAMETERS[name]
    number = Number(low=hp.low, high=hp.high, low_open=hp.low_open, high_open=hp.high_open, optional=optional)
    if not hp.choices:
        return number
    return AnyOf((Choice(hp.choices), number), optional=optional,
                 text=f"{', '.join(map(repr, hp.choices))} or a number in {number.interval()}")


def _default(name: str):
    """The one default every loss taking hyper-parameter ``name`` has in the registry."""
    values = {spec.defaults[name] for spec in LOSSES.values() if name in spec.defaults}
    if len(values) != 1:
        raise ValueError(f"the registry has several defaults for {name}: {sorted(values)}")
    return values.pop()


def _defaults_by_loss(name: str) -> str:
    """``"1.0 (dft), 0.3 (dft2)"``: the registry's per-loss defaults of hyper-parameter ``name``."""
    by_value: dict = {}
    for loss, spec in LOSSES.items():
        if loss in TRAIN_LOSS_NAMES and name in spec.defaults:
            by_value.setdefault(spec.defaults[name], []).append(loss)
    return ", ".join(f"{'clip_eps' if value is None else value} ({', '.join(losses)})"
                     for value, losses in by_value.items())


@dataclass(frozen=True)
class ObjectiveConfig:
    """The loss and its hyper-parameters; ranges and defaults come from :mod:`dftkern.losses.registry`
    (``tau``/``gamma`` None: the variant's default, DFT 1.0 / 0.85, DFT2 0.3 / 0.9)."""

    loss: str = option("dft", Choice(TRAIN_LOSS_NAMES), "training objective (ppo, grpo, dapo, dr_grpo: with "
                       "--on-policy only)")
    tau: float | None = option(None, _hyperparameter("tau", optional=True), "DFT temperature", group="loss",
                               default_text=_defaults_by_loss("tau"))
    gamma: float | None = option(None, _hyperparameter("gamma", optional=True), "DFT moving-average weight",
                                 group="loss", default_text=_defaults_by_loss("gamma"))
    beta: float = option(_default("beta"), _hyperparameter("beta"), "dpo/ipo/hinge strength, simpo scale, rwr "
                         "temperature", group="loss")
    simpo_gamma: float = option(_default("simpo_gamma"), _hyperparameter("simpo_gamma"), "SimPO margin",
                                group="loss")
    unlikelihood_alpha: float = option(_default("unlikelihood_alpha"), _hyperparameter("unlikelihood_alpha"),
                                       "unlikelihood weight", group="loss")
    baseline: str | float = option(_default("baseline"), _hyperparameter("baseline"),
                                   "reinforce baseline: mean | none | a number", group="loss")
    average: bool = option(False, Flag(), "preference losses: mean token log-prob instead of sum", group="loss")
    dft_u_init: float = option(0.0, Number(), "initial DFTState u", group="loss")
    clip_eps: float = option(_default("clip_eps"), _hyperparameter("clip_eps"), "policy losses: the importance "
                             "ratio is clipped to [1 - clip_eps, 1 + clip_eps_high]", group="loss")
    clip_eps_high: float | None = option(None, _hyperparameter("clip_eps_high", optional=True), "policy losses: "
                                         "upper clip range (DAPO's clip-higher)",
                                         group="loss", default_text=_defaults_by_loss("clip_eps_high"))
    kl_beta: float | None = option(None, _hyperparameter("kl_beta", optional=True), "policy losses: weight of the "
                                   "k3 KL to the initial model (> 0 keeps a frozen copy of it to score the samples)",
                                   group="loss", default_text=_defaults_by_loss("kl_beta"))
    entropy_coef: float = option(_default("entropy_coef"), _hyperparameter("entropy_coef"), "policy losses: "
                                 "weight of the token-entropy bonus (negative: a penalty)", group="loss")
    accum_dtype: str = option("fp32", Choice(ACCUM_DTYPES), "LM-head weight gradient accumulated across the loss's "
                              "token chunks in fp32 (exact) or in the weight's dtype (less memory with bf16 weights: "
                              "what Liger/CCE do)", group="system")

    def __post_init__(self):
        validate(self)
        if self.loss not in POLICY_LOSS_NAMES:
            defaults = {"clip_eps": _default("clip_eps"), "clip_eps_high": None, "kl_beta": None,
                        "entropy_coef": _default("entropy_coef")}
            changed = [f"{name}={getattr(self, name)!r} (--{name.replace('_', '-')})" for name in _POLICY_OPTIONS
                       if getattr(self, name) != defaults[name]]
            if changed:
                raise ValueError(f"{', '.join(changed)}: only used by the policy losses {POLICY_LOSS_NAMES}, not "
                                 f"loss={self.loss!r}")

    @property
    def spec(self) -> LossSpec:
        return LOSS_SPECS.get(self.loss) or POLICY_LOSS_SPECS[self.loss]

    def policy_hparams(self) -> dict:
        """The policy loss's keyword arguments for :func:`dftkern.fused_policy_loss`: ``clip_eps``,
        ``clip_eps_high``, ``kl_beta``, ``entropy_coef`` (None = the registry's default for this loss) and
        the loss's ``aggregation``."""
        given = {name: getattr(self, name) for name in _POLICY_OPTIONS if getattr(self, name) is not None}
        hp = get_loss(self.loss).hyperparameters(**given)
        hp.pop("max_tokens")
        return hp

    def dft_hparams(self) -> tuple[float, float]:
        defaults = get_loss(self.loss).defaults
        tau = defaults["tau"] if self.tau is None else self.tau
        gamma = defaults["gamma"] if self.gamma is None else self.gamma
        return tau, gamma


def _select_rows(hidden: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None, rows: torch.Tensor,
                 valid_positions: torch.Tensor | None = None):
    """Rows ``rows`` (int64 ``[R']`` on the CPU, repeats allowed) of a padded or packed batch, as a new batch.

    Returns ``(hidden, labels, cu_seqlens, valid_positions)`` of the selection. The index arithmetic
    runs on the CPU (``cu_seqlens`` and ``valid_positions`` are host metadata, see
    :class:`~.batching.Batch`); only the gather indices go to the device. ``valid_positions`` of the
    selection is None when none were given.
    """
    rows = rows.cpu()
    if cu_seqlens is None:
        width = labels.shape[1]
        source = (rows[:, None] * width + torch.arange(width)).reshape(-1)  # new flat position -> old one
        index = rows.to(hidden.device, non_blocking=True)
        new_hidden, new_labels, new_cu = hidden.index_select(0, index), labels.index_select(0, index), None
    else:
        cu = cu_seqlens.cpu().to(torch.int64)
        starts, lengths = cu[rows], cu[rows + 1] - cu[rows]
        # token index: for each selected row, starts[i] .. starts[i] + lengths[i] - 1
        offsets = torch.repeat_interleave(starts - torch.cumsum(lengths, 0) + lengths, lengths)
        source = offsets + torch.arange(int(lengths.sum()))
        new_cu = torch.zeros(rows.numel() + 1, dtype=cu_seqlens.dtype)
        new_cu[1:] = torch.cumsum(lengths, 0)
        index = source.to(hidden.device, non_blocking=True)
        new_hidden, new_labels = hidden.index_select(0, index), labels.index_select(0, index)
    new_valid = None
    if valid_positions is not None:
        valid = torch.zeros(labels.numel(), dtype=torch.bool)
        valid[valid_positions.cpu()] = True
        new_valid = valid[source].nonzero().squeeze(1)
    return new_hidden, new_labels, new_cu, new_valid


def _pair_rows(num_examples: int, rows_per_example: int) -> torch.Tensor:
    """Row order ``[p, n1, p, n2, ..., p, nK]`` for every example (int64 ``[G * 2K]``, CPU)."""
    k = rows_per_example - 1
    base = torch.arange(num_examples)[:, None] * rows_per_example
    pairs = torch.stack([torch.zeros(k, dtype=torch.int64), torch.arange(1, k + 1)], dim=1).reshape(-1)
    return (base + pairs[None]).reshape(-1)


class Objective:
    """Callable ``(hidden, weight, bias, batch, *, softcap, state) -> (loss, stats)``.

    ``stats`` holds detached 0-d float tensors: ``pos_logp`` / ``neg_logp`` (mean sequence log-prob of the
    positives / negatives in the batch), and per family ``omega_mean``, ``omega_max``, ``u_mean``
    (DFT), ``margin_mean`` (pairwise), ``reward_mean`` (group: mean reward of the sampled rows);
    with ``positive_first=False`` ``sample_logp`` replaces ``pos_logp``/``neg_logp``. Policy losses:
    ``clip_fraction_low`` / ``clip_fraction_high`` (share of tokens whose lower / upper clip is
    active), ``ratio_mean``, ``entropy_mean``, ``kl_mean`` (k3 to the initial model; only when
    ``kl_beta > 0``, i.e. when the batch carries its per-token log-probs) and ``reward_mean``.

    Policy losses read ``batch.rewards [G, n]`` (group advantages by the registry's rule:
    :func:`~dftkern.losses.formulas.group_advantages` with ``scale`` "std" for ppo/grpo/dapo,
    "none" for dr_grpo), ``batch.old_logps`` (the sampler's per-token log-probs, labels' shape) and
    ``batch.ref_token_logps``; ``max_tokens`` is Dr. GRPO's constant normalizer (the longest
    possible response, the sampler's ``max_new_tokens``).
    """

    def __init__(self, config: ObjectiveConfig, *, positive_first: bool = True, max_tokens: int | None = None):
        """``positive_first=False``: rows are all samples (on-policy group losses), no good answer in row 0."""
        self.config = config
        self.spec = config.spec
        self.positive_first = positive_first
        self.max_tokens = max_tokens
        self.policy_hparams = config.policy_hparams() if self.spec.family == "policy" else None
        if self.policy_hparams is not None and self.policy_hparams["aggregation"] == "constant" and max_tokens is None:
            raise ValueError(f"loss {config.loss!r} normalizes by a constant number of tokens: pass max_tokens "
                             f"(the sampler's --sample-max-new-tokens)")

    @property
    def uses_reference(self) -> bool:
        """A policy loss with ``kl_beta > 0``: batches need the initial model's per-token log-probs."""
        return self.policy_hparams is not None and self.policy_hparams["kl_beta"] > 0

    @property
    def rows(self) -> list[int] | None:
        """Rows of each example the batches must contain (None = all)."""
        return [0] if self.spec.family == "sft" else None

    def __call__(self, hidden, weight, bias, batch: Batch, *, softcap=None, state=None):
        cfg, family = self.config, self.spec.family
        common = dict(bias=bias, softcap=softcap, return_stats=True, valid_positions=batch.valid_positions,
                      accum_dtype=cfg.accum_dtype)
        n, g = batch.rows_per_example, batch.num_examples
        if family == "policy":
            return self._policy(hidden, weight, batch, common)
        if family == "dft":
            ref = None
            if cfg.loss == "dft":
                ref = batch.ref_logps.view(g, n)[:, 1:]
            tau, gamma = cfg.dft_hparams()
            loss, stats = dftkern.fused_dft_loss(
                hidden, weight, batch.labels, num_negatives=n - 1, ids=batch.example_ids, state=state,
                ref_logps=ref, tau=tau, gamma=gamma, variant=cfg.loss, cu_seqlens=batch.cu_seqlens, **common)
            seq = stats["seq_logps"].view(g, n)
            weights = stats["weights"]
            return loss, {"pos_logp": seq[:, 0].mean(), "neg_logp": seq[:, 1:].mean(),
                          "omega_mean": weights.mean(), "omega_max": weights.max(),
                          "u_mean": stats["u"].mean(), "dft_skipped_groups": stats["skipped_groups"].float()}
        if family == "sft":
            loss, stats = dftkern.fused_preference_loss(hidden, weight, batch.labels, loss="sft",
                                                        cu_seqlens=batch.cu_seqlens, average=cfg.average, **common)
            return loss, {"pos_logp": stats["seq_logps"].mean()}
        if family == "pairwise":
            rows = _pair_rows(g, n)
            pair_hidden, pair_labels, pair_cu, pair_valid = _select_rows(hidden, batch.labels, batch.cu_seqlens, rows,
                                                                         batch.valid_positions)
            ref = batch.ref_logps.index_select(0, rows.to(batch.ref_logps.device)) if self.spec.needs_ref_logps \
                else None
            loss, stats = dftkern.fused_preference_loss(
                pair_hidden, weight, pair_labels, loss=cfg.loss, beta=cfg.beta, ref_logps=ref,
                average=cfg.average, simpo_gamma=cfg.simpo_gamma, unlikelihood_alpha=cfg.unlikelihood_alpha,
                cu_seqlens=pair_cu, **dict(common, valid_positions=pair_valid))
            seq = stats["seq_logps"].view(-1, 2)
            out = {"pos_logp": seq[:, 0].mean(), "neg_logp": seq[:, 1].mean()}
            if "margins" in stats:  # not for unlikelihood
                out["margin_mean"] = stats["margins"].mean()
            return loss, out
        loss, stats = dftkern.fused_preference_loss(
            hidden, weight, batch.labels, loss=cfg.loss, beta=cfg.beta, rewards=batch.rewards,
            average=cfg.average, baseline=cfg.baseline, cu_seqlens=batch.cu_seqlens, **common)
        seq = stats["seq_logps"].view(g, n)
        if not self.positive_first:
            return loss, {"sample_logp": seq.mean(), "reward_mean": batch.rewards.mean()}
        return loss, {"pos_logp": seq[:, 0].mean(), "neg_logp": seq[:, 1:].mean(),
                      "reward_mean": batch.rewards[:, 1:].mean()}

    def _policy(self, hidden, weight, batch: Batch, common: dict):
        hp = self.policy_hparams
        if batch.old_logps is None:
            raise ValueError(f"loss {self.config.loss!r} needs the sampler's per-token log-probs (batch.old_logps); "
                             f"they are recorded by on-policy sampling (--on-policy)")
        ref = batch.ref_token_logps if hp["kl_beta"] > 0 else None
        if hp["kl_beta"] > 0 and ref is None:
            raise ValueError(f"kl_beta={hp['kl_beta']} needs the initial model's per-token log-probs "
                             f"(batch.ref_token_logps)")
        advantages = group_advantages(batch.rewards, scale=get_loss(self.config.loss).advantage).reshape(-1)
        loss, stats = dftkern.fused_policy_loss(
            hidden, weight, batch.labels, advantages=advantages, old_logps=batch.old_logps, ref_logps=ref,
            max_tokens=self.max_tokens if hp["aggregation"] == "constant" else None, cu_seqlens=batch.cu_seqlens,
            **hp, **common)
        out = {key: stats[key] for key in ("clip_fraction_low", "clip_fraction_high", "ratio_mean", "entropy_mean")}
        if ref is not None:
            out["kl_mean"] = stats["kl_mean"]
        out["reward_mean"] = batch.rewards.mean()
        return loss, out
