"""Offline negatives drawn from a pool: K of each prompt's M samples per step, fresh each epoch
(--rotate-negatives), optionally filtered (--filter-negatives), resumable bit for bit.

The pool is written by hand so that every case is known: per prompt 5 samples ``[a+1, a, a+2, a+3,
a+4]`` (``a`` the answer) with rewards ``[0, 1, 0, 0.6, 0]`` and ``positive_reward`` 1 — sample 1 is
the good answer (correct and equal), sample 3 is "partly correct" (correct only under
``--correct-threshold 0.5``); the first prompt's samples are all the good answer (nothing survives
the filter).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import small_run, write_jsonl

from dftkern.train.batching import ExampleOrder, build_examples
from dftkern.train.onpolicy import NegativeSchedule, OfflineExamples
from dftkern.train.records import read_prompt_records, read_sample_records
from dftkern.train.ref_logps import RefLogpsConfig, compute_ref_logps
from dftkern.train.trainer import TrainConfig, train

M = 5
REWARDS = [0.0, 1.0, 0.0, 0.6, 0.0]


def _pool_texts(answer: str, all_good: bool) -> list[str]:
    if all_good:
        return [answer] * M
    a = int(answer)
    return [str(a + 1), answer, str(a + 2), str(a + 3), str(a + 4)]


@pytest.fixture(scope="module")
def pool(workspace, tmp_path_factory, tokenizer):
    """(negatives file, whole-pool reference cache) for the workspace's training data."""
    root = tmp_path_factory.mktemp("pool")
    lines = []
    for i, record in enumerate(read_prompt_records(workspace.data)):
        texts = _pool_texts(record.response, all_good=i == 0)
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
        lines.append({"prompt_id": record.prompt_id, "responses": texts, "response_token_ids": ids,
                      "rewards": [1.0] * M if i == 0 else REWARDS, "positive_reward": 1.0})
    negatives = write_jsonl(root / "pool.jsonl", lines)
    cache = compute_ref_logps(RefLogpsConfig(model=str(workspace.model), data=str(workspace.data),
                                             negatives=str(negatives), device="cpu", progress=False))
    return negatives, cache


def _expected(rewards, texts, answer, *, k, epoch, filtered, threshold=1.0):
    """The rule, restated: candidates = samples neither correct (reward >= threshold) nor equal to the
    answer (all of them when none is left, or without the filter); epoch e takes (e*k + j) mod n."""
    candidates = [j for j in range(len(texts))
                  if not filtered or not (rewards[j] >= threshold or texts[j].strip() == answer.strip())]
    candidates = candidates or list(range(len(texts)))
    return [candidates[(epoch * k + j) % len(candidates)] for j in range(k)]


def _schedule(workspace, tokenizer, negatives, **kwargs):
    records = read_prompt_records(workspace.data)
    samples = read_sample_records(negatives)
    examples = build_examples(tokenizer, records, samples)
    return records, samples, examples, NegativeSchedule.build(examples, records, samples, **kwargs)


@pytest.mark.parametrize("filtered,threshold", [(False, None), (True, None), (True, 0.5)])
def test_schedule_follows_the_rotation_rule(workspace, tokenizer, pool, filtered, threshold):
    records, samples, examples, schedule = _schedule(workspace, tokenizer, pool[0], k=2, rotate=True,
                                                     filtered=filtered, correct_threshold=threshold)
    assert schedule.unfilterable == (1 if filtered else 0)
    for i, record in enumerate(records):
        sample = samples[record.prompt_id]
        picks = []
        for epoch in range(4):
            expected = _expected(sample.rewards, sample.responses, record.response, k=2, epoch=epoch,
                                 filtered=filtered, threshold=1.0 if threshold is None else threshold)
            assert schedule.pick(i, epoch) == expected, (record.prompt_id, epoch)
            picks.append(expected)
        if i and not filtered:
            assert picks[0] == [0, 1] and picks[1] == [2, 3] and picks[2] == [4, 0]  # fresh, then wrap around
        if i and filtered:
            assert 1 not in sum(picks, [])  # the good answer never comes back
            assert (3 in sum(picks, [])) == (threshold is None)  # partly correct: dropped only at threshold 0.5


