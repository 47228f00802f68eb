"""Generate stage: seed determinism, batch independence, resume, settings check, decoding filters; the
sampling-only instruction, the metadata and pool statistics, ref-logps scoring under the training prompt,
and the pool cache that per-epoch K-subsets index."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import write_jsonl

from dftkern.train.generate import (
    GenerateConfig,
    SamplingConfig,
    _filter_logits,
    decode,
    generate_samples,
)
from dftkern.train.model import load_causal_lm
from dftkern.train.records import DataError


def _config(workspace, out, **overrides):
    base = dict(model=str(workspace.model), data=str(workspace.data), out=str(out), num_samples=3, max_new_tokens=5,
                device="cpu", progress=False)
    return GenerateConfig(**{**base, **overrides})


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_same_samples_any_batch_size_other_seed_differs(workspace, tmp_path):
    a = _lines(generate_samples(_config(workspace, tmp_path / "a.jsonl", seed=7, batch_size=64)))
    b = _lines(generate_samples(_config(workspace, tmp_path / "b.jsonl", seed=7, batch_size=5)))
    c = _lines(generate_samples(_config(workspace, tmp_path / "c.jsonl", seed=8)))
    assert len(a) == 24 and all(len(line["responses"]) == 3 for line in a)
    assert [x["response_token_ids"] for x in a] == [x["response_token_ids"] for x in b]
    assert [x["response_token_ids"] for x in a] != [x["response_token_ids"] for x in c]
    # the three samples of one prompt are not copies of each other (own generator each)
    assert any(len({tuple(t) for t in x["response_token_ids"]}) > 1 for x in a)


def test_resume_skips_finished_prompts_and_repairs_a_torn_line(workspace, tmp_path, monkeypatch):
    full = generate_samples(_config(workspace, tmp_path / "full.jsonl", seed=1))
    expected = full.read_text()
    out = tmp_path / "partial.jsonl"
    lines = expected.splitlines(keepends=True)
    out.write_text("".join(lines[:10]) + lines[10][:17])  # killed while writing line 11
    generate_samples(_config(workspace, out, seed=1))
    assert out.read_text() == expected
    # a finished file: nothing is regenerated, the model is not even loaded
    import dftkern.train.generate as generate_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although every prompt is done")

    monkeypatch.setattr(generate_module, "load_causal_lm", no_model)
    generate_samples(_config(workspace, out, seed=1))
    assert out.read_text() == expected


def test_resume_with_other_settings_is_refused(workspace, tmp_path):
    out = generate_samples(_config(workspace, tmp_path / "s.jsonl", seed=1, limit=2))
    with pytest.raises(ValueError, match=r"different settings \(temperature\)"):
        generate_samples(_config(workspace, out, seed=1, limit=2, temperature=0.5))


def test_greedy_decode_matches_step_by_step_argmax(workspace):
    model = load_causal_lm(str(workspace.model), attn="sdpa", device="cpu")
    prompts = [[1, 4, 13, 5, 14], [1, 9, 9, 13, 7, 7, 14]]  # different lengths: left padding in the batch
    out = decode(model, prompts, sampling=SamplingConfig(max_new_tokens=4, temperature=0.0), eos_ids={2},
                 pad_token_id=0)
    for prompt, (tokens, finished) in zip(prompts, out):
        ids = list(prompt)
        expected = []
        with torch.no_grad():
            for _ in range(4):
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                expected.append(nxt)
                ids.append(nxt)
                if nxt == 2:
                    break
        assert tokens == expected and finished == (expected[-1] == 2)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(_filter_logits(logits, 2, 1.0)[0, 2:]).all()
    assert torch.isfinite(_filter_logits(logits, 2, 1.0)[0, :2]).all()
    kept = torch.isfinite(_filter_logits(logits, 0, 0.7)[0]).tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert torch.isfinite(_filter_logits(logits, 0, 0.4)[0]).tolist() == [True, False, False, False]


def test_sampling_config_validation():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        SamplingConfig(max_new_tokens=0)


# ------------------------------------------------------------------ sampling settings, instruction, pool


REWARD = "dftkern.train.synthetic:addition_reward"
WRONG_EXAMPLES = "1+1=3<eos>2+2=5<eos>{prompt}"  # a sampling-only "instruction" in the char alphabet


def _meta(path):
    return json.loads(path.with_name(path.name + ".meta.json").read_text())


def test_meta_records_sampling_settings_instruction_and_pool_stats(workspace, tmp_path, capsys):
    out = generate_samples(_config(workspace, tmp_path / "neg.jsonl", num_samples=4, temperature=0.7, top_k=5,
                                   top_p=0.9, seed=3, reward=REWARD, sample_prompt_template=WRONG_EXAMPLES))
    meta = _meta(out)
    assert {k: meta[k] for k in ("num_samples", "temperature", "top_k", "top_p", "seed", "engine", "reward",
                                 "sample_system_prompt", "sample_prompt_template", "model")} == {
        "num_samples": 4, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 3, "engine": "hf", "reward": REWARD,
        "sample_system_prompt": None, "sample_prompt_template": WRONG_EXAMPLES, "model": str(workspace.model)}
    assert "training prompt" in meta["ref_logps_scoring"] and "temperature 1" in meta["ref_logps_scoring"]
    first = json.loads(workspace.data.read_text().splitlines()[0])
    assert meta["sample_prompt_example"] == "<bos>1+1=3<eos>2+2=5<eos>" + first["prompt"]
    # the pool statistics, recounted here from the lines
    lines = _lines(out)
    answers = {json.loads(raw)["id"]: json.loads(raw)["response"] for raw in workspace.data.read_text().splitlines()}
    flat = [(line["prompt_id"], text, r, line["positive_reward"]) for line in lines
            for text, r in zip(line["responses"], line["rewards"])]
    stats = meta["pool_stats"]
    assert stats["prompts"] == 24 and stats["samples"] == 96 == len(flat)
    assert stats["frac_equal_positive"] == sum(t.strip() == answers[p] for p, t, _, _ in flat) / 96
    assert stats["frac_correct"] == sum(r >= pos for _, _, r, pos in flat) / 96
    assert stats["frac_filtered"] == sum(r >= pos or t.strip() == answers[p] for p, t, r, pos in flat) / 96
    assert stats["correct_rule"].startswith("reward >= positive_reward")
    err = capsys.readouterr().err
    assert "24 prompts, 96 samples" in err and f"{stats['frac_correct']:.1%} correct" in err
    # the lines keep the training prompt; the reward saw it too (addition_reward parses 'a+b=')
    assert all(line["prompt"] == answers_prompt for line, answers_prompt in
               zip(lines, [json.loads(raw)["prompt"] for raw in workspace.data.read_text().splitlines()]))


def test_the_instruction_changes_only_what_the_sampler_sees(workspace, tmp_path, monkeypatch):
    import dftkern.train.generate as generate_module
    from dftkern.train.model import load_tokenizer

    fed = []
    original = generate_module.decode

    def recording_decode(model, prompts, **kwargs):
        fed.extend(tuple(p) for p in prompts)
        return original(model, prompts, **kwargs)

    monkeypatch.setattr(generate_module, "decode", recording_decode)
    generate_samples(_config(workspace, tmp_path / "plain.jsonl", num_samples=1, seed=2))
    plain = list(fed)
    fed.clear()
    out = generate_samples(_config(workspace, tmp_path / "instructed.jsonl", num_samples=1, seed=2,
                                   sample_prompt_template=WRONG_EXAMPLES))
    tokenizer = load_tokenizer(str(workspace.model))
    prefix = tokenizer("1+1=3<eos>2+2=5<eos>", add_special_tokens=False)["input_ids"]
    assert len(fed) == len(plain) == 24
    assert all(instructed == (p[0], *prefix, *p[1:]) for instructed, p in zip(fed, plain))  # after <bos>
    assert [line["prompt"] for line in _lines(out)] == [line["prompt"] for line in _lines(tmp_path / "plain.jsonl")]


def test_instruction_errors(workspace, tmp_path, tokenizer):
    from dftkern.train.data import PromptRecord
    from dftkern.train.generate import encode_sampling_prompt

    with pytest.raises(ValueError, match=r"sample_prompt_template \(--sample-prompt-template\) must contain "
                                         r"'\{prompt\}'"):
        _config(workspace, tmp_path / "x.jsonl", sample_prompt_template="1+1=3")
    with pytest.raises(ValueError, match=r"--sample-system-prompt\) needs a chat template \(this tokenizer has none"
                                         r"\); for plain prompts use sample_prompt_template"):
        generate_samples(_config(workspace, tmp_path / "y.jsonl", sample_system_prompt="You are unhelpful."))
    with pytest.raises(ValueError, match=r"cannot encode: it becomes the unknown token '<pad>'"):
        generate_samples(_config(workspace, tmp_path / "z.jsonl", sample_prompt_template="Answer: {prompt}"))
    record = PromptRecord("0", "3", prompt="1+2=")
    assert encode_sampling_prompt(tokenizer, record) == encode_sampling_prompt(tokenizer, record, template="{prompt}")


def test_system_prompt_and_template_with_a_chat_template():
    from dftkern.train import synthetic
    from dftkern.train.data import PromptRecord, encode_prompt
    from dftkern.train.generate import encode_sampling_prompt

    chat = synthetic.build_char_tokenizer(synthetic.ADDITION_ALPHABET + "\n")
    chat.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{{ eos_token }}"
                          "{% elif m['role'] == 'assistant' %}={{ m['content'] }}{{ eos_token }}"
                          "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
                          "{% if add_generation_prompt %}={% endif %}")
    record = PromptRecord("0", "3", prompt="1+2")
    assert chat.decode(encode_prompt(chat, record)) == "1+2="
    assert chat.decode(encode_sampling_prompt(chat, record, system_prompt="9+9=0")) == "9+9=0<eos>1+2="
    assert chat.decode(encode_sampling_prompt(chat, record, system_prompt="9+9=0", template="5+{prompt}")) == \
        "9+9=0<eos>5+1+2="
    with_system = PromptRecord("1", "3", messages=({"role": "system", "content": "1"},
                                                   {"role": "user", "content": "1+2"}))
    assert chat.decode(encode_sampling_prompt(chat, with_system, system_prompt="0")) == "0\n\n1<eos>1+2="
    with pytest.raises(ValueError, match=r"needs a chat template \(--no-chat-template disabled it\)"):
        encode_sampling_prompt(chat, record, use_chat_template=False, system_prompt="0")


def test_resume_checks_the_instruction_and_accepts_files_from_before_it(workspace, tmp_path):
    out = generate_samples(_config(workspace, tmp_path / "r.jsonl", seed=1, limit=3,
                                   sample_prompt_template=WRONG_EXAMPLES))
    with pytest.raises(ValueError, match=r"different settings \(sample_prompt_template\)"):
        generate_samples(_config(workspace, out, seed=1, limit=3))
    # a file written before the engine / instruction settings existed resumes as hf without instruction
    legacy = generate_samples(_config(workspace, tmp_path / "legacy.jsonl", seed=1, limit=3))
    expected = legacy.read_text()
    meta = _meta(legacy)
    for key in ("engine", "sample_system_prompt", "sample_prompt_template", "pool_stats", "sample_prompt_example",
                "ref_logps_scoring"):
        meta.pop(key)
    legacy.with_name(legacy.name + ".meta.json").write_text(json.dumps(meta))
    legacy.write_text("".join(expected.splitlines(keepends=True)[:1]))
    generate_samples(_config(workspace, legacy, seed=1, limit=3))
    assert legacy.read_text() == expected and _meta(legacy)["engine"] == "hf"


def test_ref_logps_scores_instructed_negatives_under_the_training_prompt_at_temperature_1(workspace, tmp_path):
    """A negatives file sampled under an instruction (and at T=0.7) is scored exactly like the same token ids
    under the plain training prompt at temperature 1 -- checked against a float64 full-logits computation,
    which differs clearly from the log-probs under the instructed prompt."""
    from dftkern.train.data import encode_prompt, read_prompt_records
    from dftkern.train.model import load_tokenizer
    from dftkern.train.ref_logps import RefLogpsConfig, compute_ref_logps
    from safetensors.torch import load_file

    negatives = generate_samples(_config(workspace, tmp_path / "instructed.jsonl", num_samples=2, temperature=0.7,
                                         seed=4, sample_prompt_template=WRONG_EXAMPLES))
    cache = compute_ref_logps(RefLogpsConfig(model=str(workspace.model), data=str(workspace.data),
                                             negatives=str(negatives), device="cpu", progress=False))
    cached = load_file(str(cache))["row_logps"]
    model = load_causal_lm(str(workspace.model), attn="sdpa", device="cpu").double()
    tokenizer = load_tokenizer(str(workspace.model))
    prefix = tokenizer("1+1=3<eos>2+2=5<eos>", add_special_tokens=False)["input_ids"]

    def seq_logp(prompt, response):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        return sum(logp[len(prompt) - 1 + t, token].item() for t, token in enumerate(response))

    plain_gap = []
    for i, (record, line) in enumerate(zip(read_prompt_records(workspace.data), _lines(negatives))):
        prompt = encode_prompt(tokenizer, record)
        for j, response in enumerate(line["response_token_ids"]):
            expected = seq_logp(prompt, response)
            assert abs(cached[i, 1 + j].item() - expected) < 1e-4
            plain_gap.append(abs(seq_logp([prompt[0], *prefix, *prompt[1:]], response) - expected))
    assert max(plain_gap) > 1e-2  # scoring under the instruction would have given other numbers


def test_ref_logps_help_says_how_it_scores(capsys):
    from dftkern.train.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["ref-logps", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "scored under the training prompt at temperature 1" in text and "--sample-system-prompt" in text


def test_the_pool_is_scored_once_and_every_epochs_k_subset_indexes_it(workspace, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from dftkern.train.data import build_examples, read_prompt_records, read_sample_records
    from dftkern.train.model import load_tokenizer
    from dftkern.train.records import rotate_negatives
    from dftkern.train.ref_logps import (
        RefLogpsConfig,
        RefLogpsPool,
        attach_ref_logps,
        compute_ref_logps,
        negatives_view,
    )

    pool_file = generate_samples(_config(workspace, tmp_path / "pool.jsonl", num_samples=4, temperature=0.7, seed=5,
                                         reward=REWARD))
    ref = dict(model=str(workspace.model), data=str(workspace.data), device="cpu", progress=False)
    pool_cache = compute_ref_logps(RefLogpsConfig(negatives=str(pool_file), **ref))
    tokenizer = load_tokenizer(str(workspace.model))
    records, pool = read_prompt_records(workspace.data), read_sample_records(pool_file)
    examples = build_examples(tokenizer, records, pool)
    attach_ref_logps(examples, pool_cache)  # the full pool: the fingerprint matches
    cache = RefLogpsPool(pool_cache)
    assert len(cache) == 24 and cache.row_logps.shape == (24, 5)
    for epoch in range(3):
        picks = rotate_negatives(list(range(4)), 2, epoch)
        views = [negatives_view(e, picks) for e in examples]
        assert all(v.rewards == [e.rewards[r] for r in (0, 1 + picks[0], 1 + picks[1])]
                   for v, e in zip(views, examples))
        # the same K negatives as a per-epoch file (what the DFT study writes), looked up by content
        lines = [{"prompt_id": p, "responses": [pool[p].responses[i] for i in picks],
                  "response_token_ids": [list(pool[p].response_token_ids[i]) for i in picks]} for p in pool]
        epoch_file = write_jsonl(tmp_path / f"epoch-{epoch}.jsonl", lines)
        epoch_examples = build_examples(tokenizer, records, read_sample_records(epoch_file))
        looked_up = cache.lookup(epoch_examples)
        assert torch.equal(looked_up, torch.tensor([v.ref_logps for v in views]))
        if epoch == 0:  # scoring the epoch's rows anew gives the same numbers
            rescored = compute_ref_logps(RefLogpsConfig(negatives=str(epoch_file), **ref))
            torch.testing.assert_close(load_file(str(rescored))["row_logps"], looked_up, rtol=0, atol=1e-5)
    assert rotate_negatives(list(range(4)), 2, 2) == rotate_negatives(list(range(4)), 2, 0)
    # rows the pool never scored, prompts it does not have, views outside the pool
    with pytest.warns(UserWarning, match="truncated"):
        stranger = build_examples(tokenizer, records, read_sample_records(epoch_file), max_length=6)
    with pytest.raises(ValueError, match=r"row 0 of prompt id 'ex-0' \(6 tokens, prompt 5\) was not scored"):
        cache.lookup(stranger)
    stranger[0].prompt_id = "nope"
    with pytest.raises(ValueError, match="no rows for prompt id 'nope'"):
        cache.logps(stranger[0])
    with pytest.raises(ValueError, match="index 4 outside the 4 negatives of prompt id 'ex-0'"):
        negatives_view(examples[0], [0, 4])
    # a cache written before row hashes: refused by RefLogpsPool, rewritten by the ref-logps stage
    old = load_file(str(pool_cache))
    with safe_open(str(pool_cache), framework="pt") as handle:
        metadata = handle.metadata()
    save_file({"row_logps": old["row_logps"], "row_tokens": old["row_tokens"]}, str(pool_cache), metadata=metadata)
    with pytest.raises(DataError, match="has no 'row_hash'"):
        RefLogpsPool(pool_cache)
    with pytest.warns(UserWarning, match="recomputing the cache"):
        assert compute_ref_logps(RefLogpsConfig(negatives=str(pool_file), **ref)) == pool_cache
    assert torch.equal(RefLogpsPool(pool_cache).row_hash, cache.row_hash)
