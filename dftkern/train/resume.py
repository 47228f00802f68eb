"""Choosing the checkpoint to resume from: the newest intact one, checked completely before use.

A checkpoint is used only if every file opens (:func:`~.checkpoint.check_checkpoint_files`), the
trainer state decodes and has the expected structure, the settings that fix the data order match
the run's (:data:`RESUME_KEYS`, the number of processes), the weights load with exactly the shapes
of the model's config, and every optimizer moment has its parameter's shape. With
``resume="auto"`` a damaged checkpoint (a :class:`~.checkpoint.CheckpointError`) is skipped for the
next older one; once all processes agree, each skipped one is renamed ``corrupt-step-N`` and a
:class:`~.checkpoint.CheckpointWarning` names its bad file. Different settings are an error, not a
reason to fall back (an older checkpoint of the same run would not help).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import (
    CheckpointError,
    CheckpointWarning,
    check_checkpoint_files,
    check_trainer_state,
    checkpoint_candidates,
    read_trainer_state,
    set_aside,
)
from .distributed import DistContext

__all__ = ["RESUME_KEYS", "ResumePoint", "load_resume_point"]

RESUME_KEYS = ("loss", "batch_size", "grad_accum", "seed", "shuffle", "num_negatives", "max_length", "overlong",
               "on_policy", "samples_per_prompt", "refresh_every", "offline_mix", "ppo_epochs", "kl_beta")
"""Settings (flat option names) that decide the data order and the rows of every batch (``ppo_epochs``: which
micro-batches a step reads; ``kl_beta``: whether the saved window holds the reference's per-token log-probs)."""


@dataclass
class ResumePoint:
    """A checkpoint that passed every check, with its trainer state, tokenizer and model already loaded."""

    checkpoint: Path
    state: dict
    tokenizer: object
    causal_lm: torch.nn.Module


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _candidates(resume: str | None, run_dir: Path) -> tuple[list[Path], bool]:
    """The checkpoints to try, newest first, and whether a damaged one may be skipped for an older one."""
    if resume is None:
        return [], False
    if resume == "auto":
        return checkpoint_candidates(run_dir), True
    path = Path(resume)
    if not ((path / "trainer_state.json").is_file() or (path / "trainer_state.pt").is_file()):
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint directory (no trainer_state.json)")
    return [path], False


def _check_same_settings(saved: dict, settings: dict, world_size: int, checkpoint: Path) -> None:
    if saved["world_size"] != world_size:
        raise ValueError(f"{checkpoint} was written by {saved['world_size']} process(es); resume with the "
                         f"same number (this run has {world_size}) to continue the same data order")
    changed = [f"{key}={saved['config'][key]!r} (now {settings[key]!r})" for key in RESUME_KEYS
               if key in saved["config"] and saved["config"][key] != settings[key]]
    if changed:
        raise ValueError(f"{checkpoint} was written with {', '.join(changed)}; resume with the same settings, "
                         f"or train into a new --out")


def _check_optimizer_shapes(optimizer_state: dict, causal_lm: torch.nn.Module, ordered: list, checkpoint: Path) -> None:
    """Every optimizer moment must have its parameter's shape (keys: positions in ``ordered``, or
    parameter names under FSDP2)."""
    named = dict(causal_lm.named_parameters())
    where = checkpoint / "trainer_state.safetensors"
    entries = optimizer_state.get("state")
    if not isinstance(entries, dict):
        raise CheckpointError(f"{where}: the optimizer state has no 'state' mapping")
    for key, entry in entries.items():
        if isinstance(key, int) and not isinstance(key, bool):
            param = ordered[key] if 0 <= key < len(ordered) else None
        else:
            param = named.get(str(key).removeprefix("causal_lm."))
        if param is None or not isinstance(entry, dict):
            raise CheckpointError(f"{where}: optimizer state for parameter {key!r}, which the model does not have")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != param.shape:
                raise CheckpointError(f"{where}: optimizer '{name}' of parameter {key!r} has shape "
                                      f"{tuple(value.shape)}, the parameter {tuple(param.shape)}")


def _open(checkpoint: Path, settings: dict, world_size: int, load: Callable, param_order: Callable) -> ResumePoint:
    """Check one checkpoint completely and load it (a damaged one raises :class:`CheckpointError`)."""
    check_checkpoint_files(checkpoint)
    state = read_trainer_state(checkpoint)
    check_trainer_state(state, checkpoint)
    _check_same_settings(state, settings, world_size, checkpoint)
    try:
        tokenizer, causal_lm = load(str(checkpoint))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # anything the loaders raise on a damaged directory
        raise CheckpointError(f"{checkpoint}: cannot load the model ({type(err).__name__}: {_one_line(err)})") from None
    _check_optimizer_shapes(state["optimizer"], causal_lm, param_order(causal_lm), checkpoint)
    return ResumePoint(checkpoint, state, tokenizer, causal_lm)


def load_resume_point(resume: str | None, run_dir: Path, ctx: DistContext, *, settings: dict,
                      load: Callable[[str], tuple], param_order: Callable) -> ResumePoint | None:
    """The checkpoint to resume from (None: start fresh); see the module docstring.

    Args:
        resume: None, ``"auto"`` (the newest intact checkpoint in ``run_dir``) or a checkpoint path
            (which must be intact).
        settings: the run's options by flat name (compared on :data:`RESUME_KEYS`).
        load: ``checkpoint dir -> (tokenizer, causal LM)``, loading the weights strictly.
        param_order: ``causal LM -> parameters`` in the optimizer's order (its state keys are positions).
    Raises:
        CheckpointError: an explicit checkpoint is damaged, or no checkpoint is intact (one line
            listing why each was rejected).
        ValueError: the checkpoint was written with other settings.
    """
    candidates, may_fall_back = _candidates(resume, run_dir)
    skipped: list[tuple[Path, CheckpointError]] = []
    point = None
    for checkpoint in candidates:
        try:
            point = _open(checkpoint, settings, ctx.world_size, load, param_order)
            break
        except CheckpointError as err:
            if not may_fall_back:
                raise
            skipped.append((checkpoint, err))
    if point is None and skipped:
        reasons = "; ".join(f"{path.name}: {_one_line(err)}" for path, err in skipped)
        raise CheckpointError(f"resume: no intact checkpoint in {run_dir / 'checkpoints'} ({reasons})")
    step = point.state["step"] if point else 0
    if ctx.distributed and ctx.sum(step) != step * ctx.world_size:
        raise RuntimeError("resume: the processes found different newest intact checkpoints (is the run "
                           "directory on a shared file system?)")
    if ctx.is_main:
        for checkpoint, err in skipped:
            moved = set_aside(checkpoint)
            warnings.warn(f"resume: checkpoint {checkpoint} is damaged ({_one_line(err)}); renamed it to "
                          f"{moved.name} and resumed from {point.checkpoint}", CheckpointWarning, stacklevel=3)
    ctx.barrier()
    return point
