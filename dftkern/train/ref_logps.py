"""Stage 2, ``ref-logps``: the reference model's sequence log-prob of every training row, cached.

Rows are built exactly as the trainer builds them (same tokenization, truncation and label
masking), scored once with ``dftkern.sequence_logprobs`` (sum of response-token log-probs), and
saved as ``ref_logps-<key>.safetensors`` where ``<key>`` is the first 16 hex digits of the rows'
SHA-256 (:func:`dftkern.train.data.examples_fingerprint`). The trainer looks the file up by the
same key, so it never holds the reference model, and a cache built for other data (other
negatives, another tokenizer, another ``--max-length``) is never used by mistake.

What is scored: every negative under the **training prompt** (the data file's prompt, rendered
as ``train`` renders it) at **temperature 1** (plain log-softmax of the model's logits), whatever
the generate stage sampled with: its sampling-only instruction (``--sample-system-prompt``,
``--sample-prompt-template``) and its temperature / top-k / top-p change which responses exist,
never how they are scored. Only the sampled token ids are taken from the negatives file.

The pool. Without ``--num-negatives`` every sample of every prompt (the whole pool of M) is
scored once; a trainer that takes K of them per epoch (:func:`~.records.rotate_negatives`) then
needs no re-scoring: either attach this cache to the full-pool examples (the fingerprint matches)
and cut per-epoch views with :func:`negatives_view`, or open it as a :class:`RefLogpsPool`, which
finds any row it scored by content (:func:`row_hash`), e.g. the rows of a per-epoch negatives file.

File contents: ``row_logps`` float32 ``[N, 1+K]`` (column 0: the good answer, 1..K: the negatives),
``row_tokens`` int64 ``[N, 1+K]`` (response tokens per row) and ``row_hash`` int64 ``[N, 1+K]``
(:func:`row_hash` of each row); metadata ``fingerprint``, ``reference_model``, ``prompt_ids`` (JSON
list).
"""

from __future__ import annotations

import hashlib
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
    Row,
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
from .records import DataError, read_generate_meta, read_prompt_records, read_sample_records
from .util import note, require_single_process, resolve_dtype

__all__ = ["RefLogpsConfig", "cache_path", "score_examples", "compute_ref_logps", "read_ref_logps", "attach_ref_logps",
           "row_hash", "RefLogpsPool", "negatives_view"]


@dataclass(init=False)
class RefLogpsConfig(FlatKeywords):
    """Options of the ref-logps stage (``python -m dftkern.train ref-logps --help`` lists them).

    ``model`` is a :class:`~.model.ModelConfig` or, flat, its path. The negatives are scored under
    the training prompt at temperature 1, never under the generate stage's sampling instruction or
    temperature (see the module docstring).
    """

    model: ModelConfig = nested(ModelConfig, help_for={"model": "the reference model directory (usually the model "
                                                                "that sampled)"})
    data: str = option(spec=Text(), help="the training data file (as given to train)")
    negatives: str = option(spec=Text(), help="the generate stage's output; every sample is scored under the "
                            "training prompt at temperature 1, whatever instruction (--sample-system-prompt, "
                            "--sample-prompt-template) and temperature/top-k/top-p sampled it")
    out_dir: str | None = option(None, Text(optional=True), "where ref_logps-<hash>.safetensors goes",
                                 default_text="next to --negatives")
    num_negatives: int | None = option(None, Integer(low=1, optional=True), "use the first K samples per prompt; "
                                       "must match train", default_text="all: the whole pool, scored once, so "
                                       "that a trainer rotating K per epoch needs no re-scoring")
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


def row_hash(row: Row) -> int:
    """A 64-bit (signed, so it fits an int64 tensor) hash of one row's content: its prompt length and
    every token id. Two rows hash alike only when they are the same tokens split at the same place
    (up to a 2**-64 collision chance), so the hash finds a row's reference log-prob in a pool cache."""
    digest = hashlib.sha256(f"dftkern-row-v1/{row.prompt_len}:".encode())
    digest.update(",".join(map(str, row.input_ids)).encode())
    return int.from_bytes(digest.digest()[:8], "little", signed=True)


