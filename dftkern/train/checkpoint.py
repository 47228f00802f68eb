"""Checkpoints: written atomically, complete enough to resume bit-for-bit, read without unpickling.

Layout of ``<run_dir>/checkpoints/step-00000120/``:

* ``config.json``, ``model.safetensors`` (+ tokenizer files): a loadable Hugging Face model directory
  (``AutoModelForCausalLM.from_pretrained`` and every stage accept it as ``--model``);
* ``trainer_state.json`` + ``trainer_state.safetensors``: optimizer, LR scheduler, DFTState, data
  position (micro-batch counter), step, the RNG states of every rank (Python, NumPy, torch, CUDA),
  the example source's state (the on-policy window) and the training config, stored by
  :mod:`.serialization` as JSON plus tensors. Nothing is unpickled when a checkpoint is read, so a
  crafted checkpoint cannot run code; checkpoints of older versions (``trainer_state.pt``, a
  pickle) are refused with a message saying so.

A checkpoint is first written to ``checkpoints/.tmp-step-...`` and renamed into place when
complete, so a crash never leaves a half-written ``step-*`` directory. Leftover ``.tmp-*``/``.old-*``
directories of killed runs are removed by :func:`remove_stale_temporaries` when training starts.
:func:`check_checkpoint_files` opens every file of a checkpoint (JSON parsed, safetensors headers
and sizes checked) so that resuming can skip a damaged one (see :mod:`.trainer`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .serialization import StateFileError, load_state, save_state, state_files

__all__ = ["CheckpointError", "CheckpointWarning", "checkpoint_dir", "list_checkpoints", "checkpoint_candidates",
           "latest_checkpoint", "write_checkpoint", "read_trainer_state", "check_trainer_state", "check_checkpoint_files",
           "remove_stale_temporaries", "set_aside", "capture_rng_state", "restore_rng_state"]

TRAINER_STATE = "trainer_state"  # stem: trainer_state.json + trainer_state.safetensors
LEGACY_TRAINER_STATE = "trainer_state.pt"
_STEP_RE = re.compile(r"^step-(\d+)$")
_STALE_RE = re.compile(r"^\.(tmp|old)-step-")  # what an interrupted save leaves: .tmp-step-N-PID, .old-step-N-PID
_TRAINER_KEYS = ("step", "micro_batch", "optimizer", "scheduler", "rng", "source", "world_size", "dft_state", "config")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, truncated or foreign file); the message names the file."""


class CheckpointWarning(UserWarning):
    """Resuming skipped a damaged checkpoint and fell back to an older one."""


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def _step_dirs(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_RE.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run (those with a trainer state), oldest first."""
    json_name = state_files(TRAINER_STATE)[0].name
    return [path for _, path in _step_dirs(run_dir) if (path / json_name).is_file()]


def checkpoint_candidates(run_dir: str | os.PathLike) -> list[Path]:
    """Every ``step-*`` directory of a run, newest first (intact or not): what resuming tries, in order."""
    return [path for _, path in reversed(_step_dirs(run_dir))]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the ``.tmp-step-*``/``.old-step-*`` directories a killed save left behind; returns them.

    Call on one process, before any checkpoint of this run is written.
    """
    root = Path(run_dir) / "checkpoints"
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if _STALE_RE.match(path.name):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def set_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint to ``corrupt-step-N[-k]`` so resuming and pruning ignore it (kept for inspection)."""
    target = checkpoint.with_name(f"corrupt-{checkpoint.name}")
    k = 1
    while target.exists():
        k += 1
        target = checkpoint.with_name(f"corrupt-{checkpoint.name}-{k}")
    os.rename(checkpoint, target)
    return target


def capture_rng_state() -> dict:
    """Python, NumPy, torch CPU (and CUDA) generator states of this process (plain data and tensors)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, *, source: str | os.PathLike = "the checkpoint") -> None:
    """Restore what :func:`capture_rng_state` captured; a malformed state is a :class:`CheckpointError`."""
    try:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{source}: unusable RNG state ({type(err).__name__}: {err})") from None


