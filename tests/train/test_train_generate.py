"""Generate stage: seed determinism, batch independence, resume, settings check, decoding filters."""

from __future__ import annotations

import json

import pytest
import torch

from dftkern.train.generate import (
    GenerateConfig,
    SamplingConfig,
    _filter_logits,
    decode,
    generate_samples,
)
from dftkern.train.model import load_causal_lm


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
