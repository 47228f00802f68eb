"""Helpers shared by the trainer tests (imported by name: tests/train is on sys.path under pytest)."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def subprocess_env() -> dict:
    """Environment for child processes: the repo importable, quiet progress bars, no GPU."""
    env = dict(os.environ)
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + inherited)
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = "1"
    return env


def starts_with_one(prompt: str, response: str, reference: str) -> float:
    """A reward a random tiny model can learn in a few dozen steps (on-policy tests)."""
    return 1.0 if response.startswith("1") else 0.0


def small_run(workspace, out, **overrides):
    """A TrainConfig for a few quick offline steps on the test workspace (CPU, no plot, no bars);
    ``overrides`` replace any setting."""
    from dftkern.train.trainer import TrainConfig

    base = dict(model=str(workspace.model), data=str(workspace.data), negatives=str(workspace.negatives),
                out=str(out), loss="dft", batch_size=4, max_steps=3, lr=1e-3, device="cpu", progress=False,
                plot=False)
    return TrainConfig(**{**base, **overrides})
