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


def _loss_metrics_grads(trainer, batch: dict, *, training: bool = True):
    """``compute_loss`` (+ backward when training) of ``trainer`` on ``batch``: (loss, mean metrics, grads)."""
    mode = "train" if training else "eval"
    trainer.model.train(training)
    trainer._metrics[mode].clear()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    if training:
        loss.backward()
    metrics = {k: sum(v) / len(v) for k, v in trainer._metrics[mode].items()}
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer._metrics[mode].clear()
    return loss.detach(), metrics, grads


def _pair_diffs(results) -> dict:
    """Largest differences between TRL's (first) and the fused trainer's (second) loss, metrics and grads."""
    (la, ma, ga), (lb, mb, gb) = results
    assert ga.keys() == gb.keys()
    return {"loss": abs(la - lb).item(), "metrics": _max_metric_diff(ma, mb),
            "grads": max(((ga[n] - gb[n]).abs().max().item() for n in ga), default=0.0),
            "metric_names": sorted(mb), "loss_value": la.item(), "metric_values": ma}


def _first_batch_diffs(trainers) -> dict:
    results = []
    for trainer in trainers:
        trainer.model.train()
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        results.append(_loss_metrics_grads(trainer, batch))
    assert results[0][2], "no gradient"
    return _pair_diffs(results)


def _log_diff(history_a: list[dict], history_b: list[dict], skip: tuple[str, ...] = ()) -> float:
    """Largest difference between two ``log_history`` lists over every logged number (timings and ``skip`` aside)."""
    assert len(history_a) == len(history_b)
    worst = 0.0
    for a, b in zip(history_a, history_b):
        a = {k: v for k, v in a.items() if not any(s in k for s in _UNTIMED) and k not in skip}
        b = {k: v for k, v in b.items() if not any(s in k for s in _UNTIMED) and k not in skip}
        worst = max(worst, _max_metric_diff(a, b))
    return worst


def _compare(make, trl_cls, fused_cls) -> dict:
    """``make(cls, max_steps)`` builds a trainer; first-batch diffs plus the diff of 3-step train logs."""
    diffs = _first_batch_diffs([make(trl_cls, 1), make(fused_cls, 1)])
    diffs["log"] = _train_logs(make, (trl_cls, fused_cls), 3)[0]
    return diffs


def _train_logs(make, classes, train_steps: int) -> tuple[float, list[list[dict]]]:
    """Train a fresh trainer of each class for ``train_steps``; (largest log difference, both logs)."""
    histories = []
    for cls in classes:
        trainer = make(cls, train_steps)
        trainer.train()
        histories.append(trainer.state.log_history)
    return _log_diff(*histories), histories


def _rl_train_diffs(make, classes, train_steps: int) -> dict:
    """``log``: every logged number but ``grad_norm``; ``log_grad_norm``: ``grad_norm`` (a norm of the gradients,
    held to the gradient bar)."""
    _, histories = _train_logs(make, classes, train_steps)
    grad_norms = [[{"grad_norm": h["grad_norm"]} for h in hist if "grad_norm" in h] for hist in histories]
    return {"log": _log_diff(*histories, skip=("grad_norm",)), "log_grad_norm": _log_diff(*grad_norms),
            "log_history": histories[0]}


def preference_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})


def dpo_parity(loss_type: str, *, precompute: bool = False, out_dir: str = "/tmp/dftkern-dpo-parity",
               **config) -> dict:
    """FusedDPOTrainer vs DPOTrainer (fp32 unless ``config`` says otherwise, e.g. ``bf16=True``)."""
    from trl import DPOConfig, DPOTrainer

    from dftkern.integrations.trl import FusedDPOTrainer

    base, tokenizer = tiny_llama_and_tokenizer()

    def make(cls, max_steps):
        args = DPOConfig(**{**dict(output_dir=out_dir, per_device_train_batch_size=2, max_steps=max_steps, bf16=False,
                                   report_to=[], logging_steps=1, use_cpu=True, save_strategy="no", learning_rate=1e-2,
                                   loss_type=[loss_type], precompute_ref_log_probs=precompute, seed=0, beta=0.5),
                            **config})
        return cls(model=copy.deepcopy(base), ref_model=copy.deepcopy(base), args=args,
                   train_dataset=preference_dataset(), processing_class=tokenizer)

    return _compare(make, DPOTrainer, FusedDPOTrainer)


