"""Data errors name file, line and field (bytes that are not UTF-8, token ids outside the vocabulary,
empty token lists), and rows longer than --max-length are never cut silently (--overlong)."""

from __future__ import annotations

import json
import warnings

import pytest
from train_helpers import small_run, write_jsonl

from dftkern.train.cli import main
from dftkern.train.data import (
    DataError,
    OverlongReport,
    PromptRecord,
    build_examples,
    examples_fingerprint,
    read_prompt_records,
    read_sample_records,
)
from dftkern.train.ref_logps import RefLogpsConfig, compute_ref_logps
from dftkern.train.trainer import train


def _cfg(workspace, out, **overrides):
    return small_run(workspace, out, **{**dict(loss="dpo", max_steps=1), **overrides})


# --------------------------------------------------------------------------------------------- bytes


def test_bytes_that_are_not_utf8_name_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2=", "response": "4\xff"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'response' is not valid UTF-8 \(byte 0xff\)"):
        read_prompt_records(path)
    path.write_bytes(b'{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2=", \xfe"response": "4"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid UTF-8 \(byte 0xfe at byte 20 of the line"):
        read_prompt_records(path)
    samples = tmp_path / "neg.jsonl"
    samples.write_bytes(b'{"prompt_id": "0", "responses": ["\xc3"], "response_token_ids": [[4]]}\n')
    with pytest.raises(DataError, match=r"neg\.jsonl:1: field 'responses\[0\]' is not valid UTF-8 \(byte 0xc3\)"):
        read_sample_records(samples)
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "1+1=", "response": "2"}\n')  # a byte-order mark is fine
    assert read_prompt_records(path)[0].response == "2"


# --------------------------------------------------------------------------------------------- token ids


def _negatives_with(workspace, tmp_path, line_no: int, **changes):
    lines = [json.loads(line) for line in workspace.negatives.read_text().splitlines()]
    lines[line_no - 1].update(changes)
    return write_jsonl(tmp_path / "neg.jsonl", lines)


def test_token_ids_outside_the_vocabulary_name_file_line_and_field(workspace, tokenizer, tmp_path):
    vocab = len(tokenizer)
    negatives = _negatives_with(workspace, tmp_path, 3, response_token_ids=[[4, 2], [5, vocab, 2]])
    with pytest.raises(DataError, match=rf"neg\.jsonl:3: field 'response_token_ids\[1\]\[1\]' is {vocab}, outside "
                                        rf"the model's vocabulary \[0, {vocab}\)"):
        read_sample_records(negatives, vocab_size=vocab)
    assert read_sample_records(negatives)["ex-2"].response_token_ids[1][1] == vocab  # no vocabulary: not checked
    with pytest.raises(DataError, match=r"neg\.jsonl:3: field 'response_token_ids\[1\]\[1\]'"):
        train(_cfg(workspace, tmp_path / "run", negatives=str(negatives)))
    with pytest.raises(DataError, match=r"neg\.jsonl:3: field 'response_token_ids\[1\]\[1\]'"):
        compute_ref_logps(RefLogpsConfig(model=str(workspace.model), data=str(workspace.data),
                                         negatives=str(negatives), device="cpu", progress=False))


def test_empty_token_lists_and_empty_responses_name_file_line_and_field(workspace, tokenizer, tmp_path):
    negatives = _negatives_with(workspace, tmp_path, 2, response_token_ids=[[4, 2], []])
    with pytest.raises(DataError, match=r"neg\.jsonl:2: field 'response_token_ids\[1\]' is empty"):
        read_sample_records(negatives)
    chat = type(tokenizer).from_pretrained(tokenizer.name_or_path)  # renders nothing for the answer
    chat.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}={% endif %}"
                          "{% endfor %}")
    record = PromptRecord("0", "42", messages=({"role": "user", "content": "40+2"},), where="d.jsonl:7")
    with pytest.raises(DataError, match=r"d\.jsonl:7: field 'messages' gives no tokens"):
        build_examples(chat, [record])


