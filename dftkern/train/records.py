"""Records: read and validate (prompt, good answer) data and sampled negatives; nothing is tokenized here.

Record files are JSON Lines (``.jsonl``/``.json``, one object per line) or Parquet (``.parquet``,
read with the ``datasets`` library). A record is either

* ``{"prompt": str, "response": str}``, or
* ``{"messages": [{"role": ..., "content": ...}, ..., {"role": "assistant", "content": ...}]}``
  (the last message is the answer; everything before it is the prompt),

with an optional ``"id"`` (string or integer; default: the record's 0-based position). A negatives
file (the generate stage's output) has one line per prompt: ``{"prompt_id", "responses",
"response_token_ids"}`` and optionally ``"rewards"`` and ``"positive_reward"``; its settings are in
``<file>.meta.json`` (:func:`generate_meta_path`, :func:`read_generate_meta`).

The ``M`` samples of a prompt are a *pool*: :func:`read_sample_records` keeps all of them, and
:func:`judge_samples`, :func:`pool_candidates`, :func:`rotate_negatives` and :func:`pool_stats`
(:func:`pool_stats_of_file` streams a file) say which samples are correct / equal to the good
answer, which a filter keeps, which K an epoch takes, and the fractions over the whole file
(reported by the generate stage).

Any problem is a :class:`DataError` naming the file, the 1-based line (Parquet: the row) and the
field: malformed JSON, bytes that are not UTF-8 (the field holding them when they are inside a
string), wrong types, duplicate ids, empty token lists, token ids outside the model's vocabulary.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DataError", "PromptRecord", "SampleRecord", "read_prompt_records", "read_sample_records",
           "generate_meta_path", "read_generate_meta", "answers_equal", "judge_samples", "pool_candidates",
           "rotate_negatives", "pool_stats", "pool_stats_of_file"]


class DataError(ValueError):
    """A malformed data file or record; the message names the file, the line (or row) and the field."""


@dataclass(frozen=True)
class PromptRecord:
    """One (prompt, good answer) example.

    Exactly one of ``prompt`` (plain text) and ``messages`` (the chat turns before the answer) is set.
    ``where`` is ``"file:line"`` (or ``"file:row N"``) for error messages.
    """

    prompt_id: str
    response: str
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    where: str = ""

    def prompt_messages(self) -> list[dict]:
        """The prompt as chat messages (a plain prompt becomes one user message)."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt}]

    def prompt_text(self) -> str:
        """A readable one-string form of the prompt (plain prompt, or the last user turn)."""
        if self.prompt is not None:
            return self.prompt
        return str(self.messages[-1]["content"]) if self.messages else ""


@dataclass(frozen=True)
class SampleRecord:
    """The K sampled responses for one prompt (one line of a ``generate`` output file).

    ``response_token_ids[j]`` are the exact sampled token ids of response j (EOS included when the
    sample finished), ``rewards`` the optional reward of each response, ``positive_reward`` the
    optional reward of the data's good answer.
    """

    prompt_id: str
    responses: tuple[str, ...]
    response_token_ids: tuple[tuple[int, ...], ...]
    rewards: tuple[float, ...] | None = None
    positive_reward: float | None = None
    where: str = ""


