"""Losses: pure loss math (:mod:`.formulas`), one registry (:mod:`.registry`) and the fused entry points.

* :func:`fused_preference_loss` — sft, DPO, IPO, hinge, SimPO, unlikelihood, RWR, REINFORCE, RLOO
* :func:`fused_dft_loss` with :class:`DFTState` — DFT / DFT2
* :func:`fused_policy_loss` — PPO-clip / GRPO / DAPO / Dr. GRPO (token level)
"""

from .dft import DFT_DEFAULTS, fused_dft_loss
from .policy import fused_policy_loss
from .preference import PREFERENCE_LOSSES, fused_preference_loss
from .registry import LOSSES, LossSpec, get_loss, loss_names
from .state import DFTState

__all__ = ["fused_dft_loss", "DFTState", "DFT_DEFAULTS", "fused_preference_loss", "PREFERENCE_LOSSES",
           "fused_policy_loss", "LossSpec", "LOSSES", "get_loss", "loss_names"]
