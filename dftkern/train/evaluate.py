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

from .batching import OVERLONG_CHOICES, OverlongReport, build_examples, encode_prompt, has_chat_template
from .generate import SamplingConfig, decode, eos_token_ids
from .model import (
    ModelConfig,
    dtype_option,
    load_causal_lm,
    load_tokenizer,
    progress_option,
    resolve_device,
    vocab_size,
)
from .options import Choice, FlatKeywords, Function, Integer, Text, nested, option, validate
from .records import PromptRecord, read_prompt_records
from .ref_logps import score_examples
from .rewards import RewardFn, exact_match, resolve_reward, reward_name
from .util import atomic_write_json, note, require_single_process, resolve_dtype

__all__ = ["EvalConfig", "evaluate_model", "run_eval"]


@dataclass(init=False)
class EvalConfig(FlatKeywords):
    """Options of the eval stage (``python -m dftkern.train eval --help`` lists them).

    ``model`` is a :class:`~.model.ModelConfig` or, flat, its path; ``metric`` a
    :data:`~.rewards.RewardFn` or its name (a built-in reward or ``module:function``).
    """

    model: ModelConfig = nested(ModelConfig, help_for={"model": "model directory (e.g. a checkpoint)"})
    data: str = option(spec=Text(), help="held-out JSONL/Parquet of {prompt, response} or {messages}")
    out: str | None = option(None, Text(optional=True), "JSON summary path (predictions go to <out "
                             "stem>.predictions.jsonl)")
    metric: RewardFn | str | None = option(None, Function(optional=True), "metric(prompt, response, reference) -> "
                                           "float: a built-in reward name or MODULE:FUNCTION",
                                           metavar="NAME|MODULE:FUNCTION", default_text="exact_match")
    batch_size: int = option(64, Integer(low=1), "prompts per batch")
    max_new_tokens: int = option(128, Integer(low=1), "longest answer, in tokens")
    max_length: int | None = option(None, Integer(low=2, optional=True), "truncate answer rows for the log-prob")
    overlong: str = option("truncate", Choice(OVERLONG_CHOICES), "answer rows longer than --max-length: truncate "
                           "them, or leave them out of the log-prob")
    limit: int | None = option(None, Integer(low=1, optional=True), "only the first N prompts")
    dtype: str = dtype_option()
    progress: bool = progress_option()

    def __post_init__(self):
        validate(self)


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
    metric = exact_match if cfg.metric is None else resolve_reward(cfg.metric, what="metric (--metric)")
    records = read_prompt_records(cfg.data)
    if cfg.limit is not None:
        records = records[:cfg.limit]
    m = cfg.model
    device = resolve_device(m.device)
    tokenizer = load_tokenizer(m.path, trust_remote_code=m.trust_remote_code)
    model = load_causal_lm(m.path, attn=m.attn, device=device, dtype=resolve_dtype(cfg.dtype, device),
                           trust_remote_code=m.trust_remote_code)
    report = OverlongReport()
    result = evaluate_model(model, tokenizer, records, metric=metric, max_new_tokens=cfg.max_new_tokens,
                            batch_size=cfg.batch_size, max_length=cfg.max_length,
                            use_chat_template=cfg.model.use_chat_template, progress=cfg.progress, overlong=cfg.overlong,
                            report=report)
    note(report.message("eval"))
    result["metric"] = reward_name(cfg.metric) or "exact_match"
    result["model"] = cfg.model.path
    if cfg.out:
        out = Path(cfg.out)
        predictions_path = out.with_name(out.stem + ".predictions.jsonl")
        predictions_path.parent.mkdir(parents=True, exist_ok=True)
        predictions_path.write_text("".join(json.dumps(p) + "\n" for p in result["predictions"]))
        atomic_write_json(out, {k: v for k, v in result.items() if k != "predictions"})
    return result
