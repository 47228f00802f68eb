"""dftkern: exact, memory-lean token log-probs and the sequence losses built on them.

Layers (dependencies point down):
    dftkern.train / dftkern.experiments      reference trainer, bandit study
    dftkern.losses                           one registry of pure loss math: DFT/DFT2, DPO, ..., PPO/GRPO
    dftkern.grouped                          sequence ops, grouped sequence losses (layouts, group planning)
    dftkern.functional                       autograd Functions, public token ops (log-probs, entropy, CE, token losses)
    dftkern.chunking, dftkern.engines        the chunked schedule, compaction; Triton / PyTorch row engines
    dftkern.kernels                          pure Triton kernels
"""

from .functional import fused_linear_cross_entropy, fused_linear_logprobs, fused_token_loss
from .grouped import grouped_sequence_loss, sequence_logprobs
from .losses import DFTState, fused_dft_loss, fused_policy_loss, fused_preference_loss

__all__ = [
    "fused_linear_logprobs",
    "sequence_logprobs",
    "fused_dft_loss",
    "DFTState",
    "fused_preference_loss",
    "grouped_sequence_loss",
    "fused_linear_cross_entropy",
    "fused_token_loss",
    "fused_policy_loss",
]

__version__ = "0.1.0"
