"""Pieces shared by the TRL trainers: option checks, patching the models, metric reductions."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..transformers import patch_causal_lm

TESTED_TRL = "1.16"  # the TRL minor version these subclasses were checked against (private hooks they use)


def warn_if_untested_trl() -> None:
    import trl

    if not str(trl.__version__).startswith(TESTED_TRL + "."):
        warnings.warn(f"dftkern's TRL drop-ins were checked against TRL {TESTED_TRL}.x; this is TRL "
                      f"{trl.__version__}. They override TRL's loss methods, so check parity before trusting them "
                      "(tests/integrations/test_trl_*.py).", stacklevel=3)


@dataclass(frozen=True)
class FusedOptions:
    """How the fused trainers call dftkern.

    Attributes:
        logit_metrics: also log the metrics that need whole logit rows (``entropy``,
            ``mean_token_accuracy``, ``logits/chosen|rejected``) — one extra no-gradient pass over
            the completion tokens (2NHV). False skips them (all other metrics stay exact).
        chunk_bytes, backend: passed to dftkern.
    """

    logit_metrics: bool = True
    chunk_bytes: int | None = None
    backend: str = "auto"

    def kwargs(self) -> dict:
        return {"chunk_bytes": self.chunk_bytes, "backend": self.backend}


def patch_trainer_model(model) -> None:
    """Patch the Hugging Face model inside a trainer's model (PEFT / accelerate wrappers unwrapped)."""
    inner = getattr(model, "module", model)  # DDP / DataParallel
    patch_causal_lm(inner)


def refuse(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` when ``condition`` holds: an option the fused path does not cover."""
    if condition:
        raise ValueError(message)


def gathered_ratio(accelerator, numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    """``sum over ranks(numerator) / sum over ranks(denominator)`` as a float (0.0 when the count is 0)."""
    num = accelerator.gather_for_metrics(numerator.detach()).sum()
    den = accelerator.gather_for_metrics(denominator.detach()).sum()
    return (num / den).item() if den > 0 else 0.0


def gathered_mean(accelerator, values: torch.Tensor) -> float:
    """Mean over every rank's ``values`` (all-gathered), as a float."""
    return accelerator.gather(values.detach()).float().mean().item()
