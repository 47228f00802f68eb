"""VLLMSampler against the HF path on a tiny fp32 Llama (head_dim 64): greedy agreement token for
token, n samples per request, lengths/EOS, top-k/top-p/temperature, the documented seeding,
weight pushes, and that the host process's state survives the in-process engine.

One engine for the whole module (engine loads are the slow part on CPU).
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from vllm_helpers import needs_vllm

from dftkern.train.generate import SamplingConfig, decode, eos_token_ids
from dftkern.train.vllm_engine import VLLMSampler, request_seed

pytestmark = needs_vllm

MAX_NEW = 24
# addition prompts plus two with a long prefix (a stand-in for a sampling-only system prompt)
PROMPT_TEXTS = ["1+2=", "12+5=", "33+44=", "9+9=", "70+1=", "5+55=", "8+0=", "41+14=", "2+2=", "61+7=", "0+0=",
                "99+99=", "3+30=", "17+71=", "123+4=", "50+5="]
SYSTEM = "0123456789+=9876543210+=0123"


def _rng_states():
    return torch.get_rng_state().tolist(), random.getstate(), np.random.get_state()[1].tolist()


@pytest.fixture(scope="module")
def host_before():
    """What the host process looked like before the engine existed."""
    return {"set_num_threads": torch.set_num_threads, "threads": torch.get_num_threads(),
            "dtype": torch.get_default_dtype()}


@pytest.fixture(scope="module")
def sampler(tiny, host_before):
    before = _rng_states()
    with VLLMSampler(tiny.path, dtype="float32", seed=0, max_model_len=64) as engine:
        host_before["rng_kept_by_construction"] = _rng_states() == before  # vLLM's worker re-seeds all three
        yield engine


@pytest.fixture(scope="module")
def prompts(tiny):
    tok = tiny.tokenizer
    return [tok.encode(t) for t in PROMPT_TEXTS] + [tok.encode(SYSTEM + "4+4="), tok.encode(SYSTEM + "21+2=")]


@pytest.fixture(scope="module")
def eos(tiny):
    return eos_token_ids(tiny.model, tiny.tokenizer)


def hf_greedy(model, prompts, eos, max_new=MAX_NEW):
    return decode(model, prompts, sampling=SamplingConfig(max_new, 0.0), eos_ids=eos, pad_token_id=0)


def perturbed(model, *, seed):
    """A copy of ``model`` with every parameter moved by 0.3 of its std (seeded noise)."""
    policy = copy.deepcopy(model)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for param in policy.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.3 * param.std())
    return policy


def check_rows(rows, eos, max_new):
    """The decode() contract: finished <=> ends with the (only) EOS; otherwise exactly max_new tokens."""
    for tokens, finished in rows:
        assert 1 <= len(tokens) <= max_new
        eos_at = [i for i, t in enumerate(tokens) if t in eos]
        if finished:
            assert eos_at == [len(tokens) - 1], tokens
        else:
            assert eos_at == [] and len(tokens) == max_new, tokens


def test_eos_ids_match_the_hf_model(sampler, tiny, eos):
    assert sampler.eos_token_ids(tiny.tokenizer) == eos


def test_greedy_matches_hf_token_for_token(sampler, tiny, prompts, eos):
    expected = hf_greedy(tiny.model, prompts, eos)
    # the test has teeth: varied outputs, some rows end with EOS and some run out of tokens
    assert len({tuple(t) for t, _ in expected}) > len(prompts) // 2
    assert 0 < sum(f for _, f in expected) < len(expected)
    greedy = SamplingConfig(MAX_NEW, 0.0)
    assert sampler.sample(prompts, n=1, sampling=greedy, eos_ids=eos) == expected
    assert sampler.decode(prompts, sampling=greedy, eos_ids=eos, pad_token_id=0) == expected
    # n > 1 greedy: n copies, as HF decode of repeated rows gives
    rows = sampler.sample(prompts[:3], n=2, sampling=greedy, eos_ids=eos)
    assert rows == [r for r in expected[:3] for _ in range(2)]


def test_n_samples_layout_lengths_and_eos(sampler, tiny, prompts, eos):
    n, max_new = 4, 12
    seeds = [request_seed(0, i) for i in range(len(prompts))]
    rows = sampler.sample(prompts, n=n, sampling=SamplingConfig(max_new, 1.0), eos_ids=eos, seeds=seeds)
    assert len(rows) == n * len(prompts)
    check_rows(rows, eos, max_new)
    assert any(f for _, f in rows) and not all(f for _, f in rows)
    distinct = [len({tuple(t) for t, _ in rows[i * n:(i + 1) * n]}) for i in range(len(prompts))]
    assert sum(d > 1 for d in distinct) >= len(prompts) - 2, distinct  # n samples, not n copies


def _sampled_positions(sampler, tiny, prompts, eos, *, seed, sampling, n=4):
    """Sample, then yield ``(row, position, token, logits)`` for every sampled token, with the HF
    model's float64 logits ``[V]`` at the position that produced it (teacher forcing)."""
    seeds = [request_seed(seed, i) for i in range(len(prompts))]
    rows = sampler.sample(prompts, n=n, sampling=sampling, eos_ids=eos, seeds=seeds)
    for i, (tokens, _) in enumerate(rows):
        prompt = prompts[i // n]
        with torch.no_grad():
            logits = tiny.model(input_ids=torch.tensor([list(prompt) + list(tokens)])).logits[0].double()
        for pos, token in enumerate(tokens):
            yield i, pos, token, logits[len(prompt) - 1 + pos]


def test_top_k_is_applied(sampler, tiny, prompts, eos):
    k, checked = 2, 0
    for i, pos, token, logits in _sampled_positions(sampler, tiny, prompts, eos, seed=1,
                                                    sampling=SamplingConfig(10, 1.0, top_k=k)):
        top = torch.sort(logits, descending=True).values
        if abs(top[k - 1] - top[k]) < 1e-4:  # a tie at the boundary: either side is fine
            continue
        assert logits[token] >= top[k - 1], (i, pos)
        checked += 1
    assert checked > 200


def test_top_p_is_applied(sampler, tiny, prompts, eos):
    p, checked = 0.3, 0
    for i, pos, token, logits in _sampled_positions(sampler, tiny, prompts, eos, seed=2,
                                                    sampling=SamplingConfig(10, 1.0, top_p=p)):
        probs = torch.softmax(logits, dim=-1)
        mass_before = probs[probs > probs[token]].sum().item()
        if abs(mass_before - p) < 1e-4:  # at the nucleus boundary: either side is fine
            continue
        assert mass_before < p, (i, pos, mass_before)  # the token is inside the nucleus
        checked += 1
    assert checked > 200


def test_temperature_reaches_the_engine(sampler, tiny, prompts, eos):
    greedy = hf_greedy(tiny.model, prompts, eos, max_new=12)
    seeds = [request_seed(3, i) for i in range(len(prompts))]
    cold = sampler.sample(prompts, n=1, sampling=SamplingConfig(12, 1e-3), eos_ids=eos, seeds=seeds)
    hot = sampler.sample(prompts, n=1, sampling=SamplingConfig(12, 1.0), eos_ids=eos, seeds=seeds)
    assert cold == greedy
    assert sum(a != b for a, b in zip(hot, greedy)) >= len(prompts) // 2


def test_seeding_contract(sampler, prompts, eos):
    n = 3
    sampling = SamplingConfig(10, 1.0)
    seeds = [request_seed(7, i) for i in range(len(prompts))]
    rows = sampler.sample(prompts, n=n, sampling=sampling, eos_ids=eos, seeds=seeds)
    per_prompt = [rows[i * n:(i + 1) * n] for i in range(len(prompts))]
    # same call again: same samples
    assert sampler.sample(prompts, n=n, sampling=sampling, eos_ids=eos, seeds=seeds) == rows
    # other batch composition / order: each prompt's samples depend on its own seed only
    order = [5, 0, 17, 3]
    again = sampler.sample([prompts[i] for i in order], n=n, sampling=sampling, eos_ids=eos,
                           seeds=[seeds[i] for i in order])
    assert [again[k * n:(k + 1) * n] for k in range(len(order))] == [per_prompt[i] for i in order]
    alone = sampler.sample([prompts[9]], n=n, sampling=sampling, eos_ids=eos, seeds=[seeds[9]])
    assert alone == per_prompt[9]
    # vLLM's rule, documented in the module: sample j of a request seeded s is the n=1 request seeded s + j
    for j in range(n):
        single = sampler.sample([prompts[4]], n=1, sampling=sampling, eos_ids=eos, seeds=[seeds[4] + j])
        assert single == [per_prompt[4][j]]
    # other seeds: other samples
    other = sampler.sample(prompts, n=n, sampling=sampling, eos_ids=eos, seeds=[s + 1000 for s in seeds])
    assert sum(a != b for a, b in zip(other, rows)) >= len(rows) // 2


def test_update_weights_changes_what_is_sampled(sampler, tiny, prompts, eos):
    original = hf_greedy(tiny.model, prompts, eos)
    policy = perturbed(tiny.model, seed=11)
    updated = hf_greedy(policy, prompts, eos)
    assert sum(a != b for a, b in zip(updated, original)) >= 4  # the perturbation is visible
    greedy = SamplingConfig(MAX_NEW, 0.0)
    try:
        sampler.update_weights(policy)  # an nn.Module (its state_dict; the tied lm_head.weight is skipped)
        assert sampler.sample(prompts, n=1, sampling=greedy, eos_ids=eos) == updated
        embed = sampler.llm.apply_model(lambda m: m.model.embed_tokens.weight.detach().clone())[0]
        vocab = policy.model.embed_tokens.weight.shape[0]  # vLLM pads the vocabulary rows (to 64 here)
        torch.testing.assert_close(embed[:vocab], policy.model.embed_tokens.weight, rtol=0, atol=0)
    finally:
        # (name, tensor) pairs without the tied lm_head.weight (named_parameters() dedups it): the
        # sampler must name the tied head itself, or vLLM keeps a stale one
        pairs = list(tiny.model.named_parameters())
        assert "lm_head.weight" not in dict(pairs)
        sampler.update_weights(pairs)
    assert sampler.sample(prompts, n=1, sampling=greedy, eos_ids=eos) == original
    assert sampler.weight_version == 2


def test_update_weights_rejects_wrong_names_before_touching_the_engine(sampler, tiny, prompts, eos):
    state = dict(tiny.model.state_dict())
    with pytest.raises(ValueError, match="not in .*checkpoint"):
        sampler.update_weights({**state, "model.bogus.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="not given"):
        sampler.update_weights({k: v for k, v in state.items() if "layers.1." not in k})
    with pytest.raises(ValueError, match="not in .*checkpoint"):  # a wrapper's prefixed names
        sampler.update_weights({f"causal_lm.{k}": v for k, v in state.items()})
    with pytest.raises(TypeError):
        sampler.update_weights(42)
    # still usable
    assert sampler.sample(prompts[:4], n=1, sampling=SamplingConfig(MAX_NEW, 0.0), eos_ids=eos) == \
        hf_greedy(tiny.model, prompts[:4], eos)


def test_host_process_state_survives(sampler, host_before, prompts, eos):
    assert host_before["rng_kept_by_construction"]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sampler.sample(prompts[:4], n=2, sampling=SamplingConfig(6, 1.0), eos_ids=eos, seeds=[1, 2, 3, 4])
    assert torch.equal(torch.rand(3), expected)  # vLLM's CPU sampler draws from the global generator
    assert torch.set_num_threads is host_before["set_num_threads"]  # vLLM's worker replaces it by a no-op
    assert torch.get_num_threads() == host_before["threads"]
    assert torch.get_default_dtype() == host_before["dtype"] and torch.is_grad_enabled()


def test_input_errors(sampler, prompts, eos):
    sampling = SamplingConfig(4, 1.0)
    with pytest.raises(ValueError, match="one seed per prompt"):
        sampler.sample(prompts[:2], n=2, sampling=sampling, eos_ids=eos, seeds=[1])
    with pytest.raises(ValueError, match="n must be"):
        sampler.sample(prompts[:2], n=0, sampling=sampling, eos_ids=eos, seeds=[1, 2])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.sample([[1, 4], []], n=1, sampling=sampling, eos_ids=eos, seeds=[1, 2])
    with pytest.raises(ValueError, match="max_model_len"):
        sampler.sample([[4] * 64], n=1, sampling=sampling, eos_ids=eos, seeds=[1])
    with pytest.raises(ValueError, match="eos_ids"):
        sampler.sample(prompts[:1], n=1, sampling=sampling, eos_ids=set(), seeds=[1])
    with pytest.raises(ValueError, match="seeds must be in"):
        sampler.sample(prompts[:1], n=2, sampling=sampling, eos_ids=eos, seeds=[2**63 - 1])
    with pytest.raises(ValueError, match="forward/all_done"):
        sampler.decode(prompts[:1], sampling=sampling, eos_ids=eos, seeds=[1], forward=lambda **kw: None)


def test_policy_sampler_pushes_the_policy_then_decodes_every_row_with_its_seed(sampler, tiny, prompts, eos):
    """VLLMPolicySampler (on-policy rollouts): one weight push per sample() call, then one n=1 request per
    row seeded with the row's own seed; scoring is delegated."""
    from dftkern.train.vllm_engine import VLLMPolicySampler

    class Scorer:
        def sequence_logps(self, examples):
            return [[float(len(examples))]]

    policy = perturbed(tiny.model, seed=5)
    rows, seeds = prompts[:4] * 2, [11, 12, 13, 14, 11, 12, 99, 98]
    before = sampler.weight_version
    try:
        greedy = VLLMPolicySampler(sampler, Scorer(), policy, tiny.tokenizer, sampling=SamplingConfig(MAX_NEW, 0.0),
                                   eos_ids=eos)
        out = greedy.sample(rows, seeds)
        assert sampler.weight_version == before + 1
        expected = hf_greedy(policy, rows, eos)
        assert expected != hf_greedy(tiny.model, rows, eos)  # the push is what makes these equal
        assert [s.token_ids for s in out] == [tokens for tokens, _ in expected]
        assert [s.text for s in out] == [tiny.tokenizer.decode(t, skip_special_tokens=True) for t, _ in expected]
        sampling = SamplingConfig(MAX_NEW, 1.0)
        drawn = VLLMPolicySampler(sampler, Scorer(), policy, tiny.tokenizer, sampling=sampling, eos_ids=eos)
        out = [s.token_ids for s in drawn.sample(rows, seeds)]
        assert sampler.weight_version == before + 2
        assert out == [t for t, _ in sampler.decode(rows, sampling=sampling, eos_ids=eos, seeds=seeds)]
        assert out[:2] == out[4:6]  # same prompt and seed, same sample
        assert greedy.sequence_logps(["a", "b"]) == [[2.0]]
    finally:
        sampler.update_weights(tiny.model)
