"""Built-in task pieces and checkpoint atomicity."""

from __future__ import annotations

import pytest
import torch

from dftkern.train import synthetic
from dftkern.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    write_checkpoint,
)
from dftkern.train.util import derive_seed, exact_match, load_callable


def test_addition_records_are_deterministic_distinct_and_respect_exclusions():
    a = synthetic.make_addition_records(200, max_digits=2, seed=4)
    assert a == synthetic.make_addition_records(200, max_digits=2, seed=4)
    pairs = {r["prompt"] for r in a}
    assert len(pairs) == 200
    for r in a:
        left, right = r["prompt"][:-1].split("+")
        assert len(left) <= 2 and len(right) <= 2 and int(r["response"]) == int(left) + int(right)
    excluded = {tuple(map(int, r["prompt"][:-1].split("+"))) for r in a}
    b = synthetic.make_addition_records(100, max_digits=2, seed=5, exclude=excluded)
    assert not {r["prompt"] for r in b} & pairs
    with pytest.raises(ValueError, match="exceeds the 100 distinct problems"):
        synthetic.make_addition_records(101, max_digits=1)


def test_addition_reward_recomputes_the_answer():
    assert synthetic.addition_reward("12+30=", "42") == 1.0
    assert synthetic.addition_reward("12+30=", " 42 ", "ignored") == 1.0
    assert synthetic.addition_reward("12+30=", "43", "43") == 0.0  # the reference is not trusted
    with pytest.raises(ValueError, match="not an addition problem"):
        synthetic.addition_reward("hello", "1")
    assert load_callable("dftkern.train.synthetic:addition_reward") is synthetic.addition_reward
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        load_callable("dftkern.train.synthetic:nope")
    with pytest.raises(ValueError, match="must look like 'package.module:function'"):
        load_callable("no_colon")
    assert exact_match("p", " 7\n", "7") == 1.0 and exact_match("p", "7", "8") == 0.0


def test_char_tokenizer_round_trip_and_reload(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = synthetic.build_char_tokenizer(save_dir=tmp_path / "tok")
    ids = tokenizer("905+17=")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 8
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert reloaded("905+17=")["input_ids"] == ids
    assert reloaded.decode(ids + [reloaded.eos_token_id], skip_special_tokens=True) == "905+17="
    with pytest.raises(ValueError, match="distinct characters"):
        synthetic.build_char_tokenizer("aa")


def test_tiny_llama_is_seeded_and_does_not_touch_the_global_rng():
    tokenizer = synthetic.build_char_tokenizer()
    state = torch.get_rng_state()
    a = synthetic.make_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    b = synthetic.make_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.config.vocab_size == len(tokenizer) and a.config.tie_word_embeddings


def test_checkpoint_writes_are_atomic_and_pruned(tmp_path):
    tokenizer = synthetic.build_char_tokenizer()
    model = synthetic.make_tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2)
    state = model.state_dict()
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step, causal_lm=model, model_state=state, tokenizer=tokenizer,
                         trainer_state={"step": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]

    def disk_full(*args, **kwargs):  # the trainer state is no longer pickled: fail the model write instead
        raise RuntimeError("disk full")

    model.save_pretrained = disk_full
    with pytest.raises(RuntimeError, match="disk full"):  # a failed write leaves no step-4 and no temp dir
        write_checkpoint(tmp_path, 4, causal_lm=model, model_state=state, tokenizer=tokenizer,
                         trainer_state={"step": 4})
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]

    class Unsaveable:  # not plain data: refused before anything is written (it would have needed pickle)
        pass

    with pytest.raises(TypeError, match="cannot store a Unsaveable"):
        write_checkpoint(tmp_path, 4, causal_lm=model, model_state=state, tokenizer=tokenizer,
                         trainer_state={"step": 4, "bad": Unsaveable()})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(0, "p", 1) == derive_seed(0, "p", 1)
    assert len({derive_seed(0, "p", j) for j in range(100)}) == 100
    assert 0 <= derive_seed("x") < 2**63
