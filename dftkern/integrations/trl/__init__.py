"""dftkern on TRL: a Discriminative Fine-Tuning trainer and fused drop-ins for TRL's own trainers.

* :class:`DFTTrainer` / :class:`DFTConfig` — DFT and DFT2 (Guo et al. 2025) on TRL's dataset
  conventions: columns ``prompt``, ``chosen`` (the good answer) and ``rejected`` (a list of K
  answers sampled from the base model), plain text or conversational. Not TRL's
  ``SFTConfig(loss_type="dft")``, which is *Dynamic* Fine-Tuning (arXiv 2508.05629), another method.
* :class:`FusedDPOTrainer` — ``trl.DPOTrainer`` whose loss (``loss_type`` sigmoid, hinge, ipo,
  sigmoid_norm) is :func:`dftkern.fused_preference_loss`: gradients computed in the forward.
* :class:`FusedSFTTrainer` — ``trl.SFTTrainer`` (``loss_type="nll"``) whose loss is
  :func:`dftkern.fused_linear_cross_entropy`.
* :class:`FusedGRPOTrainer` — ``trl.GRPOTrainer`` (``loss_type`` grpo, bnpo, dr_grpo, dapo, luspo,
  cispo, sapo at token level) whose loss is TRL's, term by term, on :func:`dftkern.fused_token_loss`.
* :class:`FusedRLOOTrainer` — ``trl.RLOOTrainer`` whose sequence-level PPO-clip loss runs on
  :func:`dftkern.grouped_sequence_loss`.

Checked against TRL 1.16 (see ``docs/integrations.md``). Needs ``pip install "dftkern[trl]"``.
"""

from __future__ import annotations

try:
    import trl as _trl  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("dftkern.integrations.trl needs TRL; install the extra: pip install 'dftkern[trl]'") from exc

from .dft import DFTConfig, DFTTrainer
from .dpo import FUSED_DPO_LOSS_TYPES, FusedDPOTrainer
from .grpo import FUSED_GRPO_LOSS_TYPES, FusedGRPOTrainer
from .rloo import FusedRLOOTrainer
from .sft import FusedSFTTrainer

__all__ = ["DFTConfig", "DFTTrainer", "FusedDPOTrainer", "FusedSFTTrainer", "FusedGRPOTrainer", "FusedRLOOTrainer",
           "FUSED_DPO_LOSS_TYPES", "FUSED_GRPO_LOSS_TYPES"]