# --------------------------------------------------------------------------------------------- overlong rows


def test_truncation_is_counted_and_never_silent(workspace, tokenizer):
    records = read_prompt_records(workspace.data)
    samples = read_sample_records(workspace.negatives)
    full = build_examples(tokenizer, records, samples)
    longest = max(len(row.input_ids) for e in full for row in e.rows)
    report = OverlongReport()
    cut = build_examples(tokenizer, records, samples, max_length=longest - 1, report=report)
    too_long = sum(len(row.input_ids) > longest - 1 for e in full for row in e.rows)
    assert report.truncated == too_long > 0 and report.rows == 3 * len(records)
    assert f"{too_long} of {3 * len(records)} rows are longer than --max-length {longest - 1}" in report.message("x")
    assert all(len(row.input_ids) <= longest - 1 for e in cut for row in e.rows)
    with pytest.warns(UserWarning, match="rows are longer than --max-length"):  # no report given: a warning
        build_examples(tokenizer, records, samples, max_length=longest - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_examples(tokenizer, records, samples, max_length=longest)  # nothing cut: quiet

    dropped = OverlongReport()
    kept = build_examples(tokenizer, records, samples, max_length=longest - 1, overlong="drop", report=dropped)
    long_examples = {e.prompt_id for e in full if any(len(r.input_ids) > longest - 1 for r in e.rows)}
    assert [e.prompt_id for e in kept] == [e.prompt_id for e in full if e.prompt_id not in long_examples]
    assert [e.index for e in kept] == list(range(len(kept)))  # DFTState ids stay consecutive
    assert dropped.dropped_examples == len(long_examples) and dropped.truncated == 0
    assert "dropped" in dropped.message("x") and "(--overlong drop)" in dropped.message("x")
    with pytest.raises(DataError, match="no example is left"):
        build_examples(tokenizer, records, samples, max_length=3, overlong="drop")


def test_overlong_drop_trains_end_to_end_and_reports_once(workspace, tokenizer, tmp_path, capsys):
    examples = build_examples(tokenizer, read_prompt_records(workspace.data), read_sample_records(workspace.negatives))
    limit = max(len(row.input_ids) for e in examples for row in e.rows) - 1  # the longest rows do not fit
    negatives = tmp_path / "neg.jsonl"
    negatives.write_text(workspace.negatives.read_text())
    common = ["--model", str(workspace.model), "--data", str(workspace.data), "--negatives", str(negatives),
              "--max-length", str(limit), "--overlong", "drop", "--device", "cpu", "--no-progress"]
    assert main(["ref-logps", *common]) == 0
    assert main(["train", *common, "--out", str(tmp_path / "run"), "--loss", "dft", "--batch-size", "4",
                 "--max-steps", "2", "--no-plot"]) == 0
    err = capsys.readouterr().err
    assert err.count("ref-logps: dropped") == 1 and err.count("train: dropped") == 1
    kept = build_examples(tokenizer, read_prompt_records(workspace.data), read_sample_records(negatives),
                          max_length=limit, overlong="drop", report=OverlongReport())
    assert list(tmp_path.glob(f"ref_logps-{examples_fingerprint(kept)[:16]}.safetensors"))
    config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert config["num_examples"] == len(kept) < len(examples)


def test_truncation_is_reported_by_train(workspace, tmp_path, capsys):
    train(_cfg(workspace, tmp_path / "run", loss="sft", negatives=None, max_length=6))
    err = capsys.readouterr().err
    assert err.count("rows are longer than --max-length 6 tokens and were truncated") == 1
    with pytest.raises(ValueError, match="--overlong drop\\) is not supported with on_policy"):
        _cfg(workspace, tmp_path, negatives=None, on_policy=True, reward="addition", overlong="drop")
    with pytest.raises(ValueError, match="overlong must be one of"):
        _cfg(workspace, tmp_path, overlong="cut")