def sft_parity(*, out_dir: str = "/tmp/dftkern-sft-parity", **config) -> dict:
    """FusedSFTTrainer vs SFTTrainer (fp32 unless ``config`` says otherwise, e.g. ``bf16=True``)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from dftkern.integrations.trl import FusedSFTTrainer

    base, tokenizer = tiny_llama_and_tokenizer()
    data = Dataset.from_dict({"prompt": PROMPTS, "completion": CHOSEN})

    def make(cls, max_steps):
        args = SFTConfig(**{**dict(output_dir=out_dir, per_device_train_batch_size=2, max_steps=max_steps, bf16=False,
                                   report_to=[], logging_steps=1, use_cpu=True, save_strategy="no", learning_rate=1e-2,
                                   seed=0, gradient_accumulation_steps=2), **config})
        return cls(model=copy.deepcopy(base), args=args, train_dataset=data, processing_class=tokenizer)

    return _compare(make, SFTTrainer, FusedSFTTrainer)


# -- on-policy trainers (GRPO, RLOO): TRL's own generation on CPU, a trivial reward ----------------
RL_PROMPTS = ["1+2=", "3+4=", "10+5=", "7+7=", "12+30=", "9+1=", "5+5=", "2+8="]


def length_reward(completions, **kwargs):
    """A trivial reward: the completion's length in characters (varies within a group, so A != 0)."""
    return [float(len(c)) for c in completions]


def saved_tiny_llama(directory) -> str:
    """The tiny Llama and its tokenizer saved under ``directory``; TRL builds the reference model from a path."""
    from pathlib import Path

    path = Path(directory) / "tiny-llama"
    if not (path / "config.json").exists():
        model, tokenizer = tiny_llama_and_tokenizer()
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


