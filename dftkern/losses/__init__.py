"""Sequence losses: small math on per-row sequence log-probs from :mod:`dftkern.functional`."""

from .dft import DFT_DEFAULTS, fused_dft_loss
from .preference import PREFERENCE_LOSSES, fused_preference_loss
from .state import DFTState

__all__ = ["fused_dft_loss", "DFTState", "DFT_DEFAULTS", "fused_preference_loss", "PREFERENCE_LOSSES"]
