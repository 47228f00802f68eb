"""Composed configs (ModelConfig / ObjectiveConfig / OptimConfig / OnPolicyConfig) with the old flat
keywords still working, rewards as callables in every API, and the on-policy example builder and
sampler protocol without a model."""

from __future__ import annotations

import dataclasses
import json

import pytest
from safetensors.torch import load_file

from dftkern.train.batching import ExampleOrder, Row
from dftkern.train.checkpoint import read_trainer_state
from dftkern.train.evaluate import EvalConfig, run_eval
from dftkern.train.generate import GenerateConfig, generate_samples
from dftkern.train.model import ModelConfig
from dftkern.train.objectives import ObjectiveConfig
from dftkern.train.onpolicy import (
    OnPolicyConfig,
    OnPolicyExamples,
    PromptSet,
    Sample,
    online_pair,
    on_policy_example,
)
from dftkern.train.options import flat_values
from dftkern.train.records import PromptRecord
from dftkern.train.ref_logps import RefLogpsConfig
from dftkern.train.trainer import OptimConfig, TrainConfig, train

BASE = dict(model="m", data="d.jsonl", out="run")


def test_flat_and_composed_configs_are_the_same():
    flat = TrainConfig(**BASE, loss="dpo", beta=0.2, lr=1e-4, batch_size=2, device="cpu", use_chat_template=False,
                       on_policy=True, reward="addition", sample_temperature=0.7, max_nonfinite_steps=5)
    composed = TrainConfig(model=ModelConfig("m", device="cpu", use_chat_template=False), data="d.jsonl", out="run",
                           objective=ObjectiveConfig(loss="dpo", beta=0.2), optim=OptimConfig(lr=1e-4, batch_size=2),
                           on_policy=OnPolicyConfig(reward="addition", temperature=0.7), max_nonfinite_steps=5)
    assert flat == composed
    assert flat.model.path == "m" and flat.optim.lr == 1e-4 and flat.on_policy.temperature == 0.7
    assert TrainConfig(**flat_values(flat)) == flat  # the flat view round-trips
    assert dataclasses.replace(flat, out="other").out == "other"
    assert TrainConfig(**BASE).on_policy is None and TrainConfig(**BASE).objective == ObjectiveConfig()
    for config in (GenerateConfig(**BASE, device="cpu"), RefLogpsConfig(model="m", data="d", negatives="n"),
                   EvalConfig(model=ModelConfig("m", attn="sdpa"), data="d")):
        assert isinstance(config.model, ModelConfig) and config.model.path == "m"


def test_composition_mistakes_are_clear():
    with pytest.raises(TypeError, match=r"give \['lr'\] inside optim=OptimConfig\(...\) or as keywords, not both"):
        TrainConfig(**BASE, optim=OptimConfig(), lr=1e-3)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['learning_rate'\]"):
        TrainConfig(**BASE, learning_rate=1e-3)
    with pytest.raises(TypeError, match="missing required argument 'model'"):
        TrainConfig(data="d", out="o")
    with pytest.raises(ValueError, match=r"sample_top_k=5 \(--sample-top-k\): only used with on_policy=True"):
        TrainConfig(**BASE, sample_top_k=5)
    with pytest.raises(ValueError, match="on_policy must be True, False, None or an OnPolicyConfig"):
        TrainConfig(**BASE, on_policy="yes")


def _closure_reward(target: str):
    """A reward that is not importable by name (a closure with state)."""
    calls = []

    def reward(prompt, response, reference):
        calls.append(response)
        return 1.0 if response.startswith(target) else 0.0
    return reward, calls


