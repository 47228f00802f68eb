"""Print the parity tables of docs/integrations.md (measured, CPU, fp32).

    PYTHONPATH=. python tests/integrations/parity_report.py

1. patch_causal_lm vs each family's own Hugging Face loss: |loss difference| (mean reduction and
   sum / num_items_in_batch) and the largest |gradient difference| over all parameters.
2. dftkern's TRL drop-ins vs TRL's trainers (see trl_parity.py): SFT/DPO, then GRPO (every fused
   loss type, with beta=0.1 and entropy_coef=0.01, and the option cases of
   tests/integrations/test_trl_grpo_rloo.py) and RLOO.
"""

from __future__ import annotations

import torch
from integ_helpers import batch, max_grad_diff, pair
from test_transformers_patch import FAMILIES

from dftkern.integrations.transformers import patch_causal_lm


def family_rows():
    for family in FAMILIES:
        model, ref = pair(family)
        patch_causal_lm(model)
        ids, mask, labels = batch()
        diffs, grad = [], 0.0
        for num_items in (None, torch.tensor(11)):
            model.zero_grad()
            ref.zero_grad()
            a = ref(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=num_items).loss
            b = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=num_items).loss
            a.backward()
            b.backward()
            diffs.append(abs(a - b).item())
            grad = max(grad, max_grad_diff(model, ref))
        yield family, model.config.model_type, diffs, grad


# GRPO option cases: (row label, loss_type, grpo_parity keyword arguments); the same as test_trl_grpo_rloo.py's
GRPO_CASES = [
    ("grpo, delta 1.08, epsilon_high 0.1, bias-corrected KL, temperature 0.7, cast_lm_head_to_fp32", "grpo",
     dict(beta=0.1, delta=1.08, epsilon_high=0.1, use_bias_correction_kl=True, temperature=0.7,
          cast_lm_head_to_fp32=True)),
    ("dapo, adaptive entropy", "dapo",
     dict(entropy_coef=0.01, use_adaptive_entropy=True, entropy_target=10.0, entropy_coef_delta=0.02)),
    ("dapo, TRL defaults (one update per batch, r = 1)", "dapo", dict(schedule={}, perturb=False)),
    ("dapo, steps_per_generation 4", "dapo", dict(schedule={"gradient_accumulation_steps": 2,
                                                            "steps_per_generation": 4})),
]


def policy_rows():
    from trl_parity import grpo_parity, rloo_parity

    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo"):
        yield f"GRPOTrainer, {loss_type}, beta 0.1, entropy_coef 0.01", grpo_parity(loss_type, beta=0.1,
                                                                                    entropy_coef=0.01)
    for label, loss_type, kwargs in GRPO_CASES:
        yield f"GRPOTrainer, {label}", grpo_parity(loss_type, **kwargs)
    yield "RLOOTrainer (beta 0.05, SGD)", rloo_parity(optim="sgd")
    yield "RLOOTrainer (beta 0.05, AdamW)", rloo_parity()


def rloo_float64_distance() -> dict:
    """RLOO's first-batch loss and gradients of TRL (fp32) and dftkern (fp32) against dftkern's float64 torch
    engine on the same batch (TRL's log-prob kernel computes in float32 even for float64 inputs, so it cannot
    serve as the float64 reference). Returns ``{name: (|loss diff|, max |grad diff|)}``."""
    from trl import RLOOConfig, RLOOTrainer
    from trl_parity import RL_SCHEDULE, _loss_metrics_grads, _perturbed, _rl_make

    from dftkern.integrations.trl import FusedRLOOTrainer

    out_dir = "/tmp/dftkern-rloo-float64"
    make32 = _rl_make(RLOOConfig, out_dir, RL_SCHEDULE, {})
    make64 = _rl_make(RLOOConfig, out_dir, RL_SCHEDULE, {"model_init_kwargs": {"dtype": torch.float64}})
    first = make32(RLOOTrainer, 1)
    first.model.train()
    batch = _perturbed(first, first._prepare_inputs(next(iter(first.get_train_dataloader()))), ("old_logps",))
    results = {}
    for name, make, cls, dtype in [("TRL fp32", make32, RLOOTrainer, None), ("dftkern fp32", make32, FusedRLOOTrainer,
                                   None), ("dftkern fp64", make64, FusedRLOOTrainer, torch.float64)]:
        trainer = make(cls, 1)
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
        cast = {k: v.to(dtype) if dtype and torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in batch.items()}
        results[name] = _loss_metrics_grads(trainer, cast)
    ref_loss, _, ref_grads = results.pop("dftkern fp64")
    return {name: (abs(loss.double() - ref_loss).item(),
                   max((grads[n].double() - ref_grads[n]).abs().max().item() for n in grads))
            for name, (loss, _, grads) in results.items()}


def main() -> None:
    from trl_parity import dpo_parity, sft_parity

    print("| family (model_type) | loss, mean | loss, sum / num_items | grads |")
    print("|---|---:|---:|---:|")
    for family, model_type, diffs, grad in family_rows():
        print(f"| {family} (`{model_type}`) | {diffs[0]:.1e} | {diffs[1]:.1e} | {grad:.1e} |")
    rows = [("SFTTrainer, nll", sft_parity())]
    for loss_type in ("sigmoid", "hinge", "ipo", "sigmoid_norm"):
        rows.append((f"DPOTrainer, {loss_type}", dpo_parity(loss_type)))
    rows.append(("DPOTrainer, sigmoid, precompute_ref_log_probs", dpo_parity("sigmoid", precompute=True)))
    print()
    print("| TRL trainer | loss | metrics | grads | 3-step train log |")
    print("|---|---:|---:|---:|---:|")
    for name, d in rows:
        print(f"| {name} | {d['loss']:.1e} | {d['metrics']:.1e} | {d['grads']:.1e} | {d['log']:.1e} |")
    print()
    print("| TRL trainer | loss | metrics | grads | 3-step log, all but grad_norm | grad_norm |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, d in policy_rows():
        print(f"| {name} | {d['loss']:.1e} | {d['metrics']:.1e} | {d['grads']:.1e} | {d['log']:.1e} | "
              f"{d['log_grad_norm']:.1e} |", flush=True)
    print()
    print("| RLOO first batch vs dftkern float64 | loss | grads |")
    print("|---|---:|---:|")
    for name, (loss, grads) in rloo_float64_distance().items():
        print(f"| {name} | {loss:.1e} | {grads:.1e} |")


if __name__ == "__main__":
    main()