def test_without_rotation_every_epoch_takes_the_first_candidates(workspace, tokenizer, pool):
    *_, schedule = _schedule(workspace, tokenizer, pool[0], k=2, rotate=False, filtered=True)
    assert all(schedule.pick(i, 0) == schedule.pick(i, 3) for i in range(len(schedule.candidates)))
    assert schedule.pick(1, 5) == [0, 2]


def test_views_of_a_micro_batch_take_its_epochs_negatives(workspace, tokenizer, pool):
    _, _, examples, schedule = _schedule(workspace, tokenizer, pool[0], k=2, rotate=True, filtered=False)
    for e in examples:
        e.ref_logps = [float(10 * e.index + r) for r in range(len(e.rows))]  # marks each row
    order = ExampleOrder(len(examples), 4, seed=0)
    source = OfflineExamples(examples, negatives=schedule, order=order, grad_accum=2)
    assert source.rows_per_example == 3
    with pytest.raises(RuntimeError, match="before before_step"):
        source.examples(order.batch(0))
    per_epoch = order.batches_per_epoch  # 24 examples / 4 = 6
    stats = source.before_step(2, 2 * per_epoch - 1)  # the step's two micro-batches straddle epochs 1 and 2
    for m, epoch in ((2 * per_epoch - 1, 1), (2 * per_epoch, 2)):
        for view in source.examples(order.batch(m)):
            full = examples[view.index]
            picked = [(epoch * 2 + j) % M for j in range(2)]
            assert view.rows == [full.rows[0]] + [full.rows[1 + p] for p in picked]
            assert view.ref_logps == [full.ref_logps[0]] + [full.ref_logps[1 + p] for p in picked]
            assert view.rewards == [full.rewards[0]] + [full.rewards[1 + p] for p in picked]
    with pytest.raises(RuntimeError, match="expected the indices of micro-batch"):
        source.examples(order.batch(0))
    # reported: the share of the step's negatives that are correct (rewards >= positive_reward) / equal the answer
    picks = [(i, [(e * 2 + j) % M for j in range(2)]) for m, e in ((2 * per_epoch - 1, 1), (2 * per_epoch, 2))
             for i in order.batch(m)]
    correct = sum(examples[i].rewards[1 + p] >= 1.0 for i, chosen in picks for p in chosen)
    assert stats["neg_frac_correct"] == pytest.approx(correct / 16)
    assert 0 < stats["neg_frac_correct"] < 1 and "neg_frac_equal_positive" in stats


def _weights(result):
    return load_file(str(result.final_checkpoint / "model.safetensors"))


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_rotation_trains_epoch_zero_like_the_first_k_then_fresh_ones_and_resumes_bit_exact(workspace, pool,
                                                                                          tmp_path):
    negatives, cache = pool
    common = dict(negatives=str(negatives), ref_logps=str(cache), num_negatives=2, max_steps=9, lr=3e-3)
    first_k = train(small_run(workspace, tmp_path / "first_k", **common))
    rotating = train(small_run(workspace, tmp_path / "rotating", rotate_negatives=True, **common))
    plain, rotated = _metrics(tmp_path / "first_k"), _metrics(tmp_path / "rotating")
    # epoch 0 (steps 1-6: 24 examples / batch 4) takes samples 0, 1 -- the first K, as without rotation
    assert [m["loss"] for m in rotated[:6]] == [m["loss"] for m in plain[:6]]
    assert all(rotated[s]["loss"] != plain[s]["loss"] for s in range(6, 9))  # epoch 1: samples 2, 3
    assert all("neg_frac_correct" in m for m in rotated) and not any("neg_frac_correct" in m for m in plain)
    assert any(m["neg_frac_correct"] > 0 for m in rotated[:6]) and rotated[6]["neg_frac_correct"] < 1
    assert not all(torch.equal(first_k_w, _weights(rotating)[k]) for k, first_k_w in _weights(first_k).items())

    stopped = tmp_path / "stopped"
    train(small_run(workspace, stopped, rotate_negatives=True, stop_after=4, **common))
    resumed = train(small_run(workspace, stopped, rotate_negatives=True, resume="auto", **common))
    assert resumed.steps == 9
    reference = _weights(rotating)
    for name, value in _weights(resumed).items():
        assert torch.equal(value, reference[name]), name
    assert [m["loss"] for m in _metrics(stopped)] == [m["loss"] for m in rotated]
    assert [m["neg_frac_correct"] for m in _metrics(stopped)] == [m["neg_frac_correct"] for m in rotated]