def test_callable_rewards_work_in_generate_train_and_eval(workspace, tmp_path):
    reward, calls = _closure_reward("1")
    out = generate_samples(GenerateConfig(model=str(workspace.model), data=str(workspace.data),
                                          out=str(tmp_path / "neg.jsonl"), num_samples=2, max_new_tokens=3,
                                          reward=reward, device="cpu", progress=False))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(calls) == 24 * 3 and all(r in (0.0, 1.0) for line in lines for r in line["rewards"])
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert meta["reward"].endswith("_closure_reward.<locals>.reward")

    reward, calls = _closure_reward("1")
    result = train(TrainConfig(model=str(workspace.model), data=str(workspace.data), out=str(tmp_path / "run"),
                               loss="rloo", on_policy=True, reward=reward, samples_per_prompt=2,
                               sample_max_new_tokens=3, batch_size=4, max_steps=2, lr=1e-3, device="cpu",
                               progress=False, plot=False))
    assert len(calls) == 2 * 4 * 2 and "sample_reward" in result.last_metrics
    config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert config["reward"].endswith("<locals>.reward") and config["lr"] == 1e-3 and config["on_policy"] is True
    assert read_trainer_state(result.final_checkpoint)["config"]["reward"] == config["reward"]

    metric, calls = _closure_reward("")
    summary = run_eval(EvalConfig(model=str(result.final_checkpoint), data=str(workspace.heldout), metric=metric,
                                  max_new_tokens=3, device="cpu", progress=False))
    assert summary["task_metric"] == 1.0 and len(calls) == 8 and summary["metric"].endswith("<locals>.reward")
    assert load_file(str(result.final_checkpoint / "model.safetensors"))


# -- the on-policy example builder and the sampler protocol, without a model ------------------------


def test_online_pair_rule():
    assert online_pair([0.0, 1.0, 1.0], positive_reward=0.5) == (1, 0)  # best (first of equals) beats the answer
    assert online_pair([0.0, 1.0], positive_reward=1.0) == (None, 0)  # not strictly better: the data's answer
    assert online_pair([0.3, 0.1, 0.1], positive_reward=1.0) == (None, 1)  # worst: first of equals
    with pytest.raises(ValueError, match="at least one sample"):
        online_pair([], positive_reward=0.0)


def test_rows_per_family():
    prompt, answer, samples, rewards = [1, 5], [7, 2], [[8, 2], [9, 9, 2]], [0.0, 2.0]
    group = on_policy_example("group", 3, "p", prompt, answer, samples, rewards)
    assert [r.input_ids for r in group.rows] == [(1, 5, 8, 2), (1, 5, 9, 9, 2)] and group.rewards == rewards
    dft = on_policy_example("dft", 3, "p", prompt, answer, samples, rewards)
    assert dft.rows[0] == Row((1, 5, 7, 2), 2) and dft.rewards == [1.0, 0.0, 2.0]
    pair = on_policy_example("pairwise", 3, "p", prompt, answer, samples, rewards, positive_reward=1.0)
    assert pair.rows == [Row((1, 5, 9, 9, 2), 2), Row((1, 5, 8, 2), 2)] and pair.rewards == [2.0, 0.0]
    with pytest.raises(ValueError, match="need positive_reward"):
        on_policy_example("pairwise", 3, "p", prompt, answer, samples, rewards)


class ScriptedSampler:
    """A :class:`~dftkern.train.onpolicy.Sampler` without a model: sample i of a call is ``[10 + seed % 3, 2]``."""

    def __init__(self):
        self.calls = []

    def sample(self, prompts, seeds):
        self.calls.append(len(prompts))
        return [Sample([10 + seed % 3, 2], str(seed % 3)) for seed in seeds]

    def sequence_logps(self, examples):
        return [[-float(len(row.input_ids)) for row in e.rows] for e in examples]


def test_on_policy_examples_through_the_sampler_protocol():
    records = [PromptRecord(str(i), "1", prompt=f"{i}+0=") for i in range(4)]
    prompts = PromptSet(records, [[1, 4 + i] for i in range(4)], [[11, 2]] * 4)
    sampler = ScriptedSampler()
    source = OnPolicyExamples(OnPolicyConfig(reward=lambda p, r, ref: float(r == "1"), samples_per_prompt=2,
                                             refresh_every=2), prompts, sampler,
                              ExampleOrder(4, 2, seed=0, shuffle=False), family="dft", needs_ref_logps=True,
                              grad_accum=1, total_steps=2, seed=0)
    stats = source.before_step(0, 0)
    assert sampler.calls == [8]  # one window: 2 steps x 2 prompts x 2 samples
    examples = source.examples([0, 1])
    assert all(len(e.rows) == 3 and e.ref_logps == [-4.0, -4.0, -4.0] for e in examples)
    assert all(e.rewards[0] == 1.0 for e in examples) and 0.0 <= stats["sample_reward"] <= 1.0
    source.before_step(1, 1)  # inside the window: no new samples
    assert sampler.calls == [8]
