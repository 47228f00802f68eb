"""Stage 4, ``eval``: task metric on held-out prompts (greedy decoding) and mean log-prob of positives.

The metric is a callable ``metric(prompt, response, reference) -> float`` (default: exact match
after stripping whitespace; e.g. ``--metric dftkern.train.synthetic:addition_reward``); the
reported ``task_metric`` is its mean over prompts. ``pos_logp`` is the mean over prompts of the
good answer's sequence log-prob (sum over response tokens), ``pos_logp_per_token`` the mean
per-token log-prob (total log-prob / total response tokens).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import (
    OverlongReport,
    PromptRecord,
    build_examples,
    encode_prompt,
    has_chat_template,
    read_prompt_records,
)
from .generate import SamplingConfig, decode, eos_token_ids
from .model import load_causal_lm, load_tokenizer, resolve_device, vocab_size
from .ref_logps import score_examples
from .util import (
    atomic_write_json,
    exact_match,
    load_callable,
    note,
    require_single_process,
    resolve_dtype,
)

__all__ = ["EvalConfig", "evaluate_model", "run_eval"]


@dataclass
class EvalConfig:
    """Options of the eval stage (see ``python -m dftkern.train eval --help``)."""

    model: str
    data: str
    out: str | None = None
    metric: str | None = None
    batch_size: int = 64
    max_new_tokens: int = 128
    max_length: int | None = None
    limit: int | None = None
    use_chat_template: bool = True
    overlong: str = "truncate"
    device: str = "auto"
    dtype: str = "auto"
    attn: str = "auto"
    trust_remote_code: bool = False
    progress: bool = True


@torch.no_grad()
def evaluate_model(model, tokenizer, records: Sequence[PromptRecord], *, metric: Callable = exact_match,
                   max_new_tokens: int = 128, batch_size: int = 64, max_length: int | None = None,
                   use_chat_template: bool = True, progress: bool = False, overlong: str = "truncate",
                   report: OverlongReport | None = None) -> dict:
    """Greedy-decode every prompt, score it, and measure the positives' log-probs.

    Returns ``{"task_metric", "pos_logp", "pos_logp_per_token", "num_prompts", "predictions",
    "overlong"}`` where ``predictions`` is a list of ``{"prompt_id", "prompt", "response",
    "reference", "score"}`` and ``overlong`` counts the answer rows longer than ``max_length``
    (``{"truncated", "dropped"}``; ``overlong="drop"`` leaves them out of the log-probs), also
    added to ``report`` when given.
    """
    use_template = use_chat_template and has_chat_template(tokenizer)
    eos_ids = eos_token_ids(model, tokenizer)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    predictions = []
    for start in tqdm(range(0, len(records), batch_size), desc="eval", unit="batch", disable=not progress):
        chunk = records[start:start + batch_size]
        prompts = [encode_prompt(tokenizer, r, use_chat_template=use_template) for r in chunk]
        outputs = decode(model, prompts, sampling=sampling, eos_ids=eos_ids, pad_token_id=tokenizer.pad_token_id)
        for record, (tokens, _) in zip(chunk, outputs):
            response = tokenizer.decode(tokens, skip_special_tokens=True)
            score = float(metric(record.prompt_text(), response, record.response))
            predictions.append({"prompt_id": record.prompt_id, "prompt": record.prompt_text(), "response": response,
                                "reference": record.response, "score": score})
    report = OverlongReport() if report is None else report
    examples = build_examples(tokenizer, records, max_length=max_length, use_chat_template=use_template,
                              overlong=overlong, vocab_size=vocab_size(model), report=report)
    row_logps, row_tokens = score_examples(model, examples, pad_token_id=tokenizer.pad_token_id,
                                           rows_per_batch=batch_size)
    return {"task_metric": sum(p["score"] for p in predictions) / len(predictions),
            "pos_logp": float(row_logps[:, 0].mean()),
            "pos_logp_per_token": float(row_logps[:, 0].sum() / row_tokens[:, 0].sum().clamp_min(1)),
            "num_prompts": len(predictions), "predictions": predictions,
            "overlong": {"truncated": report.truncated, "dropped": report.dropped_examples}}


def run_eval(cfg: EvalConfig) -> dict:
    """Run the eval stage; writes ``cfg.out`` (JSON summary) and ``<out>.predictions.jsonl`` when given."""
    require_single_process("eval")
    metric = load_callable(cfg.metric, what="--metric") if cfg.metric else exact_match
    records = read_prompt_records(cfg.data)
    if cfg.limit is not None:
        records = records[:cfg.limit]
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model = load_causal_lm(cfg.model, attn=cfg.attn, device=device, dtype=resolve_dtype(cfg.dtype, device),
                           trust_remote_code=cfg.trust_remote_code)
    report = OverlongReport()
    result = evaluate_model(model, tokenizer, records, metric=metric, max_new_tokens=cfg.max_new_tokens,
                            batch_size=cfg.batch_size, max_length=cfg.max_length,
                            use_chat_template=cfg.use_chat_template, progress=cfg.progress, overlong=cfg.overlong,
                            report=report)
    note(report.message("eval"))
    result["metric"] = cfg.metric or "exact_match"
    result["model"] = str(cfg.model)
    if cfg.out:
        out = Path(cfg.out)
        predictions_path = out.with_name(out.stem + ".predictions.jsonl")
        predictions_path.parent.mkdir(parents=True, exist_ok=True)
        predictions_path.write_text("".join(json.dumps(p) + "\n" for p in result["predictions"]))
        atomic_write_json(out, {k: v for k, v in result.items() if k != "predictions"})
    return result
