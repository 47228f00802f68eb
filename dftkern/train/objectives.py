"""Training objectives: which rows a loss needs and how they are handed to dftkern's fused losses.

Every training example is one prompt with its rows: the good answer (row 0) and its K sampled
negatives (rows 1..K). Each loss sees them as follows:

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
=================================  =============================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import dftkern
from dftkern.losses.registry import HYPERPARAMETERS, LOSSES, get_loss

from .batching import Batch
from .options import AnyOf, Choice, Flag, Number, Spec, option, validate

__all__ = ["TRAINER_FAMILIES", "LOSS_NAMES", "LossSpec", "LOSS_SPECS", "ObjectiveConfig", "Objective"]

TRAINER_FAMILIES = ("sft", "pairwise", "group", "dft")
"""Loss families this trainer feeds (the token-level ``policy`` family needs per-token old log-probs)."""


@dataclass(frozen=True)
class LossSpec:
    """What a loss needs from the data, as the trainer reads it from :data:`dftkern.losses.registry.LOSSES`."""

    name: str
    family: str  # "dft" | "sft" | "pairwise" | "group"
    needs_negatives: bool
    needs_ref_logps: bool
    needs_rewards: bool
    min_rows_per_group: int = 1

    @classmethod
    def of(cls, name: str) -> LossSpec:
        """The trainer's view of registry entry ``name``."""
        spec = get_loss(name)
        return cls(spec.name, spec.family, spec.needs_negatives, spec.needs_ref, spec.needs_rewards,
                   spec.min_rows_per_group)


LOSS_SPECS = {name: LossSpec.of(name) for name, spec in LOSSES.items() if spec.family in TRAINER_FAMILIES}
LOSS_NAMES = tuple(LOSS_SPECS)


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
    return ", ".join(f"{spec.defaults[name]} ({loss})" for loss, spec in LOSSES.items()
                     if loss in LOSS_SPECS and name in spec.defaults)


@dataclass(frozen=True)
class ObjectiveConfig:
    """The loss and its hyper-parameters; ranges and defaults come from :mod:`dftkern.losses.registry`
    (``tau``/``gamma`` None: the variant's default, DFT 1.0 / 0.85, DFT2 0.3 / 0.9)."""

    loss: str = option("dft", Choice(LOSS_NAMES), "training objective")
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

    def __post_init__(self):
        validate(self)

    @property
    def spec(self) -> LossSpec:
        return LOSS_SPECS[self.loss]

    def dft_hparams(self) -> tuple[float, float]:
        defaults = get_loss(self.loss).defaults
        tau = defaults["tau"] if self.tau is None else self.tau
        gamma = defaults["gamma"] if self.gamma is None else self.gamma
        return tau, gamma


def _select_rows(hidden: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None,
                 rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Rows ``rows`` (int64 ``[R']``, repeats allowed) of a padded or packed batch, as a new batch."""
    if cu_seqlens is None:
        return hidden.index_select(0, rows), labels.index_select(0, rows), None
    cu = cu_seqlens.to(torch.int64)
    starts, lengths = cu[rows], cu[rows + 1] - cu[rows]
    # token index: for each selected row, starts[i] .. starts[i] + lengths[i] - 1
    offsets = torch.repeat_interleave(starts - torch.cumsum(lengths, 0) + lengths, lengths)
    token_index = offsets + torch.arange(int(lengths.sum()), device=cu.device)
    new_cu = torch.zeros(rows.numel() + 1, dtype=cu_seqlens.dtype, device=cu.device)
    new_cu[1:] = torch.cumsum(lengths, 0)
    return hidden.index_select(0, token_index), labels.index_select(0, token_index), new_cu


def _pair_rows(num_examples: int, rows_per_example: int, device) -> torch.Tensor:
    """Row order ``[p, n1, p, n2, ..., p, nK]`` for every example (int64 ``[G * 2K]``)."""
    k = rows_per_example - 1
    base = torch.arange(num_examples, device=device)[:, None] * rows_per_example
    pairs = torch.stack([torch.zeros(k, dtype=torch.int64, device=device),
                         torch.arange(1, k + 1, device=device)], dim=1).reshape(-1)
    return (base + pairs[None]).reshape(-1)


class Objective:
    """Callable ``(hidden, weight, bias, batch, *, softcap, state) -> (loss, stats)``.

    ``stats`` holds detached 0-d float tensors: ``pos_logp`` / ``neg_logp`` (mean sequence log-prob of the
    positives / negatives in the batch), and per family ``omega_mean``, ``omega_max``, ``u_mean``
    (DFT), ``margin_mean`` (pairwise), ``reward_mean`` (group: mean reward of the sampled rows);
    with ``positive_first=False`` ``sample_logp`` replaces ``pos_logp``/``neg_logp``.
    """

    def __init__(self, config: ObjectiveConfig, *, positive_first: bool = True):
        """``positive_first=False``: rows are all samples (on-policy group losses), no good answer in row 0."""
        self.config = config
        self.spec = config.spec
        self.positive_first = positive_first

    @property
    def rows(self) -> list[int] | None:
        """Rows of each example the batches must contain (None = all)."""
        return [0] if self.spec.family == "sft" else None

    def __call__(self, hidden, weight, bias, batch: Batch, *, softcap=None, state=None):
        cfg, family = self.config, self.spec.family
        common = dict(bias=bias, softcap=softcap, return_stats=True)
        n, g = batch.rows_per_example, batch.num_examples
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
            rows = _pair_rows(g, n, hidden.device)
            pair_hidden, pair_labels, pair_cu = _select_rows(hidden, batch.labels, batch.cu_seqlens, rows)
            ref = batch.ref_logps.index_select(0, rows.to(batch.ref_logps.device)) if self.spec.needs_ref_logps \
                else None
            loss, stats = dftkern.fused_preference_loss(
                pair_hidden, weight, pair_labels, loss=cfg.loss, beta=cfg.beta, ref_logps=ref,
                average=cfg.average, simpo_gamma=cfg.simpo_gamma, unlikelihood_alpha=cfg.unlikelihood_alpha,
                cu_seqlens=pair_cu, **common)
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
