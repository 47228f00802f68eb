"""The TRL drop-ins with ``bf16=True`` — TRL 1.16's default for SFTConfig, DPOConfig and GRPOConfig.

The Trainer then runs the fp32 model under ``torch.autocast(bfloat16)``. dftkern's ops cast the
hidden states and the head to bfloat16 there (as autocast casts a linear layer) and keep fp32 logit
buffers; TRL's own path rounds the logits themselves to bfloat16. So the two agree to bf16 rounding,
not to the fp32 parity bar of test_trl_dpo_sft.py. Before the fix every fused trainer crashed here.
"""

from __future__ import annotations

import copy
import math

import pytest

pytest.importorskip("trl", reason="TRL is not installed (pip install 'dftkern[trl]'); CI installs it")

from trl_parity import PROMPTS, CHOSEN, grpo_parity, preference_dataset, tiny_llama_and_tokenizer  # noqa: E402


def _train_losses(cls, config_cls, tmp_path, *, ref_model: bool, dataset, steps: int = 3, **config):
    base, tokenizer = tiny_llama_and_tokenizer()
    args = config_cls(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=steps, bf16=True,
                      report_to=[], logging_steps=1, use_cpu=True, save_strategy="no", learning_rate=1e-2, seed=0,
                      **config)
    kwargs = {"ref_model": copy.deepcopy(base)} if ref_model else {}
    trainer = cls(model=copy.deepcopy(base), args=args, train_dataset=dataset, processing_class=tokenizer, **kwargs)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses), losses
    return losses


@pytest.mark.slow
def test_sft_bf16_autocast_trains_like_trl(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from dftkern.integrations.trl import FusedSFTTrainer

    data = Dataset.from_dict({"prompt": PROMPTS, "completion": CHOSEN})
    ours = _train_losses(FusedSFTTrainer, SFTConfig, tmp_path, ref_model=False, dataset=data)
    theirs = _train_losses(SFTTrainer, SFTConfig, tmp_path, ref_model=False, dataset=data)
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-2, (ours, theirs)


@pytest.mark.slow
def test_dpo_bf16_autocast_trains_like_trl(tmp_path):
    from trl import DPOConfig, DPOTrainer

    from dftkern.integrations.trl import FusedDPOTrainer

    ours = _train_losses(FusedDPOTrainer, DPOConfig, tmp_path, ref_model=True, dataset=preference_dataset(), beta=0.5)
    theirs = _train_losses(DPOTrainer, DPOConfig, tmp_path, ref_model=True, dataset=preference_dataset(), beta=0.5)
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-2, (ours, theirs)


@pytest.mark.slow
def test_grpo_bf16_autocast_first_batch_like_trl(tmp_path):
    diffs = grpo_parity("grpo", out_dir=str(tmp_path), beta=0.1, bf16=True, train_steps=0)
    assert diffs["loss"] <= 1e-3 and diffs["grads"] <= 1e-2, diffs


@pytest.mark.slow
def test_dft_trainer_bf16_autocast_close_to_fp32(tmp_path):
    from test_trl_dft import dft_dataset

    from dftkern.integrations.trl import DFTConfig, DFTTrainer

    bf16 = _train_losses(DFTTrainer, DFTConfig, tmp_path / "bf16", ref_model=False, dataset=dft_dataset(4), steps=2)
    base, tokenizer = tiny_llama_and_tokenizer()
    args = DFTConfig(output_dir=str(tmp_path / "fp32"), per_device_train_batch_size=2, max_steps=2, bf16=False,
                     report_to=[], logging_steps=1, use_cpu=True, save_strategy="no", learning_rate=1e-2, seed=0)
    trainer = DFTTrainer(model=base, args=args, train_dataset=dft_dataset(4), processing_class=tokenizer)
    trainer.train()
    fp32 = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert max(abs(a - b) for a, b in zip(bf16, fp32)) <= 5e-2, (bf16, fp32)