def _undecodable_field(value, name: str = "") -> tuple[str, int] | None:
    """``(field path, byte)`` of the first string in a parsed JSON value holding a byte that was not
    UTF-8 (decoded with ``surrogateescape``, such a byte is the character U+DC80 + byte)."""
    if isinstance(value, str):
        for char in value:
            if "\udc80" <= char <= "\udcff":
                return name, ord(char) - 0xDC00
        return None
    if isinstance(value, dict):
        items = ((f"{name}.{k}" if name else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{name}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for child_name, child in items:
        found = _undecodable_field(child, child_name)
        if found:
            return found
    return None


def _iter_json_lines(path: Path) -> Iterable[tuple[int, dict]]:
    """Yield (1-based line number, object) for each non-blank line; bad JSON or bytes that are not
    UTF-8 are a DataError naming the line (and the field, when the bad bytes are inside a string)."""
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                raw = raw[3:]
            line = raw.decode("utf-8", errors="surrogateescape")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as bad:
                    raise DataError(f"{path}:{line_no}: not valid UTF-8 (byte 0x{raw[bad.start]:02x} at byte "
                                    f"{bad.start + 1} of the line)") from None
                raise DataError(f"{path}:{line_no}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            found = _undecodable_field(obj)
            if found:
                raise DataError(f"{path}:{line_no}: field '{found[0]}' is not valid UTF-8 (byte 0x{found[1]:02x}); "
                                f"data files must be UTF-8")
            yield line_no, obj


def _iter_rows(path: str | os.PathLike) -> Iterable[tuple[str, dict]]:
    """Yield (location, record dict) from a JSONL or Parquet file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        for line_no, obj in _iter_json_lines(path):
            yield f"{path}:{line_no}", obj
    elif suffix == ".parquet":
        import datasets

        table = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
        for row_no, obj in enumerate(table, start=1):
            yield f"{path}:row {row_no}", obj
    else:
        raise DataError(f"{path}: unsupported data file type {suffix!r} (use .jsonl, .json or .parquet)")


def _record_id(obj: dict, where: str, position: int) -> str:
    value = obj.get("id")
    if value is None:
        return str(position)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: field 'id' must be a string or an integer, got {type(value).__name__}")
    return str(value)


def _parse_messages(value, where: str) -> tuple[tuple[dict, ...], str]:
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise DataError(f"{where}: field 'messages' must be a list of at least 2 messages "
                        f"(prompt turns, then the assistant answer)")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}: field 'messages[{i}]' must be an object, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise DataError(f"{where}: field 'messages[{i}].{key}' must be a string, got "
                                f"{type(message.get(key)).__name__}")
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: field 'messages[{len(messages) - 1}].role' must be 'assistant' (the last "
                        f"message is the answer), got {messages[-1]['role']!r}")
    return tuple(messages[:-1]), messages[-1]["content"]


def read_prompt_records(path: str | os.PathLike) -> list[PromptRecord]:
    """Read and validate (prompt, good answer) records; see the module docstring for the format.

    Raises:
        DataError: a malformed line/row (naming file, line and field), duplicate ids, or an empty file.
        FileNotFoundError: ``path`` does not exist.
    """
    records: list[PromptRecord] = []
    seen: dict[str, str] = {}
    for position, (where, obj) in enumerate(_iter_rows(path)):
        prompt_id = _record_id(obj, where, position)
        if obj.get("messages") is not None:
            if obj.get("prompt") is not None:
                raise DataError(f"{where}: give either field 'messages' or field 'prompt', not both")
            messages, response = _parse_messages(obj["messages"], where)
            record = PromptRecord(prompt_id, response, messages=messages, where=where)
        else:
            for key in ("prompt", "response"):
                if key not in obj or obj[key] is None:
                    raise DataError(f"{where}: missing field '{key}' (a record needs 'prompt' and 'response', "
                                    f"or 'messages')")
                if not isinstance(obj[key], str):
                    raise DataError(f"{where}: field '{key}' must be a string, got {type(obj[key]).__name__}")
            record = PromptRecord(prompt_id, obj["response"], prompt=obj["prompt"], where=where)
        if prompt_id in seen:
            raise DataError(f"{where}: field 'id' {prompt_id!r} duplicates the record at {seen[prompt_id]}")
        seen[prompt_id] = where
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _float_list(value, where: str, name: str, length: int) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise DataError(f"{where}: field '{name}' must be a list of {length} numbers")
    for j, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DataError(f"{where}: field '{name}' must hold numbers, got {type(v).__name__}")
        if not math.isfinite(v):
            raise DataError(f"{where}: field '{name}[{j}]' must be finite, got {v!r}")
    return tuple(float(v) for v in value)


def _parse_scores(obj: dict, where: str, count: int) -> tuple[tuple[float, ...] | None, float | None]:
    """The optional ``rewards`` (``count`` numbers) and ``positive_reward`` (a number) of a samples line."""
    rewards = obj.get("rewards")
    if rewards is not None:
        rewards = _float_list(rewards, where, "rewards", count)
    positive_reward = obj.get("positive_reward")
    if positive_reward is not None:
        if isinstance(positive_reward, bool) or not isinstance(positive_reward, (int, float)):
            raise DataError(f"{where}: field 'positive_reward' must be a number")
        if not math.isfinite(positive_reward):
            raise DataError(f"{where}: field 'positive_reward' must be finite, got {positive_reward!r}")
        positive_reward = float(positive_reward)
    return rewards, positive_reward


def _parse_responses(obj: dict, where: str) -> list[str]:
    responses = obj.get("responses")
    if not isinstance(responses, (list, tuple)) or not responses or not all(isinstance(r, str) for r in responses):
        raise DataError(f"{where}: field 'responses' must be a non-empty list of strings")
    return list(responses)


def _parse_prompt_id(obj: dict, where: str) -> str:
    prompt_id = obj.get("prompt_id")
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int)):
        raise DataError(f"{where}: field 'prompt_id' must be a string or an integer")
    return str(prompt_id)


def read_sample_records(path: str | os.PathLike, *, vocab_size: int | None = None) -> dict[str, SampleRecord]:
    """Read a ``generate`` output file into ``{prompt_id: SampleRecord}``.

    Each line: ``{"prompt_id", "responses": [str] * K, "response_token_ids": [[int]] * K}`` plus the
    optional ``"rewards": [float] * K`` and ``"positive_reward": float``. Every token list must be
    non-empty and, with ``vocab_size`` (the model's vocabulary size V), hold ids in ``[0, V)``.

    Raises:
        DataError: naming the file, the line and the field.
    """
    samples: dict[str, SampleRecord] = {}
    for where, obj in _iter_rows(path):
        prompt_id = _parse_prompt_id(obj, where)
        responses = _parse_responses(obj, where)
        token_ids = obj.get("response_token_ids")
        if not isinstance(token_ids, (list, tuple)) or len(token_ids) != len(responses):
            raise DataError(f"{where}: field 'response_token_ids' must be a list of {len(responses)} token lists")
        for j, ids in enumerate(token_ids):
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                             and t >= 0 for t in ids):
                raise DataError(f"{where}: field 'response_token_ids[{j}]' must be a list of token ids (ints >= 0)")
            if not ids:
                raise DataError(f"{where}: field 'response_token_ids[{j}]' is empty (a response needs at least one "
                                f"token)")
            if vocab_size is not None and max(ids) >= vocab_size:
                t = next(t for t, token in enumerate(ids) if token >= vocab_size)
                raise DataError(f"{where}: field 'response_token_ids[{j}][{t}]' is {ids[t]}, outside the model's "
                                f"vocabulary [0, {vocab_size}) (negatives sampled with another model or tokenizer?)")
        rewards, positive_reward = _parse_scores(obj, where, len(responses))
        if prompt_id in samples:
            raise DataError(f"{where}: prompt_id {prompt_id!r} appears twice (also at {samples[prompt_id].where})")
        samples[prompt_id] = SampleRecord(prompt_id, tuple(responses), tuple(tuple(ids) for ids in token_ids),
                                          rewards, positive_reward, where)
    return samples


# ---------------------------------------------------------------------------------------------
# The pool of samples of each prompt: judging, filtering, rotating, reporting
# ---------------------------------------------------------------------------------------------


def generate_meta_path(path: str | os.PathLike) -> Path:
    """Where the generate stage records the settings of the samples file ``path``: ``<path>.meta.json``."""
    path = Path(path)
    return path.with_name(path.name + ".meta.json")


def read_generate_meta(path: str | os.PathLike) -> dict | None:
    """The metadata of the samples file ``path`` (``<path>.meta.json``), or None when there is none.

    Raises:
        DataError: the metadata file exists but is not a JSON object (naming it).
    """
    meta_path = generate_meta_path(path)
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{meta_path}: not valid JSON ({err}); delete it or regenerate {Path(path).name}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def answers_equal(response: str, positive: str) -> bool:
    """Whether a sampled response is the good answer: the texts are equal once leading and trailing
    whitespace is stripped (``responses`` hold the decoded text, special tokens such as EOS skipped)."""
    return response.strip() == positive.strip()


def _judge(positive: str, responses: Sequence[str], rewards: Sequence[float] | None, positive_reward: float | None,
           correct_threshold: float | None, where: str) -> tuple[tuple[bool, ...] | None, tuple[bool, ...]]:
    """See :func:`judge_samples`."""
    equal = tuple(answers_equal(r, positive) for r in responses)
    if rewards is None:
        return None, equal
    if correct_threshold is not None:
        threshold = float(correct_threshold)
    elif positive_reward is None:
        raise DataError(f"{where}: field 'positive_reward' is missing, so a sample cannot be compared with the good "
                        f"answer; give a correct_threshold (--correct-threshold)")
    else:
        threshold = positive_reward
    return tuple(r >= threshold for r in rewards), equal


def judge_samples(record: PromptRecord, sample: SampleRecord, *,
                  correct_threshold: float | None = None) -> tuple[tuple[bool, ...] | None, tuple[bool, ...]]:
    """``(correct, equal)``: one flag per sample of ``sample`` (the pool of ``record``'s prompt).

    * ``correct[j]``: ``rewards[j] >= threshold``, where the threshold is ``correct_threshold``
      or, by default, the good answer's own reward (``positive_reward``): a sample is "correct"
      when the verifier scores it at least as high as the data's answer. ``None`` when the line
      has no rewards (generated without ``--reward``).
    * ``equal[j]``: :func:`answers_equal` (``responses[j]``, ``record.response``).

    Raises:
        DataError: the line has rewards but no ``positive_reward`` and no threshold is given.
    """
    return _judge(record.response, sample.responses, sample.rewards, sample.positive_reward, correct_threshold,
                  sample.where)


def pool_candidates(record: PromptRecord, sample: SampleRecord, *, filtered: bool = False,
                    correct_threshold: float | None = None) -> tuple[list[int], bool]:
    """The pool indices training may draw negatives from, and whether the filter had to give up.

    Without ``filtered``: every index ``0..M-1``. With ``filtered``: the samples that are neither
    correct nor equal to the good answer (:func:`judge_samples`; without rewards only the
    equality filter applies); when that leaves none, every index again and ``True`` (the prompt
    is "unfilterable": count it, as :func:`pool_stats` does).
    """
    everything = list(range(len(sample.responses)))
    if not filtered:
        return everything, False
    correct, equal = judge_samples(record, sample, correct_threshold=correct_threshold)
    kept = [i for i in everything if not (equal[i] or (correct is not None and correct[i]))]
    return (kept, False) if kept else (everything, True)


def rotate_negatives(candidates: Sequence[int], k: int, epoch: int) -> list[int]:
    """The ``k`` pool indices an epoch uses: ``candidates[(epoch * k + j) % n]`` for ``j < k``.

    A pure function of ``(candidates, k, epoch)``, so resuming needs only the epoch number.
    Consecutive epochs take consecutive, disjoint slices while the pool lasts (``(epoch + 1) * k
    <= n``), then wrap around; with ``n < k`` an epoch repeats samples.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
    if not candidates:
        raise ValueError("rotate_negatives needs at least one candidate index")
    return [candidates[(epoch * k + j) % len(candidates)] for j in range(k)]


class _PoolCounter:
    """Accumulates :func:`pool_stats` one prompt at a time (so a large file is never held whole)."""

    def __init__(self, correct_threshold: float | None):
        self.threshold = correct_threshold
        self.prompts = self.samples = self.equal = self.all_equal = 0
        self.scored_prompts = self.scored = self.correct = self.filtered = self.unfilterable = 0
        self.reward_sum = 0.0

    def add(self, record: PromptRecord, responses, rewards, positive_reward, where: str) -> None:
        correct, equal = _judge(record.response, responses, rewards, positive_reward, self.threshold, where)
        self.prompts += 1
        self.samples += len(equal)
        self.equal += sum(equal)
        self.all_equal += all(equal)
        if correct is not None:
            dropped = sum(c or e for c, e in zip(correct, equal))
            self.scored_prompts += 1
            self.scored += len(correct)
            self.correct += sum(correct)
            self.reward_sum += sum(rewards)
            self.filtered += dropped
            self.unfilterable += dropped == len(correct)

    def result(self) -> dict:
        def frac(part, whole):
            return part / whole if whole else None

        out = {"prompts": self.prompts, "samples": self.samples, "frac_equal_positive": frac(self.equal, self.samples),
               "frac_prompts_all_equal_positive": frac(self.all_equal, self.prompts)}
        if self.scored_prompts:
            rule = (f"reward >= {float(self.threshold):g}" if self.threshold is not None
                    else "reward >= positive_reward (the good answer's reward)")
            out.update({"correct_rule": rule, "prompts_with_rewards": self.scored_prompts,
                        "frac_correct": frac(self.correct, self.scored),
                        "mean_reward": frac(self.reward_sum, self.scored),
                        "frac_filtered": frac(self.filtered, self.scored),
                        "frac_prompts_unfilterable": frac(self.unfilterable, self.scored_prompts)})
        return out


def pool_stats(records: Sequence[PromptRecord], samples: dict[str, SampleRecord], *,
               correct_threshold: float | None = None) -> dict:
    """What the pools of ``records`` hold: a dict with

    ``prompts``, ``samples`` (all of them), ``frac_equal_positive`` (samples equal to the good
    answer, :func:`answers_equal`), ``frac_prompts_all_equal_positive``; with rewards also
    ``correct_rule`` (the definition used, see :func:`judge_samples`), ``frac_correct``,
    ``mean_reward``, ``frac_filtered`` (correct or equal: what ``pool_candidates(filtered=True)``
    drops) and ``frac_prompts_unfilterable`` (every sample correct or equal). Lines without
    rewards do not count in those (``prompts_with_rewards`` says how many do). Fractions of
    nothing are None.

    Raises:
        DataError: a record has no line in ``samples`` (naming the record's file and line).
    """
    counter = _PoolCounter(correct_threshold)
    for record in records:
        sample = samples.get(record.prompt_id)
        if sample is None:
            raise DataError(f"{record.where}: prompt id {record.prompt_id!r} has no sampled negatives")
        counter.add(record, sample.responses, sample.rewards, sample.positive_reward, sample.where)
    return counter.result()


def pool_stats_of_file(path: str | os.PathLike, records: Sequence[PromptRecord], *,
                       correct_threshold: float | None = None) -> dict:
    """:func:`pool_stats` (the same keys) of every line of a samples file, read one line at a time
    (token ids are not kept), each judged against the record of its prompt id among ``records``.

    Raises:
        DataError: a malformed line, or a prompt id that is not among ``records`` (naming file and line).
    """
    by_id = {r.prompt_id: r for r in records}
    counter = _PoolCounter(correct_threshold)
    for where, obj in _iter_rows(path):
        prompt_id = _parse_prompt_id(obj, where)
        if prompt_id not in by_id:
            raise DataError(f"{where}: prompt_id {prompt_id!r} is not in the data file")
        responses = _parse_responses(obj, where)
        counter.add(by_id[prompt_id], responses, *_parse_scores(obj, where, len(responses)), where)
    return counter.result()