def test_filtered_training_reports_what_it_dropped(workspace, pool, tmp_path, capfd):
    negatives, cache = pool
    train(small_run(workspace, tmp_path / "filtered", negatives=str(negatives), ref_logps=str(cache),
                    num_negatives=2, rotate_negatives=True, filter_negatives=True, max_steps=6))
    err = capfd.readouterr().err
    line = next(text for text in err.splitlines() if "negatives: K=2 of a pool of 5" in text)
    # 23 prompts drop sample 1 (correct and equal), the first prompt drops all 5 (and keeps them): 28 of 120
    assert "rotating each epoch" in line and "drops 23.3% of the pool" in line and "1 of 24 prompts" in line
    metrics = _metrics(tmp_path / "filtered")
    config = json.loads((tmp_path / "filtered" / "train_config.json").read_text())
    assert config["negatives_pool"]["frac_filtered"] == pytest.approx(28 / 120)
    first = read_prompt_records(workspace.data)[0].prompt_id
    assert config["filter_negatives"] is True and config["rotate_negatives"] is True
    # only the unfilterable first prompt can put a correct negative into a step (2 of its step's 8 negatives)
    for m in metrics:
        assert m["neg_frac_correct"] in (0.0, 0.25), m
    assert sum(m["neg_frac_correct"] == 0.25 for m in metrics) == 1, first  # one epoch: the prompt is seen once


def test_threshold_changes_what_counts_as_correct(workspace, pool, tmp_path):
    negatives, cache = pool
    common = dict(negatives=str(negatives), ref_logps=str(cache), num_negatives=2, rotate_negatives=True,
                  shuffle=False)
    train(small_run(workspace, tmp_path / "default", max_steps=12, **common))
    train(small_run(workspace, tmp_path / "half", max_steps=12, correct_threshold=0.5, **common))
    # file order, 4 prompts per step; the first prompt's samples are all correct. Epoch 0 takes samples 0, 1
    # (sample 1 correct under both rules), epoch 1 samples 2, 3 (sample 3, reward 0.6, correct only at 0.5)
    assert [m["neg_frac_correct"] for m in _metrics(tmp_path / "default")] == \
           [5 / 8] + [0.5] * 5 + [2 / 8] + [0.0] * 5
    assert [m["neg_frac_correct"] for m in _metrics(tmp_path / "half")] == [5 / 8] + [0.5] * 5 + [5 / 8] + [0.5] * 5
    train(small_run(workspace, tmp_path / "half_filtered", max_steps=6, correct_threshold=0.5,
                    filter_negatives=True, **common))
    # filtered at 0.5, samples 1 and 3 are gone: epoch 0 takes 0 and 2, both wrong (except the first prompt)
    assert [m["neg_frac_correct"] for m in _metrics(tmp_path / "half_filtered")] == [0.25] + [0.0] * 5


def test_negative_selection_errors_name_the_argument(workspace, pool, tmp_path):
    negatives, _ = pool
    base = dict(model=str(workspace.model), data=str(workspace.data), out=str(tmp_path / "x"))
    with pytest.raises(ValueError, match=r"rotate_negatives=True \(--rotate-negatives\) needs num_negatives "
                                         r"\(--num-negatives K\)"):
        TrainConfig(**base, negatives=str(negatives), loss="dft", rotate_negatives=True)
    with pytest.raises(ValueError, match=r"filter_negatives=True \(--filter-negatives\): loss='sft'"):
        TrainConfig(**base, loss="sft", filter_negatives=True, num_negatives=2)
    with pytest.raises(ValueError, match="with on_policy the negatives are fresh samples"):
        TrainConfig(**base, loss="dft", on_policy=True, reward="addition", rotate_negatives=True, num_negatives=2)
    with pytest.raises(ValueError, match=r"correct_threshold=0.5 \(--correct-threshold\) is only used with"):
        TrainConfig(**base, negatives=str(negatives), loss="dft", correct_threshold=0.5)
    with pytest.raises(ValueError, match=r"rotate_negatives must be True or False \(a bool\), got 1"):
        TrainConfig(**base, negatives=str(negatives), loss="dft", rotate_negatives=1, num_negatives=2)


