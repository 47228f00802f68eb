"""How big, and how systematic, DFT's negative term is at the start of training (θ = the base model).

At θ = π_ref every weight is ω = 1 (``d = s - r = 0`` and the DFT state starts at ``u = 0``), so the
DFT gradient is the SFT gradient plus the negative term ``(1/G) Σ_i (1/K) Σ_j ∇ s(y'_ij)``. With
negatives drawn from π_ref itself (T = 1, same prompt) that term has expectation ``Σ_y ∇π(y) = 0``;
with T = 0.7 it does not. :func:`gradient_check` measures, on one batch of training prompts, for
both samplers:

* ``ratio_k{K}`` = ``|g_dft - g_sft| / |g_sft|`` (the negative term's norm relative to SFT's) and
  ``cos_k{K}`` = ``cos(g_dft, g_sft)``, with ``K = num_negatives`` (averaged over disjoint sets of K
  samples, as one training step sees them) and with ``K = many`` samples (an estimate of the
  expectation: what is left when the noise is averaged away);
* ``neg_cos_many`` = ``cos(g_dft - g_sft, g_sft)`` with many samples: whether the systematic part of
  the negative term points with (> 0) or against (< 0) the SFT gradient.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import dftkern
from dftkern.train.data import SampleRecord, build_examples, collate, encode_prompt, read_prompt_records
from dftkern.train.generate import SamplingConfig, decode, eos_token_ids
from dftkern.train.model import backbone_hidden, lm_head_params, load_causal_lm, load_tokenizer
from dftkern.train.util import atomic_write_json, derive_seed

from .config import SamplingSpec, StudyConfig
from .protocol import seed_dir, split_paths

__all__ = ["gradient_check"]


def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def _dft_and_sft_grads(model, tokenizer, records, samples: dict, k: int, params) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat gradients of the DFT loss (ω = 1: θ = reference, fresh state) and of SFT (sequence sum)."""
    examples = build_examples(tokenizer, records, samples, num_negatives=k)
    weight, _ = lm_head_params(model)
    batch = collate(examples, pad_token_id=tokenizer.pad_token_id).to(weight.device)
    hidden = backbone_hidden(model, batch)
    with torch.no_grad():
        seq = dftkern.sequence_logprobs(hidden.detach(), weight.detach(), batch.labels).view(len(examples), 1 + k)
    state = dftkern.DFTState(len(examples), device=weight.device)
    loss = dftkern.fused_dft_loss(hidden, weight, batch.labels, num_negatives=k, ids=batch.example_ids, state=state,
                                  ref_logps=seq[:, 1:], tau=1.0, gamma=0.85)
    g_dft = _flat_grad(loss, params)
    hidden = backbone_hidden(model, batch)
    positives = torch.arange(len(examples), device=weight.device) * (1 + k)
    sft = -dftkern.sequence_logprobs(hidden[positives], weight, batch.labels[positives]).mean()
    return g_dft, _flat_grad(sft, params)


def gradient_check(cfg: StudyConfig, seed: int, root: str | Path, *, num_prompts: int = 32,
                   many: int = 64) -> dict:
    """Measure the negative term at θ = base for ``cfg.sampling`` (``"main"``) and ``cfg.exact_sampling``
    (``"exact"``) on the first ``num_prompts`` training prompts. Cached in ``seed-S/gradient_check.json``."""
    out = seed_dir(root, seed) / "gradient_check.json"
    if out.exists():
        return json.loads(out.read_text())
    prepared = json.loads((seed_dir(root, seed) / "prepared.json").read_text())
    model_dir = prepared["base"]["model"]
    model = load_causal_lm(model_dir, attn="sdpa", device=torch.device(cfg.device))
    tokenizer = load_tokenizer(model_dir)
    records = read_prompt_records(split_paths(root)["train"])[:num_prompts]
    params = [p for p in model.parameters() if p.requires_grad]
    k = cfg.num_negatives
    result = {"num_prompts": len(records), "k": k, "many": many}
    for name, spec in (("main", cfg.sampling), ("exact", cfg.exact_sampling)):
        spec: SamplingSpec
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=spec.temperature, top_k=spec.top_k,
                                  top_p=spec.top_p)
        prompts = [encode_prompt(tokenizer, r) for r in records for _ in range(many)]
        seeds = [derive_seed(seed, "gradient_check", name, r.prompt_id, j) for r in records for j in range(many)]
        decoded = decode(model, prompts, sampling=sampling, eos_ids=eos_token_ids(model, tokenizer),
                         pad_token_id=tokenizer.pad_token_id, seeds=seeds)
        tokens = [decoded[i * many:(i + 1) * many] for i in range(len(records))]

        def subset(j0: int, j1: int) -> dict:
            return {r.prompt_id: SampleRecord(r.prompt_id, tuple("" for _ in range(j1 - j0)),
                                              tuple(tuple(t) for t, _ in tokens[i][j0:j1]))
                    for i, r in enumerate(records)}

        ratios, cosines = [], []
        for start in range(0, min(many, 8 * k), k):  # 8 disjoint sets of K negatives: 8 "steps"
            g_dft, g_sft = _dft_and_sft_grads(model, tokenizer, records, subset(start, start + k), k, params)
            ratios.append(float((g_dft - g_sft).norm() / g_sft.norm()))
            cosines.append(_cos(g_dft, g_sft))
        g_dft, g_sft = _dft_and_sft_grads(model, tokenizer, records, subset(0, many), many, params)
        result[name] = {"temperature": spec.temperature, f"ratio_k{k}": sum(ratios) / len(ratios),
                        f"cos_k{k}": sum(cosines) / len(cosines),
                        "ratio_many": float((g_dft - g_sft).norm() / g_sft.norm()), "cos_many": _cos(g_dft, g_sft),
                        "neg_cos_many": _cos(g_dft - g_sft, g_sft)}
    atomic_write_json(out, result)
    return result
