"""Stage 2, ``ref-logps``: the reference model's sequence log-prob of every training row, cached.

Rows are built exactly as the trainer builds them (same tokenization, truncation and label
masking), scored once with ``dftkern.sequence_logprobs`` (sum of response-token log-probs), and
saved as ``ref_logps-<key>.safetensors`` where ``<key>`` is the first 16 hex digits of the rows'
SHA-256 (:func:`dftkern.train.data.examples_fingerprint`). The trainer looks the file up by the
same key, so it never holds the reference model, and a cache built for other data (other
negatives, another tokenizer, another ``--max-length``) is never used by mistake.

File contents: ``row_logps`` float32 ``[N, 1+K]`` (column 0: the good answer, 1..K: the negatives)
and ``row_tokens`` int64 ``[N, 1+K]`` (response tokens per row); metadata ``fingerprint``,
``reference_model``, ``prompt_ids`` (JSON list).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import dftkern

from .batching import (
    IGNORE_INDEX,
    OVERLONG_CHOICES,
    OverlongReport,
    TrainExample,
    build_examples,
    collate,
    examples_fingerprint,
    shifted_labels,
)
from .model import (
    ModelConfig,
    backbone_hidden,
    config_vocab_size,
    dtype_option,
    lm_head_params,
    load_causal_lm,
    load_tokenizer,
    logit_softcap,
    packing_option,
    progress_option,
    resolve_device,
    use_packing,
)
from .options import Choice, FlatKeywords, Integer, Text, nested, option, validate
from .records import DataError, read_prompt_records, read_sample_records
from .util import note, require_single_process, resolve_dtype

__all__ = ["RefLogpsConfig", "cache_path", "score_examples", "compute_ref_logps", "read_ref_logps", "attach_ref_logps"]


@dataclass(init=False)
class RefLogpsConfig(FlatKeywords):
    """Options of the ref-logps stage (``python -m dftkern.train ref-logps --help`` lists them).

    ``model`` is a :class:`~.model.ModelConfig` or, flat, its path.
    """

    model: ModelConfig = nested(ModelConfig, help_for={"model": "the reference model directory (usually the model "
                                                                "that sampled)"})
    data: str = option(spec=Text(), help="the training data file (as given to train)")
    negatives: str = option(spec=Text(), help="the generate stage's output")
    out_dir: str | None = option(None, Text(optional=True), "where ref_logps-<hash>.safetensors goes",
                                 default_text="next to --negatives")
    num_negatives: int | None = option(None, Integer(low=1, optional=True), "use the first K samples per prompt; "
                                       "must match train", default_text="all")
    max_length: int | None = option(None, Integer(low=2, optional=True), "truncate rows as train does")
    overlong: str = option("truncate", Choice(OVERLONG_CHOICES), "rows longer than --max-length: truncate them, "
                           "or drop their examples; as train does")
    batch_size: int = option(64, Integer(low=1), "rows per forward")
    packing: str = packing_option()
    dtype: str = dtype_option()
    progress: bool = progress_option()

    def __post_init__(self):
        validate(self)


def cache_path(directory: str | os.PathLike, fingerprint: str) -> Path:
    """Where the cache for rows with this fingerprint lives in ``directory``."""
    return Path(directory) / f"ref_logps-{fingerprint[:16]}.safetensors"


@torch.no_grad()
def score_examples(model, examples: list[TrainExample], *, pad_token_id: int, rows_per_batch: int = 64,
                   packed: bool = False, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs (sums) of every row of every example.

    Returns ``(row_logps float32 [N, n], row_tokens int64 [N, n])`` with ``n`` rows per example.
    """
    n = len(examples[0].rows)
    per_batch = max(1, rows_per_batch // n)
    weight, bias = lm_head_params(model)
    softcap = logit_softcap(model)
    device = weight.device
    was_training = model.training
    model.eval()
    logps, tokens = [], []
    try:
        for start in tqdm(range(0, len(examples), per_batch), desc="ref-logps", unit="batch", disable=not progress):
            batch = collate(examples[start:start + per_batch], pad_token_id=pad_token_id, packed=packed).to(device)
            hidden = backbone_hidden(model, batch).to(weight.dtype)
            seq = dftkern.sequence_logprobs(hidden, weight, batch.labels, cu_seqlens=batch.cu_seqlens, bias=bias,
                                            softcap=softcap)
            logps.append(seq.float().cpu().view(-1, n))
            tokens.append(torch.tensor([[sum(label != IGNORE_INDEX for label in shifted_labels(row)) for row in e.rows]
                                        for e in examples[start:start + per_batch]]))
    finally:
        model.train(was_training)
    return torch.cat(logps), torch.cat(tokens)


def compute_ref_logps(cfg: RefLogpsConfig) -> Path:
    """Run the ref-logps stage; returns the cache path (an existing cache for the same rows is reused)."""
    from safetensors.torch import save_file

    require_single_process("ref-logps")
    m = cfg.model
    tokenizer = load_tokenizer(m.path, trust_remote_code=m.trust_remote_code)
    vocab = config_vocab_size(m.path, trust_remote_code=m.trust_remote_code)
    records = read_prompt_records(cfg.data)
    report = OverlongReport()
    examples = build_examples(tokenizer, records, read_sample_records(cfg.negatives, vocab_size=vocab),
                              num_negatives=cfg.num_negatives, max_length=cfg.max_length,
                              use_chat_template=m.use_chat_template, overlong=cfg.overlong, vocab_size=vocab,
                              report=report)
    note(report.message("ref-logps"))
    fingerprint = examples_fingerprint(examples)
    out = cache_path(cfg.out_dir or Path(cfg.negatives).parent, fingerprint)
    if out.exists():
        try:
            read_ref_logps(out, examples)
            return out
        except (DataError, ValueError) as err:
            warnings.warn(f"ref-logps: recomputing the damaged cache {out} ({err})", stacklevel=2)
    device = resolve_device(m.device)
    model = load_causal_lm(m.path, attn=m.attn, device=device, dtype=resolve_dtype(cfg.dtype, device),
                           trust_remote_code=m.trust_remote_code)
    packed = use_packing(cfg.packing, model.config._attn_implementation)
    row_logps, row_tokens = score_examples(model, examples, pad_token_id=tokenizer.pad_token_id,
                                           rows_per_batch=cfg.batch_size, packed=packed, progress=cfg.progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    save_file({"row_logps": row_logps.contiguous(), "row_tokens": row_tokens.contiguous()}, str(tmp),
              metadata={"fingerprint": fingerprint, "reference_model": cfg.model.path,
                        "prompt_ids": json.dumps([e.prompt_id for e in examples])})
    os.replace(tmp, out)
    return out


def read_ref_logps(path: str | os.PathLike, examples: list[TrainExample]) -> torch.Tensor:
    """The ``row_logps`` float32 ``[N, n]`` of a cache file, checked against ``examples``.

    Raises:
        FileNotFoundError: no such file.
        DataError: the file is truncated or not a cache (naming it), or a value is not finite
            (naming the record's file and line).
        ValueError: the cache was computed for different rows (fingerprint or shape mismatch).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference log-prob cache not found: {path} (run the ref-logps stage)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            row_logps = handle.get_tensor("row_logps")
    except (SafetensorError, OSError) as err:
        raise DataError(f"{path}: cannot read the reference log-prob cache ({err}); delete it and rerun the "
                        f"ref-logps stage") from None
    fingerprint = examples_fingerprint(examples)
    if meta.get("fingerprint") != fingerprint:
        raise ValueError(f"{path} holds reference log-probs for other rows (fingerprint "
                         f"{str(meta.get('fingerprint'))[:16]}, these rows: {fingerprint[:16]}); rerun ref-logps "
                         f"with the same --data/--negatives/--num-negatives/--max-length as training")
    expected = (len(examples), len(examples[0].rows) if examples else 0)
    if tuple(row_logps.shape) != expected:
        raise DataError(f"{path}: field 'row_logps' has shape {tuple(row_logps.shape)}, expected {expected} for "
                        f"these rows; delete it and rerun the ref-logps stage")
    bad = (~torch.isfinite(row_logps)).nonzero()
    if len(bad):
        i, j = bad[0].tolist()
        raise DataError(f"{path}: field 'row_logps[{i}][{j}]' (prompt id {examples[i].prompt_id!r}, row {j}) is "
                        f"{row_logps[i, j].item()}, not a finite log-prob; delete it and rerun the ref-logps stage")
    return row_logps.float()


def attach_ref_logps(examples: list[TrainExample], path: str | os.PathLike) -> None:
    """Load a cache file and set ``example.ref_logps`` (one float per row) on every example.

    Raises:
        ValueError: the cache was computed for different rows (fingerprint mismatch); a
            :class:`DataError` when the file is damaged (see :func:`read_ref_logps`).
    """
    for example, values in zip(examples, read_ref_logps(path, examples).tolist()):
        example.ref_logps = values