def test_rotation_needs_the_whole_pool_scored(workspace, pool, tmp_path):
    negatives, _ = pool
    first_two = compute_ref_logps(RefLogpsConfig(model=str(workspace.model), data=str(workspace.data),
                                                 negatives=str(negatives), num_negatives=2,
                                                 out_dir=str(tmp_path / "k2"), device="cpu", progress=False))
    with pytest.raises(ValueError, match=r"was not scored in this cache; score the whole pool"):
        train(small_run(workspace, tmp_path / "run", negatives=str(negatives), ref_logps=str(first_two),
                        num_negatives=2, rotate_negatives=True))
    with pytest.raises(FileNotFoundError, match=r"without --num-negatives \(the whole pool"):
        train(small_run(workspace, tmp_path / "run", negatives=str(negatives), ref_logps=str(tmp_path / "k2"),
                        num_negatives=2, rotate_negatives=True))


def test_command_line_flags(workspace):
    from dftkern.train.cli import build_parser

    args = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--out", "o", "--num-negatives", "2",
                                      "--rotate-negatives", "--filter-negatives", "--correct-threshold", "0.5"])
    assert (args.num_negatives, args.rotate_negatives, args.filter_negatives, args.correct_threshold) == \
           (2, True, True, 0.5)
    defaults = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--out", "o"])
    assert (defaults.rotate_negatives, defaults.filter_negatives, defaults.correct_threshold) == (False, False, None)


@pytest.mark.parametrize("filtered", [False, True])
def test_schedule_picks_what_the_dft_study_rotates(workspace, tokenizer, pool, filtered):
    """The study (dftkern.experiments.dft_study) cuts per-epoch negatives files with ``rotate_pool``
    (records.pool_candidates + rotate_negatives, the default rule: correct = reward >= the good
    answer's): the trainer's schedule with the default rule makes the same picks every epoch."""
    from dftkern.experiments.dft_study import protocol

    records, samples, _, schedule = _schedule(workspace, tokenizer, pool[0], k=2, rotate=True, filtered=filtered)
    for epoch in range(4):
        _, picks = protocol.rotate_pool(records, samples, epoch=epoch, k=2, filtered=filtered)
        assert [schedule.pick(i, epoch) for i in range(len(records))] == \
               [picks[r.prompt_id]["indices"] for r in records]
        assert schedule.unfilterable == sum(p["fallback"] for p in picks.values())


# -- the whole-pool cache found by the default and the directory lookup (--num-negatives K < M) -----


def _only_the_pool_cache(pool, directory):
    """A directory holding the negatives file and its whole-pool cache, nothing else."""
    import shutil

    negatives, cache = pool
    directory.mkdir()
    shutil.copy(negatives, directory / negatives.name)
    shutil.copy(cache, directory / cache.name)
    return directory / negatives.name, directory / cache.name


