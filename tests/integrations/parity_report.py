"""Print the parity tables of docs/integrations.md (measured, CPU, fp32).

    PYTHONPATH=. python tests/integrations/parity_report.py

1. patch_causal_lm vs each family's own Hugging Face loss: |loss difference| (mean reduction and
   sum / num_items_in_batch) and the largest |gradient difference| over all parameters.
2. dftkern's TRL drop-ins vs TRL's trainers (see trl_parity.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from integ_helpers import batch, max_grad_diff, pair  # noqa: E402
from test_transformers_patch import FAMILIES  # noqa: E402

from dftkern.integrations.transformers import patch_causal_lm  # noqa: E402


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


if __name__ == "__main__":
    main()