def _sampling_note(negatives: str | os.PathLike) -> str | None:
    """One line saying how the negatives were sampled and that scoring ignores it (None without metadata)."""
    meta = read_generate_meta(negatives)
    if not meta:
        return None
    how = [f"temperature {meta.get('temperature')}", f"top-k {meta.get('top_k')}", f"top-p {meta.get('top_p')}"]
    if meta.get("sample_system_prompt"):
        how.append(f"system prompt {meta['sample_system_prompt']!r}")
    if meta.get("sample_prompt_template"):
        how.append(f"prompt template {meta['sample_prompt_template']!r}")
    return (f"ref-logps: {Path(negatives).name} was sampled with {', '.join(how)}; its samples are scored under the "
            f"training prompt at temperature 1")


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
    note(_sampling_note(cfg.negatives))
    fingerprint = examples_fingerprint(examples)
    out = cache_path(cfg.out_dir or Path(cfg.negatives).parent, fingerprint)
    if out.exists():
        try:
            read_ref_logps(out, examples)
        except (DataError, ValueError) as err:
            warnings.warn(f"ref-logps: recomputing the damaged cache {out} ({err})", stacklevel=2)
        else:
            try:
                RefLogpsPool(out)
                return out
            except (DataError, ValueError) as err:  # e.g. written before the row hashes existed
                warnings.warn(f"ref-logps: recomputing the cache {out} for pool lookup ({err})", stacklevel=2)
    device = resolve_device(m.device)
    model = load_causal_lm(m.path, attn=m.attn, device=device, dtype=resolve_dtype(cfg.dtype, device),
                           trust_remote_code=m.trust_remote_code)
    packed = use_packing(cfg.packing, model.config._attn_implementation)
    row_logps, row_tokens = score_examples(model, examples, pad_token_id=tokenizer.pad_token_id,
                                           rows_per_batch=cfg.batch_size, packed=packed, progress=cfg.progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    hashes = torch.tensor([[row_hash(row) for row in e.rows] for e in examples], dtype=torch.int64)
    save_file({"row_logps": row_logps.contiguous(), "row_tokens": row_tokens.contiguous(), "row_hash": hashes},
              str(tmp), metadata={"fingerprint": fingerprint, "reference_model": cfg.model.path,
                        "prompt_ids": json.dumps([e.prompt_id for e in examples])})
    os.replace(tmp, out)
    return out


def _open_cache(path: Path, names: tuple[str, ...]) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(metadata, {name: tensor})`` of a cache file; a missing tensor is a DataError saying what to do."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"reference log-prob cache not found: {path} (run the ref-logps stage)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            present = set(handle.keys())
            missing = [n for n in names if n not in present]
            if missing:
                raise DataError(f"{path}: this cache has no {missing[0]!r} (written by an older version, or not a "
                                f"cache); rerun the ref-logps stage, which rewrites it")
            tensors = {n: handle.get_tensor(n) for n in names}
    except (SafetensorError, OSError) as err:
        raise DataError(f"{path}: cannot read the reference log-prob cache ({err}); delete it and rerun the "
                        f"ref-logps stage") from None
    return meta, tensors


def _check_finite(path: Path, row_logps: torch.Tensor, prompt_ids: list[str]) -> None:
    bad = (~torch.isfinite(row_logps)).nonzero()
    if len(bad):
        i, j = bad[0].tolist()
        raise DataError(f"{path}: field 'row_logps[{i}][{j}]' (prompt id {prompt_ids[i]!r}, row {j}) is "
                        f"{row_logps[i, j].item()}, not a finite log-prob; delete it and rerun the ref-logps stage")


def read_ref_logps(path: str | os.PathLike, examples: list[TrainExample]) -> torch.Tensor:
    """The ``row_logps`` float32 ``[N, n]`` of a cache file, checked against ``examples``.

    Raises:
        FileNotFoundError: no such file.
        DataError: the file is truncated or not a cache (naming it), or a value is not finite
            (naming the record's file and line).
        ValueError: the cache was computed for different rows (fingerprint or shape mismatch).
    """
    path = Path(path)
    meta, tensors = _open_cache(path, ("row_logps",))
    row_logps = tensors["row_logps"]
    fingerprint = examples_fingerprint(examples)
    if meta.get("fingerprint") != fingerprint:
        raise ValueError(f"{path} holds reference log-probs for other rows (fingerprint "
                         f"{str(meta.get('fingerprint'))[:16]}, these rows: {fingerprint[:16]}); rerun ref-logps "
                         f"with the same --data/--negatives/--num-negatives/--max-length as training")
    expected = (len(examples), len(examples[0].rows) if examples else 0)
    if tuple(row_logps.shape) != expected:
        raise DataError(f"{path}: field 'row_logps' has shape {tuple(row_logps.shape)}, expected {expected} for "
                        f"these rows; delete it and rerun the ref-logps stage")
    _check_finite(path, row_logps, [e.prompt_id for e in examples])
    return row_logps.float()


def attach_ref_logps(examples: list[TrainExample], path: str | os.PathLike) -> None:
    """Load a cache file and set ``example.ref_logps`` (one float per row) on every example.

    Raises:
        ValueError: the cache was computed for different rows (fingerprint mismatch); a
            :class:`DataError` when the file is damaged (see :func:`read_ref_logps`).
    """
    for example, values in zip(examples, read_ref_logps(path, examples).tolist()):
        example.ref_logps = values


class RefLogpsPool:
    """A reference log-prob cache opened for lookup by row content (see the module docstring).

    Score the whole pool once (``ref-logps`` without ``--num-negatives``); then any examples
    whose rows were all scored in it -- the K negatives an epoch takes, a filtered selection, the
    rows of a per-epoch negatives file built with the same tokenizer and ``--max-length`` -- get
    their log-probs from it, matched by prompt id and :func:`row_hash`, not by position.

    Attributes:
        path: the cache file.
        fingerprint: :func:`~.batching.examples_fingerprint` of the rows it scored.
        prompt_ids: the prompt id of each cached example, in order (``list[str]``, length ``N``).
        row_logps: float32 ``[N, n]``; ``row_hash``: int64 ``[N, n]`` (:func:`row_hash` of each row).

    Raises (constructor):
        FileNotFoundError: no such file.
        DataError: not a readable cache, a value is not finite, or written before row hashes
            existed (rerun the ref-logps stage: it rewrites such a cache).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta, tensors = _open_cache(self.path, ("row_logps", "row_hash"))
        self.row_logps, self.row_hash = tensors["row_logps"].float(), tensors["row_hash"]
        try:
            self.prompt_ids = [str(p) for p in json.loads(meta.get("prompt_ids", "null"))]
        except (TypeError, ValueError):
            raise DataError(f"{self.path}: metadata 'prompt_ids' is not a JSON list; delete it and rerun the "
                            f"ref-logps stage") from None
        self.fingerprint = str(meta.get("fingerprint"))
        if self.row_logps.dim() != 2 or self.row_logps.shape[0] != len(self.prompt_ids) or \
                self.row_hash.shape != self.row_logps.shape or self.row_hash.dtype != torch.int64:
            raise DataError(f"{self.path}: fields 'row_logps' {tuple(self.row_logps.shape)} and 'row_hash' "
                            f"{tuple(self.row_hash.shape)} ({self.row_hash.dtype}) do not match "
                            f"{len(self.prompt_ids)} prompt ids; delete it and rerun the ref-logps stage")
        _check_finite(self.path, self.row_logps, self.prompt_ids)
        self._position = {p: i for i, p in enumerate(self.prompt_ids)}
        self._columns: dict[int, dict[int, int]] = {}

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def logps(self, example: TrainExample) -> list[float]:
        """The reference log-prob of each row of ``example`` (any rows of a prompt the cache scored).

        Raises:
            ValueError: the prompt id is not in the cache, or a row was not scored in it (naming both).
        """
        i = self._position.get(example.prompt_id)
        if i is None:
            raise ValueError(f"{self.path} has no rows for prompt id {example.prompt_id!r} (scored for other "
                             f"data); run ref-logps on this data file")
        columns = self._columns.get(i)
        if columns is None:
            columns = self._columns[i] = {h: j for j, h in enumerate(self.row_hash[i].tolist())}
        values = self.row_logps[i].tolist()
        out = []
        for r, row in enumerate(example.rows):
            j = columns.get(row_hash(row))
            if j is None:
                raise ValueError(f"{self.path}: row {r} of prompt id {example.prompt_id!r} ({len(row.input_ids)} "
                                 f"tokens, prompt {row.prompt_len}) was not scored in this cache; score the whole "
                                 f"pool (ref-logps without --num-negatives) with the same --data, tokenizer and "
                                 f"--max-length")
            out.append(values[j])
        return out

    def lookup(self, examples: list[TrainExample]) -> torch.Tensor:
        """float32 ``[len(examples), n]``: :meth:`logps` of every example (all with ``n`` rows)."""
        rows = [self.logps(e) for e in examples]
        if len({len(r) for r in rows}) > 1:
            raise ValueError("lookup: the examples have different numbers of rows; use logps() per example")
        return torch.tensor(rows, dtype=torch.float32).reshape(len(examples), -1)

    def attach(self, examples: list[TrainExample]) -> None:
        """Set ``example.ref_logps`` (one float per row) on every example from the cache."""
        for example in examples:
            example.ref_logps = self.logps(example)


def negatives_view(example: TrainExample, indices: list[int]) -> TrainExample:
    """The example with its good answer and only the negatives ``indices`` (0-based pool positions,
    i.e. rows ``1 + i``), in that order; ``ref_logps`` and ``rewards`` are cut alike, ``index`` and
    ``prompt_id`` kept. Rows are shared, not copied. Use with :func:`~.records.rotate_negatives`.
    """
    pool = len(example.rows) - 1
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < pool:
            raise ValueError(f"negatives_view: index {i!r} outside the {pool} negatives of prompt id "
                             f"{example.prompt_id!r}")
    keep = [0] + [1 + i for i in indices]
    pick = (lambda values: None if values is None else [values[r] for r in keep])
    return TrainExample(example.index, example.prompt_id, [example.rows[r] for r in keep],
                        ref_logps=pick(example.ref_logps), rewards=pick(example.rewards))