def test_default_and_directory_lookup_serve_the_first_k_from_the_whole_pool_cache(workspace, tokenizer, pool,
                                                                                   tmp_path):
    from dftkern.train.objectives import Objective
    from dftkern.train.trainer import load_training_examples

    negatives, cache = _only_the_pool_cache(pool, tmp_path / "pool")
    scored = load_file(str(cache))["row_logps"]  # [N, 1 + M], in the data's order
    for k in (1, 2, 4):  # any K: the first K of every prompt's samples, looked up in the pool's cache
        for ref_logps in (None, str(negatives.parent)):  # next to --negatives; --ref-logps DIR
            cfg = small_run(workspace, tmp_path / "x", negatives=str(negatives), num_negatives=k, ref_logps=ref_logps)
            examples = load_training_examples(cfg, tokenizer, Objective(cfg.objective))
            assert [len(e.rows) for e in examples] == [1 + k] * len(scored)
            assert torch.equal(torch.tensor([e.ref_logps for e in examples]), scored[:, :1 + k])

    common = dict(negatives=str(negatives), num_negatives=2, max_steps=4, lr=3e-3)
    runs = {name: train(small_run(workspace, tmp_path / name, **common, **extra))
            for name, extra in (("file", dict(ref_logps=str(cache))), ("default", {}),
                                ("directory", dict(ref_logps=str(negatives.parent))))}
    losses = {name: [m["loss"] for m in _metrics(tmp_path / name)] for name in runs}
    assert len(losses["file"]) == 4 and losses["default"] == losses["file"] == losses["directory"]
    for name in ("default", "directory"):
        weights = _weights(runs[name])
        assert all(torch.equal(value, weights[key]) for key, value in _weights(runs["file"]).items())
    assert sorted(p.name for p in negatives.parent.iterdir()) == sorted([negatives.name, cache.name])  # no K cache


def test_a_whole_pool_cache_of_other_rows_is_refused(workspace, tokenizer, pool, tmp_path):
    from dftkern.train.batching import examples_fingerprint
    from dftkern.train.ref_logps import cache_path

    negatives, _ = pool
    # the pool of other negatives (every sample one longer), scored whole: found for none of ours
    other = tmp_path / "other"
    other.mkdir()
    lines = [json.loads(line) for line in negatives.read_text().splitlines()]
    for line in lines:
        line["responses"] = [r + "0" for r in line["responses"]]
        line["response_token_ids"] = [ids[:-1] + tokenizer("0", add_special_tokens=False)["input_ids"] + ids[-1:]
                                      for ids in line["response_token_ids"]]
    other_negatives = write_jsonl(other / "pool.jsonl", lines)
    other_cache = compute_ref_logps(RefLogpsConfig(model=str(workspace.model), data=str(workspace.data),
                                                   negatives=str(other_negatives), device="cpu", progress=False))
    ours = tmp_path / "ours"
    ours.mkdir()
    mine = write_jsonl(ours / "pool.jsonl", negatives.read_text().splitlines())
    (ours / other_cache.name).write_bytes(other_cache.read_bytes())
    for ref_logps in (None, str(ours)):
        with pytest.raises(FileNotFoundError, match=r"no cache for these rows exists: looked for .*ref_logps-\w+\."
                                                    r"safetensors and .*ref_logps-\w+\.safetensors \(the whole pool\);"
                                                    r".*without --num-negatives \(the whole pool, scored once, serves "
                                                    r"any --num-negatives"):
            train(small_run(workspace, tmp_path / "run", negatives=str(mine), num_negatives=2, ref_logps=ref_logps))
    with pytest.raises(ValueError, match=r"holds reference log-probs for other rows.*nor can it serve as a pool "
                                         r"cache: .*row 1 of prompt id .* was not scored in this cache"):
        train(small_run(workspace, tmp_path / "run", negatives=str(mine), num_negatives=2, ref_logps=str(other_cache)))

    # our pool scored with other settings (--max-length 8 cuts the rows), under the name the lookup takes for
    # our whole pool (a renamed or stale file): its fingerprint is checked before any row is looked up
    cut = compute_ref_logps(RefLogpsConfig(model=str(workspace.model), data=str(workspace.data),
                                           negatives=str(negatives), max_length=8, out_dir=str(tmp_path / "cut"),
                                           device="cpu", progress=False))
    whole = build_examples(tokenizer, read_prompt_records(workspace.data), read_sample_records(mine))
    expected = cache_path(ours, examples_fingerprint(whole))
    assert expected.name != cut.name
    expected.write_bytes(cut.read_bytes())
    with pytest.raises(ValueError, match=rf"{expected.name} holds reference log-probs for other rows \(fingerprint "
                                         rf"{cut.name[10:26]}, these rows: {expected.name[10:26]}\); rerun ref-logps"):
        train(small_run(workspace, tmp_path / "run", negatives=str(mine), num_negatives=2))