def _rl_make(config_cls, out_dir: str, steps_config: dict, config: dict, trainer_kwargs: dict | None = None):
    """``make(cls, max_steps)``: a GRPO/RLOO-style trainer on the saved tiny Llama, 8 prompts x 2 completions of
    at most 6 tokens, lr 5e-2, clip epsilon 0.05 (so that updates leave the clip range)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    model_path = saved_tiny_llama(out_dir)
    data = Dataset.from_dict({"prompt": RL_PROMPTS})

    def make(cls, max_steps):
        settings = dict(output_dir=out_dir, per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
                        max_steps=max_steps, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                        bf16=False, seed=0, learning_rate=5e-2, gradient_checkpointing=False, epsilon=0.05)
        settings.update(steps_config)
        settings.update(config)
        torch.manual_seed(0)  # anything random before TRL seeds (a PEFT adapter's init) is the same for both
        return cls(model=model_path, reward_funcs=length_reward, args=config_cls(**settings), train_dataset=data,
                   processing_class=AutoTokenizer.from_pretrained(model_path), **(trainer_kwargs or {}))

    return make


def _perturbed(trainer, batch: dict, keys: tuple[str, ...], seed: int = 0) -> dict:
    """``batch`` with the named per-token log-prob inputs set to the current log-probs plus N(0, 0.3) noise, so
    that ratios fall on both sides of the clip range and the KL is non-zero."""
    if not keys:
        return dict(batch)
    prompt_ids, completion_ids = batch["prompt_ids"], batch["completion_ids"]
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1), completion_ids.size(1))
    gen = torch.Generator().manual_seed(seed)
    out = dict(batch)
    for key in keys:
        noisy = (logps + 0.3 * torch.randn(logps.shape, generator=gen)) * batch["completion_mask"]
        out[key] = noisy if key != "old_logps" else noisy.sum(1)
    return out


def _policy_first_batch(make, trl_cls, fused_cls, perturb: tuple[str, ...], extra=None, before_loss=None,
                        training: bool = True) -> dict:
    """One ``compute_loss`` (+ backward) of each trainer on the *same* batch (generated once, by TRL's trainer).

    ``extra(batch) -> dict`` entries are added to the batch; ``before_loss(trainer)`` runs on both trainers after
    the generation (e.g. to switch on an option generation must not see); ``training=False``
    computes the loss in evaluation mode (no backward).
    """
    trainers = [make(trl_cls, 1), make(fused_cls, 1)]
    for trainer in trainers:
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    batch = trainers[0]._prepare_inputs(next(iter(trainers[0].get_train_dataloader())))
    batch = _perturbed(trainers[0], batch, perturb)
    if extra is not None:
        batch.update(extra(batch))
    results = []
    for trainer in trainers:
        if before_loss is not None:
            before_loss(trainer)
        results.append(_loss_metrics_grads(trainer, dict(batch), training=training))
    assert results[0][2] or not training, "no gradient"
    return _pair_diffs(results)


# the default schedule of the parity runs: two updates per generated batch (the second has ratios != 1),
# gradient accumulation 2 (steps_per_generation 2)
RL_SCHEDULE = {"num_iterations": 2, "gradient_accumulation_steps": 2}


def grpo_parity(loss_type: str, *, out_dir: str = "/tmp/dftkern-grpo-parity", train_steps: int = 3,
                schedule: dict | None = None, perturb: bool = True, **first_batch) -> dict:
    """FusedGRPOTrainer vs GRPOTrainer: ``compute_loss`` on one identical batch whose sampler (and, with
    ``beta``, reference) log-probs are perturbed, then ``train_steps`` steps of TRL's generation loop.

    ``first_batch`` keys ``extra``, ``before_loss``, ``training`` go to the first-batch comparison,
    ``trainer_kwargs`` to both trainers, every other key to ``GRPOConfig``; ``schedule`` replaces
    :data:`RL_SCHEDULE`.
    """
    from trl import GRPOConfig, GRPOTrainer

    from dftkern.integrations.trl import FusedGRPOTrainer

    options = {k: first_batch.pop(k) for k in ("extra", "before_loss", "training") if k in first_batch}
    trainer_kwargs = first_batch.pop("trainer_kwargs", None)
    make = _rl_make(GRPOConfig, out_dir, RL_SCHEDULE if schedule is None else schedule,
                    {"loss_type": loss_type, **first_batch}, trainer_kwargs)
    keys = ("old_per_token_logps",) + (("ref_per_token_logps",) if first_batch.get("beta", 0.0) else ())
    diffs = _policy_first_batch(make, GRPOTrainer, FusedGRPOTrainer, keys if perturb else (), **options)
    if train_steps:
        diffs.update(_rl_train_diffs(make, (GRPOTrainer, FusedGRPOTrainer), train_steps))
    return diffs


def rloo_parity(*, out_dir: str = "/tmp/dftkern-rloo-parity", train_steps: int = 3, **config) -> dict:
    """FusedRLOOTrainer vs RLOOTrainer, as :func:`grpo_parity` (the sampler's sequence log-probs perturbed)."""
    from trl import RLOOConfig, RLOOTrainer

    from dftkern.integrations.trl import FusedRLOOTrainer

    make = _rl_make(RLOOConfig, out_dir, RL_SCHEDULE, config)
    diffs = _policy_first_batch(make, RLOOTrainer, FusedRLOOTrainer, ("old_logps",))
    if train_steps:
        diffs.update(_rl_train_diffs(make, (RLOOTrainer, FusedRLOOTrainer), train_steps))
    return diffs
