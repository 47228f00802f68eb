"""The trainer's stages on vLLM: generate --engine vllm writes the HF engine's records and metadata
(greedy: the same file), resumes, and its negatives go through ref-logps and DFT training; on-policy
training with --sample-engine vllm pushes the policy's weights into the colocated engine before
every sampling round and learns from its rollouts.

Each generate / train call builds (and closes) its own engine: 4 engine loads in this module.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from train_helpers import write_jsonl
from vllm_helpers import make_test_model, needs_vllm

from dftkern.train import synthetic
from dftkern.train.generate import GenerateConfig, SamplingConfig, decode, eos_token_ids, generate_samples
from dftkern.train.options import option_names
from dftkern.train.trainer import TrainConfig

pytestmark = needs_vllm

REWARD = "dftkern.train.synthetic:addition_reward"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_pipeline")
    records = synthetic.make_addition_records(16, max_digits=2, seed=5, id_prefix="q")
    model, tokenizer = make_test_model(root / "model")
    return {"root": root, "data": write_jsonl(root / "train.jsonl", records), "model": root / "model",
            "hf_model": model, "tokenizer": tokenizer}


def _generate(ws, out, **overrides):
    base = dict(model=str(ws["model"]), data=str(ws["data"]), out=str(ws["root"] / out), num_samples=4,
                max_new_tokens=8, reward=REWARD, device="cpu", progress=False)
    return generate_samples(GenerateConfig(**{**base, **overrides}))


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _meta(path):
    return json.loads(path.with_name(path.name + ".meta.json").read_text())


def test_greedy_generate_writes_the_hf_engines_file(ws):
    hf = _generate(ws, "greedy_hf.jsonl", engine="hf", temperature=0.0)
    vl = _generate(ws, "greedy_vllm.jsonl", engine="vllm", temperature=0.0)
    assert vl.read_text() == hf.read_text()  # same records, same order, same token ids and texts
    lines = _lines(vl)
    assert len({tuple(map(tuple, line["response_token_ids"])) for line in lines}) > 8  # varied answers
    assert _meta(hf).pop("engine") == "hf" and _meta(vl).pop("engine") == "vllm"
    hf_meta, vl_meta = _meta(hf), _meta(vl)
    assert {k: v for k, v in hf_meta.items() if k != "engine"} == {k: v for k, v in vl_meta.items() if k != "engine"}


def test_sampling_only_instruction_on_both_engines(ws):
    """The sampling-only template reaches vLLM as it reaches the HF engine: greedy files are identical,
    differ from the uninstructed ones, and keep the training prompt in every line."""
    template = "1+1=3<eos>2+2=5<eos>{prompt}"
    hf = _generate(ws, "instructed_hf.jsonl", engine="hf", temperature=0.0, sample_prompt_template=template)
    vl = _generate(ws, "instructed_vllm.jsonl", engine="vllm", temperature=0.0, sample_prompt_template=template)
    plain = _generate(ws, "plain_hf.jsonl", engine="hf", temperature=0.0)
    assert vl.read_text() == hf.read_text() != plain.read_text()
    assert [x["prompt"] for x in _lines(vl)] == [x["prompt"] for x in _lines(plain)]
    meta = _meta(vl)
    assert meta["sample_prompt_template"] == template and meta["sample_prompt_example"].startswith("<bos>1+1=3<eos>")
    assert meta["pool_stats"] == _meta(hf)["pool_stats"]


def test_sampled_generate_records_resume_and_settings(ws):
    settings = dict(engine="vllm", temperature=0.7, top_k=50, top_p=1.0, seed=3, batch_size=16)
    full = _generate(ws, "sampled.jsonl", **settings)
    hf = _generate(ws, "sampled_hf.jsonl", **{**settings, "engine": "hf"})
    a, b = _lines(full), _lines(hf)
    assert [x["prompt_id"] for x in a] == [x["prompt_id"] for x in b]
    assert [sorted(x) for x in a] == [sorted(x) for x in b]  # the same record fields
    for line in a:
        assert len(line["responses"]) == len(line["response_token_ids"]) == len(line["finished"]) == 4
        assert len(line["rewards"]) == 4
        for tokens, finished in zip(line["response_token_ids"], line["finished"]):
            assert (tokens[-1] == 2) == finished and (finished or len(tokens) == 8)
    assert sum(x["response_token_ids"] != y["response_token_ids"] for x, y in zip(a, b)) > 8  # other RNG
    meta = _meta(full)
    assert meta["engine"] == "vllm" and (meta["temperature"], meta["top_k"], meta["top_p"], meta["seed"]) == \
        (0.7, 50, 1.0, 3)
    # resume after a kill: keep 5 complete lines and a torn one; other batch size -> the same file
    text = full.read_text()
    partial = ws["root"] / "resumed.jsonl"
    cut = text.splitlines(keepends=True)
    partial.write_text("".join(cut[:5]) + cut[5][:7])
    partial.with_name(partial.name + ".meta.json").write_text(
        full.with_name(full.name + ".meta.json").read_text())
    _generate(ws, "resumed.jsonl", **{**settings, "batch_size": 8})
    assert partial.read_text() == text
    with pytest.raises(ValueError, match=r"different settings \(engine\)"):
        _generate(ws, "resumed.jsonl", **{**settings, "engine": "hf"})


def test_dft_trains_on_vllm_negatives(ws):
    from dftkern.train.ref_logps import RefLogpsConfig, compute_ref_logps
    from dftkern.train.trainer import train

    negatives = _generate(ws, "negatives.jsonl", engine="vllm", temperature=0.7, top_k=50, seed=1)
    cache = compute_ref_logps(RefLogpsConfig(model=str(ws["model"]), data=str(ws["data"]), negatives=str(negatives),
                                             device="cpu", progress=False))
    result = train(TrainConfig(model=str(ws["model"]), data=str(ws["data"]), out=str(ws["root"] / "dft"), loss="dft",
                   negatives=str(negatives), ref_logps=str(cache), batch_size=4, max_steps=3, lr=1e-3,
                   device="cpu", progress=False, plot=False))
    assert result.steps == 3 and (result.final_checkpoint / "model.safetensors").exists()
    metrics = _lines(ws["root"] / "dft" / "metrics.jsonl")
    assert len(metrics) == 3 and all(math.isfinite(m["loss"]) for m in metrics)


@pytest.mark.skipif("sample_engine" not in option_names(TrainConfig),
                    reason="train has no --sample-engine yet (the on-policy vLLM wiring of onpolicy.py/trainer.py "
                           "is pending in the trainer's owner's branch)")
def test_on_policy_with_colocated_vllm_pushes_weights_and_learns(tmp_path, monkeypatch):
    from dftkern.train import vllm_engine
    from dftkern.train.trainer import train

    tokenizer = synthetic.build_char_tokenizer()  # plain small init: starts near-uniform, learns fast
    synthetic.make_tiny_llama(tokenizer, hidden_size=128, num_layers=2, num_heads=2, max_positions=64, seed=0,
                              save_dir=tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", synthetic.make_addition_records(24, max_digits=2, seed=3))
    probe = [tokenizer.encode(t) for t in ("1+2=", "45+6=", "70+70=")]
    pushes = []
    original = vllm_engine.VLLMSampler.update_weights

    def checked_update(self, weights):
        """After every push, the engine decodes (greedy) exactly what the trainer's model decodes."""
        original(self, weights)
        greedy = SamplingConfig(6, 0.0)
        eos = eos_token_ids(weights, tokenizer)
        expected = decode(weights, probe, sampling=greedy, eos_ids=eos, pad_token_id=0)
        pushes.append((self.sample(probe, n=1, sampling=greedy, eos_ids=eos) == expected,
                       weights.model.embed_tokens.weight.detach().clone()))

    monkeypatch.setattr(vllm_engine.VLLMSampler, "update_weights", checked_update)
    steps = 30
    train(TrainConfig(model=str(tmp_path / "model"), data=str(data), out=str(tmp_path / "rl"), loss="rloo",
                      on_policy=True, sample_engine="vllm", reward="train_helpers:starts_with_one",
                      samples_per_prompt=4, sample_max_new_tokens=3, batch_size=8, max_steps=steps, lr=3e-3,
                      device="cpu", progress=False, plot=False))
    assert len(pushes) == steps  # refresh_every=1: one push per sampling round
    assert all(same for same, _ in pushes)
    assert not torch.equal(pushes[0][1], pushes[-1][1])  # the policy moved, and the engine followed
    rewards = [m["sample_reward"] for m in _lines(tmp_path / "rl" / "metrics.jsonl")]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, rewards  # learning from the engine's rollouts
