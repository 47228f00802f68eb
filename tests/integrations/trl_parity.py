"""Parity of dftkern's TRL drop-ins with TRL's own trainers (shared by the tests and a report).

Each function builds the same tiny random-init Llama twice (char tokenizer from
``dftkern.train.synthetic``, hidden 32, 2 layers, fp32, CPU), runs TRL's trainer and the dftkern
one on the same data, and returns the largest absolute differences:

* ``loss``, ``metrics`` and ``grads`` of one ``compute_loss`` + ``backward`` on the first batch;
* ``log`` — every logged number of a 3-step ``train()`` (lr 1e-2, so the weights move).

``tests/integrations/parity_report.py`` prints these numbers as the tables in docs/integrations.md.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

_UNTIMED = ("runtime", "per_second", "epoch", "step", "total_flos")
PROMPTS = ["1+2=", "3+4=", "10+5=", "7+7=", "12+30=", "9+1="]
CHOSEN = ["3", "7", "15", "14", "42", "10"]
REJECTED = ["4", "8", "51", "41", "24", "1"]


def tiny_llama_and_tokenizer(seed: int = 0):
    from dftkern.train.synthetic import build_char_tokenizer, make_tiny_llama

    tokenizer = build_char_tokenizer()
    model = make_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=seed)
    return model, tokenizer


def _max_metric_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), f"metric names differ: {sorted(set(a) ^ set(b))}"
    return max((abs(float(a[k]) - float(b[k])) for k in a), default=0.0)


def _first_batch_diffs(trainers) -> dict:
    results = []
    for trainer in trainers:
        trainer.model.train()
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        metrics = {k: sum(v) / len(v) for k, v in trainer._metrics["train"].items()}
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        trainer._metrics["train"].clear()
        results.append((loss.detach(), metrics, grads))
    (la, ma, ga), (lb, mb, gb) = results
    assert ga.keys() == gb.keys() and ga
    return {"loss": abs(la - lb).item(), "metrics": _max_metric_diff(ma, mb),
            "grads": max((ga[n] - gb[n]).abs().max().item() for n in ga), "metric_names": sorted(mb)}


def _log_diff(history_a: list[dict], history_b: list[dict]) -> float:
    assert len(history_a) == len(history_b)
    worst = 0.0
    for a, b in zip(history_a, history_b):
        a = {k: v for k, v in a.items() if not any(s in k for s in _UNTIMED)}
        b = {k: v for k, v in b.items() if not any(s in k for s in _UNTIMED)}
        worst = max(worst, _max_metric_diff(a, b))
    return worst


def _compare(make, trl_cls, fused_cls) -> dict:
    """``make(cls, max_steps)`` builds a trainer; first-batch diffs plus the diff of 3-step train logs."""
    diffs = _first_batch_diffs([make(trl_cls, 1), make(fused_cls, 1)])
    histories = []
    for cls in (trl_cls, fused_cls):
        trainer = make(cls, 3)
        trainer.train()
        histories.append(trainer.state.log_history)
    diffs["log"] = _log_diff(*histories)
    return diffs


def preference_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})


def dpo_parity(loss_type: str, *, precompute: bool = False, out_dir: str = "/tmp/dftkern-dpo-parity") -> dict:
    from trl import DPOConfig, DPOTrainer

    from dftkern.integrations.trl import FusedDPOTrainer

    base, tokenizer = tiny_llama_and_tokenizer()

    def make(cls, max_steps):
        args = DPOConfig(output_dir=out_dir, per_device_train_batch_size=2, max_steps=max_steps, bf16=False,
                         report_to=[], logging_steps=1, use_cpu=True, save_strategy="no", learning_rate=1e-2,
                         loss_type=[loss_type], precompute_ref_log_probs=precompute, seed=0, beta=0.5)
        return cls(model=copy.deepcopy(base), ref_model=copy.deepcopy(base), args=args,
                   train_dataset=preference_dataset(), processing_class=tokenizer)

    return _compare(make, DPOTrainer, FusedDPOTrainer)


def sft_parity(*, out_dir: str = "/tmp/dftkern-sft-parity") -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from dftkern.integrations.trl import FusedSFTTrainer

    base, tokenizer = tiny_llama_and_tokenizer()
    data = Dataset.from_dict({"prompt": PROMPTS, "completion": CHOSEN})

    def make(cls, max_steps):
        args = SFTConfig(output_dir=out_dir, per_device_train_batch_size=2, max_steps=max_steps, bf16=False,
                         report_to=[], logging_steps=1, use_cpu=True, save_strategy="no", learning_rate=1e-2,
                         seed=0, gradient_accumulation_steps=2)
        return cls(model=copy.deepcopy(base), args=args, train_dataset=data, processing_class=tokenizer)

    return _compare(make, SFTTrainer, FusedSFTTrainer)
