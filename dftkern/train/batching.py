"""Batching: tokenize records into training examples, shift labels, collate batches, order them.

Tokenization (:func:`encode_prompt`, :func:`encode_response`): with a chat template (when the
tokenizer has one and it is not disabled) the prompt is rendered with ``add_generation_prompt=True``
and the response is the rest of the rendered conversation; without one, the prompt is tokenized
with the tokenizer's special tokens (e.g. BOS) and the response gets the EOS token appended.

Rows longer than ``max_length`` are cut or their example dropped (:func:`build_examples`,
``overlong``), and always counted (:class:`OverlongReport`).

Labels are **shifted here**, because dftkern's fused ops do not shift: for a row of tokens
``x[0..T-1]`` whose first ``P`` tokens are the prompt, ``labels[t] = x[t+1]`` for ``t >= P-1`` and
``-100`` elsewhere (prompt, the last position, padding). Prompt tokens therefore never enter a loss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .records import DataError, PromptRecord, SampleRecord
from .serialization import register_record

__all__ = [
    "IGNORE_INDEX",
    "Row",
    "TrainExample",
    "Batch",
    "has_chat_template",
    "encode_prompt",
    "encode_response",
    "make_row",
    "OVERLONG_CHOICES",
    "OverlongReport",
    "build_examples",
    "examples_fingerprint",
    "shifted_labels",
    "collate",
    "attach_token_values",
    "token_values",
    "valid_label_positions",
    "ExampleOrder",
]

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; responses need an end-of-sequence token")
    return int(tokenizer.eos_token_id)


def encode_prompt(tokenizer, record: PromptRecord, *, use_chat_template: bool = True) -> list[int]:
    """Token ids of the prompt, ready for the answer to follow (generation prompt included)."""
    if use_chat_template and has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(record.prompt_messages(), add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if record.prompt is None:
        raise DataError(f"{record.where}: chat 'messages' need a tokenizer with a chat template "
                        f"(or use 'prompt'/'response' records)")
    return list(tokenizer(record.prompt, add_special_tokens=True)["input_ids"])


def encode_response(tokenizer, record: PromptRecord, response: str | None = None, *,
                    use_chat_template: bool = True) -> list[int]:
    """Token ids of a response to ``record``'s prompt (default: the record's good answer).

    With a chat template: the tokens the template renders after the generation prompt (end-of-turn
    markers included). Without: the response text's tokens followed by EOS.
    """
    response = record.response if response is None else response
    if use_chat_template and has_chat_template(tokenizer):
        messages = record.prompt_messages()
        prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                                  tokenize=False)
        if not full_text.startswith(prompt_text):
            raise DataError(f"{record.where}: the chat template renders the prompt differently once the answer "
                            f"is appended, so prompt and answer cannot be separated; disable the template "
                            f"(--no-chat-template) or use plain 'prompt'/'response' records")
        return list(tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"])
    return list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [_eos_id(tokenizer)]


# ---------------------------------------------------------------------------------------------
# Training examples
# ---------------------------------------------------------------------------------------------


@register_record
@dataclass(frozen=True)
class Row:
    """One sequence: ``input_ids`` (prompt then response) of which the first ``prompt_len`` are prompt."""

    input_ids: tuple[int, ...]
    prompt_len: int

    @property
    def num_response_tokens(self) -> int:
        return len(self.input_ids) - self.prompt_len

    @property
    def num_label_positions(self) -> int:
        """Positions that carry a label (:func:`shifted_labels` != -100): the response tokens predicted."""
        return max(len(self.input_ids) - 1 - max(self.prompt_len - 1, 0), 0)


def make_row(prompt_ids: Sequence[int], response_ids: Sequence[int], max_length: int | None) -> Row:
    """Concatenate prompt and response, fitting ``max_length`` tokens.

    Too long: the response is cut at its end; a prompt that alone leaves no room for one response
    token is cut at its start (its end is what the answer follows).
    """
    if not response_ids:
        raise ValueError("a response must have at least one token")
    prompt_ids, response_ids = list(prompt_ids), list(response_ids)
    if max_length is not None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if len(prompt_ids) > max_length - 1:
            prompt_ids = prompt_ids[len(prompt_ids) - (max_length - 1):]
        response_ids = response_ids[:max_length - len(prompt_ids)]
    return Row(tuple(prompt_ids + response_ids), len(prompt_ids))


def shifted_labels(row: Row) -> list[int]:
    """``labels[t] = input_ids[t+1]`` on response targets, ``IGNORE_INDEX`` elsewhere (same length as the row)."""
    ids = row.input_ids
    labels = [IGNORE_INDEX] * len(ids)
    for t in range(max(row.prompt_len - 1, 0), len(ids) - 1):
        labels[t] = ids[t + 1]
    return labels


@register_record
@dataclass
class TrainExample:
    """One prompt with its rows: the good answer first, then its K sampled negatives (if any).

    ``index`` is the example's position in the training set (the DFTState id); ``ref_logps`` the
    reference model's sequence log-prob of each row; ``rewards`` one reward per row.

    Per-token log-probs (on-policy policy losses): ``old_token_logps`` (the sampling policy's) and
    ``ref_token_logps`` (the initial model's), one float32 tensor per row with one value per
    label-carrying position of the row (:func:`shifted_labels` != -100), in order.
    """

    index: int
    prompt_id: str
    rows: list[Row]
    ref_logps: list[float] | None = None
    rewards: list[float] | None = None
    old_token_logps: list[torch.Tensor] | None = None
    ref_token_logps: list[torch.Tensor] | None = None


OVERLONG_CHOICES = ("truncate", "drop")


@dataclass
class OverlongReport:
    """What :func:`build_examples` (or the on-policy sampler) did with rows longer than ``max_length``.

    ``rows``: rows built; ``truncated``: rows cut to ``max_length`` (policy ``"truncate"``);
    ``dropped_examples``/``dropped_rows``: examples skipped with all their rows (policy ``"drop"``).
    """

    max_length: int | None = None
    policy: str = "truncate"
    rows: int = 0
    truncated: int = 0
    dropped_examples: int = 0
    dropped_rows: int = 0

    def message(self, what: str) -> str | None:
        """One line for the user (None when every row fitted)."""
        if self.dropped_examples:
            return (f"{what}: dropped {self.dropped_examples} example(s) ({self.dropped_rows} rows) with a row "
                    f"longer than --max-length {self.max_length} tokens (--overlong drop)")
        if self.truncated:
            return (f"{what}: {self.truncated} of {self.rows} rows are longer than --max-length {self.max_length} "
                    f"tokens and were truncated (the response's end is cut; a prompt that alone is too long loses "
                    f"its start); --overlong drop skips such examples instead")
        return None


def _check_token_ids(ids: Sequence[int], vocab_size: int | None, where: str, field: str) -> None:
    if not ids:
        raise DataError(f"{where}: field '{field}' gives no tokens (a {field} needs at least one token)")
    if vocab_size is not None and max(ids) >= vocab_size:
        raise DataError(f"{where}: field '{field}' tokenizes to id {max(ids)}, outside the model's vocabulary "
                        f"[0, {vocab_size}) (the tokenizer does not match the model)")


def build_examples(tokenizer, records: Sequence[PromptRecord], samples: dict[str, SampleRecord] | None = None, *,
                   num_negatives: int | None = None, max_length: int | None = None,
                   use_chat_template: bool = True, overlong: str = "truncate", vocab_size: int | None = None,
                   report: OverlongReport | None = None) -> list[TrainExample]:
    """Tokenize records (and their negatives) into :class:`TrainExample` s, positive row first.

    Args:
        samples: ``{prompt_id: SampleRecord}`` from :func:`read_sample_records`; None for positives only.
        num_negatives: keep the first K samples of each prompt (default: all; every prompt must have
            at least K, and all prompts the same count).
        max_length / overlong: rows longer than ``max_length`` tokens are cut (``"truncate"``, see
            :func:`make_row`) or their whole example is skipped (``"drop"``; the examples' ``index``
            stays consecutive). Counted in ``report``; without a report a ``UserWarning`` says how
            many, so truncation is never silent.
        vocab_size: the model's vocabulary size; token ids outside ``[0, vocab_size)`` are an error.
    Raises:
        DataError: a record has no samples, or too few; a prompt or response gives no tokens or ids
            outside the vocabulary (naming the record's file and line and the field).
    """
    if overlong not in OVERLONG_CHOICES:
        raise ValueError(f"overlong must be one of {OVERLONG_CHOICES}, got {overlong!r}")
    own_report = report is None
    report = OverlongReport(max_length, overlong) if own_report else report
    report.max_length, report.policy = max_length, overlong
    examples = []
    for record in records:
        prompt_ids = encode_prompt(tokenizer, record, use_chat_template=use_chat_template)
        _check_token_ids(prompt_ids, vocab_size, record.where, "prompt" if record.prompt is not None else "messages")
        response_ids = encode_response(tokenizer, record, use_chat_template=use_chat_template)
        _check_token_ids(response_ids, vocab_size, record.where, "response" if record.prompt is not None
                         else "messages")
        responses, rewards = [response_ids], None
        if samples is not None:
            sample = samples.get(record.prompt_id)
            if sample is None:
                raise DataError(f"{record.where}: prompt id {record.prompt_id!r} has no sampled negatives "
                                f"(run the generate stage on this data file)")
            k = len(sample.responses) if num_negatives is None else num_negatives
            if len(sample.responses) < k or k < 1:
                raise DataError(f"{sample.where}: prompt id {record.prompt_id!r} has {len(sample.responses)} "
                                f"samples, {k} needed")
            if examples and len(examples[0].rows) != 1 + k:
                raise DataError(f"{sample.where}: prompt id {record.prompt_id!r} has {k} samples but earlier "
                                f"prompts have {len(examples[0].rows) - 1}; pass --num-negatives")
            for j, ids in enumerate(sample.response_token_ids[:k]):
                _check_token_ids(ids, vocab_size, sample.where, f"response_token_ids[{j}]")
            responses += [list(ids) for ids in sample.response_token_ids[:k]]
            if sample.rewards is not None:
                positive = 1.0 if sample.positive_reward is None else sample.positive_reward
                rewards = [positive] + list(sample.rewards[:k])
        too_long = 0 if max_length is None else sum(len(prompt_ids) + len(r) > max_length for r in responses)
        if too_long and overlong == "drop":
            report.dropped_examples += 1
            report.dropped_rows += len(responses)
            continue
        report.rows += len(responses)
        report.truncated += too_long
        rows = [make_row(prompt_ids, ids, max_length) for ids in responses]
        examples.append(TrainExample(len(examples), record.prompt_id, rows, rewards=rewards))
    if not examples and report.dropped_examples:
        raise DataError(f"no example is left: all {report.dropped_examples} have a row longer than max_length "
                        f"{max_length} (--overlong drop); raise --max-length")
    if own_report and report.message("build_examples"):
        warnings.warn(report.message("build_examples"), stacklevel=2)
    return examples


def examples_fingerprint(examples: Sequence[TrainExample]) -> str:
    """SHA-256 (hex) of every row's tokens and prompt length: the key of a reference log-prob cache."""
    digest = hashlib.sha256(b"dftkern-rows-v1")
    for example in examples:
        digest.update(f"|{example.prompt_id}|{len(example.rows)}".encode())
        for row in example.rows:
            digest.update(f"/{row.prompt_len}:".encode())
            digest.update(",".join(map(str, row.input_ids)).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A micro-batch of ``G`` examples with ``n = rows_per_example`` rows each (``R = G * n`` rows).

    Padded layout (``packed=False``): ``input_ids``/``labels``/``attention_mask`` are ``[R, T]``
    (right padding, pad id in ``input_ids``, 0 in the mask, ``-100`` in the labels).
    Packed layout (``packed=True``): ``input_ids``/``position_ids`` are ``[1, N]``, ``labels`` is
    ``[N]`` and ``cu_seqlens`` ``[R+1]`` int32 holds the row boundaries (FlashAttention varlen style).
    ``ref_logps`` is float32 ``[R]`` (per row), ``rewards`` float32 ``[G, n]``, ``example_ids`` int64 ``[G]``;
    ``old_logps`` / ``ref_token_logps`` float32 with the labels' shape (per token, 0 at ignored positions).

    Host metadata: ``valid_positions`` (int64 ``[n]``, the flat positions of ``labels.reshape(-1)``
    that are not ``-100``, increasing) and ``cu_seqlens`` stay on the CPU in :meth:`to`: the fused
    losses read them on the host, so a batch moved to CUDA costs the loss no device-to-host sync.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    example_ids: torch.Tensor
    rows_per_example: int
    packed: bool
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    num_tokens: int = 0
    valid_positions: torch.Tensor | None = None
    old_logps: torch.Tensor | None = None
    ref_token_logps: torch.Tensor | None = None

    @property
    def num_examples(self) -> int:
        return int(self.example_ids.shape[0])

    def to(self, device) -> Batch:
        """The batch on ``device``; ``cu_seqlens`` and ``valid_positions`` stay on the CPU (computed
        here from CPU labels when missing, e.g. for a batch built without :func:`collate`)."""
        def move(t):
            return t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t
        valid = self.valid_positions
        if valid is None and self.labels.device.type == "cpu":
            valid = valid_label_positions(self.labels)
        host = {"cu_seqlens": self.cu_seqlens, "valid_positions": valid}
        return Batch(**{f.name: host[f.name] if f.name in host else move(getattr(self, f.name))
                        for f in dataclasses.fields(self)})

    def set_token_values(self, name: str, values: torch.Tensor) -> None:
        """Set ``old_logps`` or ``ref_token_logps`` from ``values`` ``[n]``: one value per valid label
        position, in order (:func:`token_values`); placed into a zero tensor of the labels' shape."""
        if name not in ("old_logps", "ref_token_logps"):
            raise ValueError(f"name must be 'old_logps' or 'ref_token_logps', got {name!r}")
        positions = self.valid_positions if self.valid_positions is not None else valid_label_positions(self.labels)
        if values.numel() != positions.numel():
            raise ValueError(f"{name}: {values.numel()} per-token values for {positions.numel()} label positions")
        flat = torch.zeros(self.labels.numel(), dtype=torch.float32, device=self.labels.device)
        flat[positions.to(flat.device)] = values.to(device=flat.device, dtype=torch.float32)
        setattr(self, name, flat.view(self.labels.shape))


def token_values(examples: Sequence[TrainExample], rows: Sequence[int] | None, name: str) -> torch.Tensor:
    """float32 ``[n]``: the examples' per-token values ``name`` (``"old_token_logps"`` or
    ``"ref_token_logps"``) of the kept ``rows``, concatenated row by row: one value per label
    position, in the order of any layout's valid positions (padded, packed, or the prompt-shared loss view).

    Raises:
        ValueError: an example lacks them, or a row has another number of values than label positions.
    """
    keep = list(range(len(examples[0].rows))) if rows is None else list(rows)
    parts = []
    for example in examples:
        values = getattr(example, name)
        if values is None:
            raise ValueError(f"example {example.prompt_id!r} has no {name} (per-token log-probs are recorded by "
                             f"on-policy sampling)")
        for r in keep:
            expected = example.rows[r].num_label_positions
            if values[r].numel() != expected:
                raise ValueError(f"example {example.prompt_id!r} row {r}: {values[r].numel()} values in {name} for "
                                 f"{expected} label positions")
            parts.append(values[r].reshape(-1).float())
    return torch.cat(parts)


def valid_label_positions(labels: torch.Tensor) -> torch.Tensor:
    """int64 ``[n]``: the flat positions of ``labels.reshape(-1)`` that are not ``IGNORE_INDEX``, increasing
    (on ``labels``' device; the collator calls it on CPU labels)."""
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def collate(examples: Sequence[TrainExample], *, pad_token_id: int, packed: bool = False,
            rows: Sequence[int] | None = None, with_ref_logps: bool = False, with_rewards: bool = False,
            with_old_logps: bool = False, with_ref_token_logps: bool = False) -> Batch:
    """Stack examples into a :class:`Batch`.

    Args:
        rows: which rows of every example to keep (default: all; ``[0]`` = positives only).
        with_ref_logps / with_rewards: require and attach the examples' ``ref_logps`` / ``rewards``.
        with_old_logps / with_ref_token_logps: require the examples' ``old_token_logps`` /
            ``ref_token_logps`` and attach them per token as ``old_logps`` / ``ref_token_logps``.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    keep = list(range(len(examples[0].rows))) if rows is None else list(rows)
    seqs, ref, rew = [], [], []
    for example in examples:
        if max(keep) >= len(example.rows):
            raise ValueError(f"example {example.prompt_id!r} has {len(example.rows)} rows, row {max(keep)} requested")
        seqs += [example.rows[r] for r in keep]
        if with_ref_logps:
            if example.ref_logps is None:
                raise ValueError(f"example {example.prompt_id!r} has no reference log-probs")
            ref += [example.ref_logps[r] for r in keep]
        if with_rewards:
            if example.rewards is None:
                raise ValueError(f"example {example.prompt_id!r} has no rewards")
            rew.append([example.rewards[r] for r in keep])
    example_ids = torch.tensor([e.index for e in examples], dtype=torch.int64)
    label_lists = [shifted_labels(row) for row in seqs]
    num_tokens = sum(len(row.input_ids) for row in seqs)
    common = dict(example_ids=example_ids, rows_per_example=len(keep), num_tokens=num_tokens,
                  ref_logps=torch.tensor(ref, dtype=torch.float32) if with_ref_logps else None,
                  rewards=torch.tensor(rew, dtype=torch.float32) if with_rewards else None)
    if packed:
        lengths = [len(row.input_ids) for row in seqs]
        cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
        labels = torch.tensor([t for labels in label_lists for t in labels])
        batch = Batch(input_ids=torch.tensor([t for row in seqs for t in row.input_ids])[None], labels=labels,
                      valid_positions=valid_label_positions(labels),
                      position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
                      cu_seqlens=cu, packed=True, **common)
        return attach_token_values(batch, examples, keep, with_old_logps, with_ref_token_logps)
    width = max(len(row.input_ids) for row in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.int64)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.int64)
    for i, (row, row_labels) in enumerate(zip(seqs, label_lists)):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row_labels)
        attention_mask[i, :n] = 1
    batch = Batch(input_ids=input_ids, labels=labels, attention_mask=attention_mask, packed=False,
                  valid_positions=valid_label_positions(labels), **common)
    return attach_token_values(batch, examples, keep, with_old_logps, with_ref_token_logps)


def attach_token_values(batch: Batch, examples: Sequence[TrainExample], rows: Sequence[int] | None,
                        old_logps: bool, ref_token_logps: bool) -> Batch:
    """Set ``batch.old_logps`` / ``batch.ref_token_logps`` (as asked) from the examples' per-token
    values (:func:`token_values`); ``batch`` holds the examples' kept ``rows`` in any layout whose
    valid label positions run row by row (what :func:`collate` and the prompt-shared loss view build)."""
    if old_logps:
        batch.set_token_values("old_logps", token_values(examples, rows, "old_token_logps"))
    if ref_token_logps:
        batch.set_token_values("ref_token_logps", token_values(examples, rows, "ref_token_logps"))
    return batch


class ExampleOrder:
    """A deterministic, resumable order of micro-batches over ``num_examples`` examples.

    Epoch ``e`` visits ``torch.randperm(num_examples)`` drawn from a generator seeded with
    ``seed + e`` (or ``0..N-1`` without shuffling). Rank ``r`` of ``world_size`` takes positions
    ``r, r + world_size, ...`` of that order; the tail that does not fill a micro-batch on every rank
    is dropped, so all ranks step together. Micro-batch number ``m`` (counted from the start of
    training) is fully determined by ``m``: resuming needs only that counter.
    """

    def __init__(self, num_examples: int, examples_per_batch: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        if examples_per_batch < 1:
            raise ValueError(f"examples_per_batch must be >= 1, got {examples_per_batch}")
        self.num_examples, self.examples_per_batch = num_examples, examples_per_batch
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.batches_per_epoch = (num_examples // world_size) // examples_per_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_examples} examples cannot fill one micro-batch of {examples_per_batch} "
                             f"examples on each of {world_size} rank(s)")
        self._epoch, self._local = None, None

    def _local_order(self, epoch: int) -> list[int]:
        if self._epoch != epoch:
            if self.shuffle:
                order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch))
            else:
                order = torch.arange(self.num_examples)
            self._epoch, self._local = epoch, order[self.rank::self.world_size].tolist()
        return self._local

    def batch(self, micro_batch: int) -> list[int]:
        """Example indices of micro-batch number ``micro_batch`` on this rank."""
        epoch, position = divmod(micro_batch, self.batches_per_epoch)
        start = position * self.examples_per_batch
        return self._local_order(epoch)[start:start + self.examples_per_batch]