def write_checkpoint(run_dir: str | os.PathLike, step: int, *, causal_lm, model_state: dict, tokenizer,
                     trainer_state: dict, keep_last: int | None = None) -> Path:
    """Write one checkpoint atomically (call on one process only) and prune old ones.

    Args:
        causal_lm: the Hugging Face model (its config and ``save_pretrained`` are used).
        model_state: the full state dict to save (from :func:`dftkern.train.distributed.full_model_state_dict`).
        trainer_state: everything else: plain data, tensors, numpy arrays and registered records
            (see :mod:`.serialization`), saved as ``trainer_state.json`` + ``trainer_state.safetensors``.
        keep_last: keep only this many newest checkpoints (None: keep all).
    """
    model_state = _without_tied_output_embedding(causal_lm, model_state)
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_state(tmp / TRAINER_STATE, trainer_state)  # first: an unstorable value fails before the model is written
        causal_lm.save_pretrained(str(tmp), state_dict=model_state)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
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
    """Load the trainer state of a checkpoint directory (tensors on CPU). Never unpickles.

    Raises:
        CheckpointError: the state files are missing, truncated or foreign, or the checkpoint is an
            older pickled ``trainer_state.pt`` (refused); the message names the file.
    """
    checkpoint = Path(checkpoint)
    json_path, _ = state_files(checkpoint / TRAINER_STATE)
    if not json_path.is_file():
        if (checkpoint / LEGACY_TRAINER_STATE).is_file():
            raise CheckpointError(f"{checkpoint / LEGACY_TRAINER_STATE}: a pickled trainer state (written by an older "
                                  f"dftkern); it is not loaded because unpickling a file can run arbitrary code. "
                                  f"Start a new run (the model weights in {checkpoint} are a normal --model "
                                  f"directory)")
        raise CheckpointError(f"{json_path}: missing ({checkpoint} is not a complete checkpoint)")
    try:
        state = load_state(checkpoint / TRAINER_STATE)
    except StateFileError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{json_path}: the trainer state must be a mapping, got {type(state).__name__}")
    return state


def check_trainer_state(state: dict, checkpoint: Path) -> None:
    """The structure the trainer relies on: all keys, one RNG and source state per rank, a consistent step."""
    json_path = state_files(checkpoint / TRAINER_STATE)[0]
    missing = [k for k in _TRAINER_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{json_path}: missing entries {missing}")
    world_size = state["world_size"]
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise CheckpointError(f"{json_path}: world_size must be an integer >= 1, got {world_size!r}")
    for key in ("rng", "source"):
        if not isinstance(state[key], list) or len(state[key]) != world_size:
            raise CheckpointError(f"{json_path}: '{key}' must hold one entry per process ({world_size})")
    match = _STEP_RE.match(checkpoint.name)
    if match and state["step"] != int(match.group(1)):
        raise CheckpointError(f"{json_path}: holds step {state['step']!r} but the directory is {checkpoint.name}")
    micro_batch = state["micro_batch"]
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 0:
        raise CheckpointError(f"{json_path}: 'micro_batch' must be an integer >= 0, got {micro_batch!r}")
    for key in ("optimizer", "scheduler", "config"):
        if not isinstance(state[key], dict):
            raise CheckpointError(f"{json_path}: '{key}' must be a mapping")


def check_checkpoint_files(checkpoint: str | os.PathLike) -> None:
    """Open every file of a checkpoint: JSON files must parse, safetensors files must have a valid
    header and exactly the size it announces (a truncated file fails), the model weights must exist.

    Raises:
        CheckpointError: naming the first bad or missing file.
    """
    from safetensors import SafetensorError, safe_open

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: not a directory")
    if (checkpoint / LEGACY_TRAINER_STATE).is_file() and not state_files(checkpoint / TRAINER_STATE)[0].is_file():
        read_trainer_state(checkpoint)  # raises the legacy-pickle message
    for name in ("config.json", *(p.name for p in state_files(checkpoint / TRAINER_STATE))):
        if not (checkpoint / name).is_file():
            raise CheckpointError(f"{checkpoint / name}: missing ({checkpoint} is not a complete checkpoint)")
    index = checkpoint / "model.safetensors.index.json"
    if not (checkpoint / "model.safetensors").is_file() and not index.is_file():
        raise CheckpointError(f"{checkpoint / 'model.safetensors'}: missing (no model weights in {checkpoint})")
    for path in sorted(checkpoint.iterdir()):
        if path.suffix == ".json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise CheckpointError(f"{path}: not valid JSON ({err}); the file is truncated or damaged") from None
        elif path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as handle:
                    handle.keys()
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None
    if index.is_file():
        shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        for shard in sorted(shards):
            if not (checkpoint / shard).is_file():
                raise CheckpointError(f"{checkpoint / shard}: missing (listed in {index.name})")

