"""Helpers shared by the vLLM tests (imported by name: their conftest puts this folder on sys.path).

The folder is not named ``vllm``: under pytest ``tests/`` is on sys.path, and a folder ``tests/vllm``
would be found by ``importlib.util.find_spec("vllm")`` as a namespace package, which makes libraries
that probe for vLLM (TRL's ``is_vllm_available``) believe it is installed and fail on its version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from dftkern.train.vllm_engine import vllm_import_error  # imports vllm only where it is installed

VLLM_MISSING = vllm_import_error()
needs_vllm = pytest.mark.skipif(VLLM_MISSING is not None,
                                reason=f"needs a working vLLM ({VLLM_MISSING}); CI runs these in .ci/vllm_step.sh")


@dataclass
class TinyModel:
    path: Path
    model: object        # the HF LlamaForCausalLM (float32, eval mode)
    tokenizer: object


def make_test_model(path: Path, *, seed: int = 0, gain: float = 4.0):
    """A 2-layer Llama (hidden 128, 2 heads -> head_dim 64, 15-token character vocabulary).

    The default init (std 0.02) makes a random model repeat one token forever, which would make
    "HF and vLLM agree" trivial; matrices drawn from N(0, gain^2 / fan_in) give varied
    continuations that end (EOS) at different lengths. Norm weights stay 1. Saved to ``path``.
    """
    import torch

    from dftkern.train import synthetic

    tokenizer = synthetic.build_char_tokenizer()
    model = synthetic.make_tiny_llama(tokenizer, hidden_size=128, num_layers=2, num_heads=2, max_positions=64,
                                      seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * gain / param.shape[-1] ** 0.5)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    model.eval()
    return model, tokenizer
