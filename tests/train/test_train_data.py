"""Data stage: record formats, precise errors, tokenization, label shifting/masking, batching, order."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import write_jsonl

from dftkern.train.data import (
    IGNORE_INDEX,
    DataError,
    ExampleOrder,
    PromptRecord,
    Row,
    build_examples,
    collate,
    encode_prompt,
    encode_response,
    examples_fingerprint,
    make_row,
    read_prompt_records,
    read_sample_records,
    shifted_labels,
)

# --------------------------------------------------------------------------------------------- records


def test_reads_prompt_response_and_messages_records(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "1+1=", "response": "2"},
        "",  # blank lines are skipped but still counted for line numbers
        {"id": "chat-7", "messages": [{"role": "system", "content": "add"}, {"role": "user", "content": "2+2="},
                                      {"role": "assistant", "content": "4"}]},
        {"id": 12, "prompt": "3+3=", "response": "6"},
    ])
    records = read_prompt_records(path)
    assert [r.prompt_id for r in records] == ["0", "chat-7", "12"]
    assert records[0].prompt == "1+1=" and records[0].response == "2"
    assert records[1].messages[-1] == {"role": "user", "content": "2+2="} and records[1].response == "4"
    assert records[1].where.endswith("d.jsonl:3")


@pytest.mark.parametrize("line, field_hint", [
    ('{"prompt": "1+1="}', "missing field 'response'"),
    ('{"prompt": 5, "response": "2"}', "field 'prompt' must be a string, got int"),
    ('{"prompt": "a", "response": "b"', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}',
     "field 'messages[1].role' must be 'assistant'"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}',
     "field 'messages[0].content' must be a string"),
    ('{"messages": [{"role": "assistant", "content": "y"}]}', "field 'messages' must be a list of at least 2"),
    ('{"id": 1.5, "prompt": "a", "response": "b"}', "field 'id' must be a string or an integer"),
    ('{"prompt": "a", "response": "b", "messages": [{"role": "user", "content": "x"}, '
     '{"role": "assistant", "content": "y"}]}', "either field 'messages' or field 'prompt'"),
])
def test_malformed_record_error_names_file_line_and_field(tmp_path, line, field_hint):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "1+1=", "response": "2"}\n\n' + line + "\n")
    with pytest.raises(DataError) as err:
        read_prompt_records(path)
    assert f"{path}:3" in str(err.value)
    assert field_hint in str(err.value)


def test_duplicate_ids_and_empty_and_unknown_files(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [{"id": "a", "prompt": "x", "response": "y"},
                                                {"id": "a", "prompt": "z", "response": "w"}])
    with pytest.raises(DataError, match=r"dup.jsonl:2: field 'id' 'a' duplicates the record at .*dup.jsonl:1"):
        read_prompt_records(path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        read_prompt_records(tmp_path / "empty.jsonl")
    (tmp_path / "data.csv").write_text("prompt,response\n")
    with pytest.raises(DataError, match="unsupported data file type '.csv'"):
        read_prompt_records(tmp_path / "data.csv")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_prompt_records(tmp_path / "nope.jsonl")


def test_parquet_records_through_datasets(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the train extra (datasets) is not installed")

    datasets.Dataset.from_list([{"prompt": "1+2=", "response": "3"}, {"prompt": "4+4=", "response": "8"}]) \
        .to_parquet(str(tmp_path / "d.parquet"))
    records = read_prompt_records(tmp_path / "d.parquet")
    assert [(r.prompt, r.response) for r in records] == [("1+2=", "3"), ("4+4=", "8")]
    datasets.Dataset.from_list([{"prompt": "1+2=", "response": "3"}, {"prompt": "4+4=", "response": None}]) \
        .to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad.parquet:row 2: missing field 'response'"):
        read_prompt_records(tmp_path / "bad.parquet")


def test_sample_records_validation(tmp_path):
    good = {"prompt_id": "p", "responses": ["1", "2"], "response_token_ids": [[4, 2], [5, 2]], "rewards": [1, 0]}
    samples = read_sample_records(write_jsonl(tmp_path / "s.jsonl", [good]))
    assert samples["p"].rewards == (1.0, 0.0) and samples["p"].response_token_ids == ((4, 2), (5, 2))
    bad_cases = [
        (dict(good, response_token_ids=[[4, 2]]), "'response_token_ids' must be a list of 2 token lists"),
        (dict(good, response_token_ids=[[4, -1], [5]]), "'response_token_ids[0]' must be a list of token ids"),
        (dict(good, rewards=[1, "x"]), "field 'rewards' must hold numbers"),
        (dict(good, responses=[]), "field 'responses' must be a non-empty list"),
    ]
    for record, hint in bad_cases:
        with pytest.raises(DataError, match=r"s2.jsonl:1: .*" + hint.replace("[", r"\[").replace("]", r"\]")):
            read_sample_records(write_jsonl(tmp_path / "s2.jsonl", [record]))


# --------------------------------------------------------------------------------------------- tokenization


def test_labels_are_shifted_and_mask_prompt_and_last_position():
    row = Row(input_ids=(1, 10, 11, 12, 20, 21, 2), prompt_len=4)  # BOS + 3 prompt chars, then "20 21 EOS"
    assert shifted_labels(row) == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 20, 21, 2, IGNORE_INDEX]


def test_make_row_truncation_keeps_prompt_end_and_response_start():
    row = make_row([1, 2, 3, 4], [5, 6, 7], max_length=6)
    assert row.input_ids == (1, 2, 3, 4, 5, 6) and row.prompt_len == 4
    row = make_row([1, 2, 3, 4, 5, 6, 7], [8, 9], max_length=4)  # prompt alone too long: cut at its start
    assert row.input_ids == (5, 6, 7, 8) and row.prompt_len == 3
    with pytest.raises(ValueError, match="at least one token"):
        make_row([1], [], None)


def test_plain_tokenization_adds_bos_and_eos(tokenizer):
    record = PromptRecord("0", "12", prompt="7+5=")
    prompt = encode_prompt(tokenizer, record)
    response = encode_response(tokenizer, record)
    assert prompt[0] == tokenizer.bos_token_id and tokenizer.decode(prompt[1:]) == "7+5="
    assert response[-1] == tokenizer.eos_token_id and tokenizer.decode(response[:-1]) == "12"


def test_chat_template_separates_prompt_from_answer(tokenizer):
    chat_tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    chat_tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}={{ m['content'] }}"
                                    "{{ eos_token }}{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
                                    "{% if add_generation_prompt %}={% endif %}")
    record = PromptRecord("0", "42", messages=({"role": "user", "content": "40+2"},))
    prompt = encode_prompt(chat_tokenizer, record)
    response = encode_response(chat_tokenizer, record)
    assert chat_tokenizer.decode(prompt) == "40+2="
    assert response == chat_tokenizer("42", add_special_tokens=False)["input_ids"] + [chat_tokenizer.eos_token_id]
    # disabling the template: plain text with BOS; messages then need a template
    assert encode_prompt(chat_tokenizer, PromptRecord("1", "3", prompt="1+2="), use_chat_template=False)[0] == \
        chat_tokenizer.bos_token_id
    with pytest.raises(DataError, match="need a tokenizer with a chat template"):
        encode_prompt(chat_tokenizer, record, use_chat_template=False)


def test_build_examples_uses_sampled_token_ids_verbatim(workspace, tokenizer):
    records = read_prompt_records(workspace.data)
    samples = read_sample_records(workspace.negatives)
    examples = build_examples(tokenizer, records, samples)
    first = examples[0]
    assert len(first.rows) == 3 and first.index == 0
    sample = samples[first.prompt_id]
    for row, ids in zip(first.rows[1:], sample.response_token_ids):
        assert row.input_ids[row.prompt_len:] == ids
        assert row.input_ids[:row.prompt_len] == first.rows[0].input_ids[:first.rows[0].prompt_len]
    assert first.rewards[0] == 1.0 and first.rewards[1:] == list(sample.rewards)
    one = build_examples(tokenizer, records, samples, num_negatives=1)
    assert all(len(e.rows) == 2 for e in one)
    assert examples_fingerprint(one) != examples_fingerprint(examples)
    assert examples_fingerprint(build_examples(tokenizer, records, samples)) == examples_fingerprint(examples)
    with pytest.raises(DataError, match="has 2 samples, 3 needed"):
        build_examples(tokenizer, records, samples, num_negatives=3)
    with pytest.raises(DataError, match="has no sampled negatives"):
        build_examples(tokenizer, records, {})


# --------------------------------------------------------------------------------------------- batches


def test_padded_and_packed_batches_hold_the_same_rows(workspace, tokenizer):
    examples = build_examples(tokenizer, read_prompt_records(workspace.data)[:3],
                              read_sample_records(workspace.negatives))
    for ex in examples:
        ex.ref_logps = [-1.0, -2.0, -3.0]
    padded = collate(examples, pad_token_id=0, with_ref_logps=True, with_rewards=True)
    packed = collate(examples, pad_token_id=0, packed=True, with_ref_logps=True, with_rewards=True)
    assert padded.input_ids.shape[0] == 9 and padded.rows_per_example == 3
    cu = packed.cu_seqlens.tolist()
    for r in range(9):
        n = int(padded.attention_mask[r].sum())
        assert cu[r + 1] - cu[r] == n
        assert torch.equal(packed.input_ids[0, cu[r]:cu[r + 1]], padded.input_ids[r, :n])
        assert torch.equal(packed.labels[cu[r]:cu[r + 1]], padded.labels[r, :n])
        assert packed.position_ids[0, cu[r]:cu[r + 1]].tolist() == list(range(n))
        assert (padded.labels[r, n:] == IGNORE_INDEX).all()
    assert packed.ref_logps.tolist() == [-1.0, -2.0, -3.0] * 3 and packed.rewards.shape == (3, 3)
    positives = collate(examples, pad_token_id=0, rows=[0])
    assert positives.input_ids.shape[0] == 3 and positives.rows_per_example == 1
    with pytest.raises(ValueError, match="has no reference log-probs"):
        collate(build_examples(tokenizer, read_prompt_records(workspace.data)[:1]), pad_token_id=0,
                with_ref_logps=True)


def test_example_order_is_deterministic_sharded_and_resumable():
    single = ExampleOrder(10, 2, seed=5)
    assert single.batches_per_epoch == 5
    epoch0 = [i for m in range(5) for i in single.batch(m)]
    assert sorted(epoch0) == list(range(10))
    epoch1 = [i for m in range(5, 10) for i in single.batch(m)]
    assert sorted(epoch1) == list(range(10)) and epoch1 != epoch0
    assert ExampleOrder(10, 2, seed=5).batch(7) == single.batch(7)  # a fresh object (resume) agrees
    rank0, rank1 = (ExampleOrder(10, 2, seed=5, rank=r, world_size=2) for r in (0, 1))
    assert rank0.batches_per_epoch == 2  # 5 per rank -> 2 full micro-batches, tail dropped
    for m in range(2):
        both = rank0.batch(m) + rank1.batch(m)
        assert sorted(both) == sorted(single.batch(2 * m) + single.batch(2 * m + 1))
        assert not set(rank0.batch(m)) & set(rank1.batch(m))
    assert ExampleOrder(4, 2, seed=0, shuffle=False).batch(1) == [2, 3]
    with pytest.raises(ValueError, match="cannot fill one micro-batch"):
        ExampleOrder(3, 2, seed=0, world_size=2)


def test_sample_file_line_for_record_has_json_object(workspace):
    first = json.loads(workspace.negatives.read_text().splitlines()[0])
    assert set(first) >= {"prompt_id", "responses", "response_token_ids", "finished", "rewards", "positive_reward"}


# --------------------------------------------------------------------------------------------- pools


def _pool(responses, rewards=None, positive_reward=None):
    from dftkern.train.records import SampleRecord

    ids = tuple((4 + j,) for j in range(len(responses)))
    return SampleRecord("p", tuple(responses), ids, None if rewards is None else tuple(rewards), positive_reward,
                        "neg.jsonl:1")


def test_judge_samples_correct_by_the_positives_reward_or_a_threshold_and_equal_by_text():
    from dftkern.train.records import judge_samples

    record = PromptRecord("p", "17", prompt="12+5=")
    pool = _pool(["17", " 17\n", "71", "1"], rewards=[1.0, 1.0, 0.0, 0.5], positive_reward=1.0)
    assert judge_samples(record, pool) == ((True, True, False, False), (True, True, False, False))
    assert judge_samples(record, pool, correct_threshold=0.5)[0] == (True, True, False, True)
    assert judge_samples(record, _pool(["17", "3"])) == (None, (True, False))  # no rewards: equality only
    with pytest.raises(DataError, match=r"neg.jsonl:1: field 'positive_reward' is missing.*--correct-threshold"):
        judge_samples(record, _pool(["3"], rewards=[0.0]))


def test_pool_candidates_filter_and_fallback():
    from dftkern.train.records import pool_candidates

    record = PromptRecord("p", "17", prompt="12+5=")
    pool = _pool(["17", "18", "71", "17"], rewards=[1.0, 0.0, 1.0, 1.0], positive_reward=1.0)
    assert pool_candidates(record, pool) == ([0, 1, 2, 3], False)
    assert pool_candidates(record, pool, filtered=True) == ([1], False)  # 2 is correct by the verifier
    assert pool_candidates(record, pool, filtered=True, correct_threshold=2.0) == ([1, 2], False)
    everything_right = _pool(["17", "17"], rewards=[1.0, 1.0], positive_reward=1.0)
    assert pool_candidates(record, everything_right, filtered=True) == ([0, 1], True)


def test_rotate_negatives_takes_fresh_slices_each_epoch_then_wraps():
    from dftkern.train.records import rotate_negatives

    pool = list(range(6))
    epochs = [rotate_negatives(pool, 2, e) for e in range(4)]
    assert epochs == [[0, 1], [2, 3], [4, 5], [0, 1]]
    assert rotate_negatives([3, 5, 8], 2, 1) == [8, 3]  # over filtered candidates, wrapping
    assert rotate_negatives([7], 3, 0) == [7, 7, 7]
    for bad in (dict(k=0, epoch=0), dict(k=2, epoch=-1), dict(k=True, epoch=0)):
        with pytest.raises(ValueError, match="must be an integer"):
            rotate_negatives(pool, **bad)
    with pytest.raises(ValueError, match="at least one candidate"):
        rotate_negatives([], 1, 0)


def test_pool_stats_counts_and_the_streamed_file_agrees(tmp_path):
    from dftkern.train.records import SampleRecord, pool_stats, pool_stats_of_file

    records = [PromptRecord("a", "3", prompt="1+2="), PromptRecord("b", "5", prompt="2+3=")]
    lines = [{"prompt_id": "a", "responses": ["3", "3", "4"], "response_token_ids": [[6], [6], [7]],
              "rewards": [1.0, 1.0, 0.0], "positive_reward": 1.0},
             {"prompt_id": "b", "responses": ["5", "05", "6"], "response_token_ids": [[8], [3, 8], [9]],
              "rewards": [1.0, 1.0, 0.0], "positive_reward": 1.0}]
    path = write_jsonl(tmp_path / "neg.jsonl", lines)
    expected = {"prompts": 2, "samples": 6, "frac_equal_positive": 3 / 6, "frac_prompts_all_equal_positive": 0.0,
                "correct_rule": "reward >= positive_reward (the good answer's reward)", "prompts_with_rewards": 2,
                "frac_correct": 4 / 6, "mean_reward": 4 / 6, "frac_filtered": 4 / 6,
                "frac_prompts_unfilterable": 0.0}
    assert pool_stats(records, read_sample_records(path)) == expected
    assert pool_stats_of_file(path, records) == expected
    assert pool_stats_of_file(path, records, correct_threshold=2.0)["frac_correct"] == 0.0
    no_rewards = {"a": SampleRecord("a", ("3", "3"), ((6,), (6,)))}
    assert pool_stats(records[:1], no_rewards) == {"prompts": 1, "samples": 2, "frac_equal_positive": 1.0,
                                                   "frac_prompts_all_equal_positive": 1.0}
    with pytest.raises(DataError, match="prompt id 'b' has no sampled negatives"):
        pool_stats(records, no_rewards)
    with pytest.raises(DataError, match=r"neg.jsonl:2: prompt_id 'b' is not in the data file"):
        pool_stats_of_file(path, records[:1])
