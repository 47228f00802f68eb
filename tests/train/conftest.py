"""Fixtures for the reference-trainer tests: a tiny model, synthetic data, negatives, reference cache.

Everything is built once per session from scratch (no downloads): a character tokenizer, a
2-layer Llama with hidden size 32, 2-digit addition data, K=2 sampled negatives with rewards, and
the reference log-prob cache of the base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

import transformers
from train_helpers import write_jsonl

transformers.utils.logging.disable_progress_bar()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The models here are tiny: one intra-op thread is faster than two, and far faster on a busy
    machine (a descheduled OpenMP worker stalls every small op). Restored after each test."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass
class Workspace:
    root: Path
    model: Path          # base model + tokenizer directory
    data: Path           # 24 training records
    heldout: Path        # 8 held-out records
    negatives: Path      # K=2 samples per training prompt, with rewards
    ref_cache: Path      # reference log-probs of the base model for (data, negatives)
    num_negatives: int = 2


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    from dftkern.train import synthetic
    from dftkern.train.generate import GenerateConfig, generate_samples
    from dftkern.train.ref_logps import RefLogpsConfig, compute_ref_logps

    root = tmp_path_factory.mktemp("train_ws")
    records = synthetic.make_addition_records(32, max_digits=2, seed=3, id_prefix="ex")
    data = write_jsonl(root / "train.jsonl", records[:24])
    heldout = write_jsonl(root / "heldout.jsonl", records[24:])
    tokenizer = synthetic.build_char_tokenizer()
    synthetic.make_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_positions=32, seed=0,
                              save_dir=root / "base")
    negatives = generate_samples(GenerateConfig(
        model=str(root / "base"), data=str(data), out=str(root / "negatives.jsonl"), num_samples=2,
        max_new_tokens=5, reward="dftkern.train.synthetic:addition_reward", device="cpu", progress=False))
    ref_cache = compute_ref_logps(RefLogpsConfig(model=str(root / "base"), data=str(data), negatives=str(negatives),
                                                 device="cpu", progress=False))
    return Workspace(root, root / "base", data, heldout, negatives, ref_cache)


@pytest.fixture(scope="session")
def tokenizer(workspace):
    from dftkern.train.model import load_tokenizer

    return load_tokenizer(str(workspace.model))
