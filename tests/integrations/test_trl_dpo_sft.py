"""FusedDPOTrainer / FusedSFTTrainer against TRL's own DPOTrainer / SFTTrainer (fp32, CPU).

Parity bar (issue 14): loss and every logged metric to 1e-5, gradients to 1e-4 — on one
``compute_loss`` and over a 3-step ``train()`` whose weights move (lr 1e-2).
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("trl", reason="TRL is not installed (pip install 'dftkern[trl]'); CI installs it")

from trl_parity import dpo_parity, preference_dataset, sft_parity, tiny_llama_and_tokenizer  # noqa: E402

DPO_METRICS = ["entropy", "logits/chosen", "logits/rejected", "logps/chosen", "logps/rejected",
               "mean_token_accuracy", "num_tokens", "rewards/accuracies", "rewards/chosen", "rewards/margins",
               "rewards/rejected"]


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,precompute", [("sigmoid", False), ("hinge", False), ("ipo", False),
                                                  ("sigmoid_norm", False), ("sigmoid", True)])
def test_dpo_parity(loss_type, precompute, tmp_path):
    diffs = dpo_parity(loss_type, precompute=precompute, out_dir=str(tmp_path))
    assert diffs["metric_names"] == DPO_METRICS
    assert diffs["loss"] <= 1e-5 and diffs["metrics"] <= 1e-5 and diffs["log"] <= 1e-5, diffs
    assert diffs["grads"] <= 1e-4, diffs


@pytest.mark.slow
def test_sft_parity(tmp_path):
    diffs = sft_parity(out_dir=str(tmp_path))
    assert diffs["metric_names"] == ["entropy", "mean_token_accuracy", "num_tokens"]
    assert diffs["loss"] <= 1e-5 and diffs["metrics"] <= 1e-5 and diffs["log"] <= 1e-5, diffs
    assert diffs["grads"] <= 1e-4, diffs


def _dpo(tmp_path, *, trainer_kwargs=None, **config):
    from trl import DPOConfig

    from dftkern.integrations.trl import FusedDPOTrainer

    model, tokenizer = tiny_llama_and_tokenizer()
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, bf16=False, report_to=[],
                     use_cpu=True, save_strategy="no", **config)
    return FusedDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                           train_dataset=preference_dataset(), processing_class=tokenizer, **(trainer_kwargs or {}))


@pytest.mark.parametrize("config,match", [
    ({"loss_type": ["robust"]}, "loss_type='robust' is not fused"),
    ({"loss_type": ["exo_pair"], "label_smoothing": 1e-3}, "loss_type='exo_pair' is not fused"),
    ({"loss_type": ["sigmoid", "sft"]}, "one loss_type at a time"),
    ({"f_divergence_type": "js_divergence"}, "f_divergence_type"),
    ({"ld_alpha": 0.5}, "ld_alpha"),
    ({"use_weighting": True}, "use_weighting"),
])
def test_dpo_refuses_what_it_does_not_fuse(tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        _dpo(tmp_path, **config)


def test_dpo_without_logit_metrics_logs_the_rest(tmp_path):
    trainer = _dpo(tmp_path, trainer_kwargs={"logit_metrics": False})
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.compute_loss(trainer.model, batch).backward()
    assert sorted(trainer._metrics["train"]) == [m for m in DPO_METRICS if m not in
                                                 ("entropy", "logits/chosen", "logits/rejected",
                                                  "mean_token_accuracy")]


def test_dpo_ipo_refuses_empty_prompt(tmp_path):
    trainer = _dpo(tmp_path, loss_type=["ipo"])
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    batch["completion_mask"][:, 0] = 1
    with pytest.raises(ValueError, match="empty prompt"):
        trainer.compute_loss(trainer.model, batch)


@pytest.mark.parametrize("config,match", [({"loss_type": "dft"}, "Dynamic Fine-Tuning"),
                                          ({"label_smoothing_factor": 0.1}, "label_smoothing_factor")])
def test_sft_refuses_what_it_does_not_fuse(tmp_path, config, match):
    from datasets import Dataset
    from trl import SFTConfig

    from dftkern.integrations.trl import FusedSFTTrainer

    model, tokenizer = tiny_llama_and_tokenizer()
    args = SFTConfig(output_dir=str(tmp_path), bf16=False, report_to=[], use_cpu=True, **config)
    with pytest.raises(ValueError, match=match):
        FusedSFTTrainer(model=model, args=args, processing_class=tokenizer,
                        train_dataset=Dataset.from_dict({"prompt": ["1+2="], "completion": ["3"]}))


@pytest.mark.slow
def test_dpo_peft_parity(tmp_path):
    """With a LoRA adapter and no reference model, the reference is the base model (adapter disabled)."""
    peft = pytest.importorskip("peft")
    import torch
    from trl import DPOConfig, DPOTrainer

    from dftkern.integrations.trl import FusedDPOTrainer

    base, tokenizer = tiny_llama_and_tokenizer()
    results = []
    for cls in (DPOTrainer, FusedDPOTrainer):
        args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, bf16=False,
                         report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-2, logging_steps=1, seed=0)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                 init_lora_weights=False)
        torch.manual_seed(0)
        trainer = cls(model=copy.deepcopy(base), args=args, train_dataset=preference_dataset(),
                      processing_class=tokenizer, peft_config=config)
        trainer.train()
        results.append([{k: v for k, v in h.items() if "runtime" not in k and "per_second" not in k
                         and k != "total_flos"} for h in trainer.state.log_history])
    assert results[0][0]["rewards/margins"] != 0.0  # the adapter starts non-zero: policy != reference
    for a, b in zip(*results):
        assert a.keys() == b.keys()
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-5, (key, a[key], b[key])
