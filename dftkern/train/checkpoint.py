"""Checkpoints: written atomically, complete enough to resume bit-for-bit.

Layout of ``<run_dir>/checkpoints/step-00000120/``:

* ``config.json``, ``model.safetensors`` (+ tokenizer files): a loadable Hugging Face model directory
  (``AutoModelForCausalLM.from_pretrained`` and every stage accept it as ``--model``);
* ``trainer_state.pt``: optimizer, LR scheduler, DFTState, data position (micro-batch counter),
  step, the RNG states of every rank, and the training config.

A checkpoint is first written to ``checkpoints/.tmp-step-...`` and renamed into place when
complete, so a crash never leaves a half-written ``step-*`` directory; resuming picks the newest
complete one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

__all__ = ["checkpoint_dir", "list_checkpoints", "latest_checkpoint", "write_checkpoint", "read_trainer_state",
           "capture_rng_state", "restore_rng_state"]

TRAINER_STATE = "trainer_state.pt"
_STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_RE.match(path.name)
        if match and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def capture_rng_state() -> dict:
    """Python, NumPy, torch CPU (and CUDA) generator states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(run_dir: str | os.PathLike, step: int, *, causal_lm, model_state: dict, tokenizer,
                     trainer_state: dict, keep_last: int | None = None) -> Path:
    """Write one checkpoint atomically (call on one process only) and prune old ones.

    Args:
        causal_lm: the Hugging Face model (its config and ``save_pretrained`` are used).
        model_state: the full state dict to save (from :func:`dftkern.train.distributed.full_model_state_dict`).
        trainer_state: everything else (saved with ``torch.save`` as ``trainer_state.pt``).
        keep_last: keep only this many newest checkpoints (None: keep all).
    """
    model_state = _without_tied_output_embedding(causal_lm, model_state)
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        causal_lm.save_pretrained(str(tmp), state_dict=model_state)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        torch.save(trainer_state, tmp / TRAINER_STATE)
        if final.exists():  # re-saving a step (e.g. after resuming from it): swap atomically-ish
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None and keep_last > 0:
        for stale in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _without_tied_output_embedding(causal_lm, state: dict) -> dict:
    """Drop the LM-head weight when it is tied to the input embedding (HF re-ties it on load).

    ``save_pretrained`` does this itself for a plain model, but an FSDP2 full state dict lists the
    shared tensor under both names.
    """
    if not getattr(causal_lm.config, "tie_word_embeddings", False):
        return state
    head = causal_lm.get_output_embeddings()
    for name, module in causal_lm.named_modules():
        if module is head:
            key = f"{name}.weight" if name else "weight"
            if key in state:
                state = {k: v for k, v in state.items() if k != key}
            break
    return state


def read_trainer_state(checkpoint: str | os.PathLike) -> dict:
    """Load ``trainer_state.pt`` of a checkpoint directory (on CPU)."""
    path = Path(checkpoint) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (no {TRAINER_STATE})")
    return torch.load(path, map_location="cpu", weights_only=False)
