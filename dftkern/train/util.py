"""Small helpers shared by the stages: dtypes, seeds, atomic writes, notices.

(``load_callable`` and ``exact_match`` live in :mod:`.rewards` now; they are re-exported here.)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from .rewards import exact_match, load_callable

__all__ = ["load_callable", "resolve_dtype", "derive_seed", "atomic_write_text", "atomic_write_json",
           "exact_match", "require_single_process", "note"]

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bfloat16 on a CUDA device that supports it, float32 otherwise."""
    if name not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {name!r}")
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def derive_seed(*parts) -> int:
    """A 63-bit seed determined by ``parts`` only (stable across processes and Python versions)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def require_single_process(stage: str) -> None:
    """The generate / ref-logps / eval stages run in one process; refuse a multi-rank launch."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(f"the {stage} stage runs in a single process; launch it with python, not torchrun "
                           f"(only 'train' is distributed)")


def note(message: str | None) -> None:
    """Print a one-line notice for the user on stderr (nothing for None)."""
    if message:
        print(f"dftkern.train: {message}", file=sys.stderr, flush=True)
