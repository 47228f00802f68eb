"""Tests of the synthetic length study (``python -m dftkern.experiments.length_study``).

* the two length rewards (values, peak, validation, environment fallback) and the modal length;
* the offline inputs built from reference samples follow the trainer's on-policy row rule;
* the on-policy arm really resamples from the current policy: reward calls happen in bursts of
  ``B * n`` separated by exactly ``refresh_every`` optimizer steps (counted on ``AdamW.step``);
* the arms of each loss and the trainer options they map to (on-policy DPO against the initial
  model or the moving sampler, PPO with two updates per window);
* ``--quick`` end to end through the command line: files, table, sample counts, the training
  diagnostics that show which reference DPO had and whether PPO's clip acted, timing;
* ``workers=2`` gives the same runs as ``workers=1``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dftkern.experiments import length_study as ls

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------
# rewards
# --------------------------------------------------------------------------------------


def test_min_length_reward_is_minus_the_number_of_characters():
    assert ls.min_length_reward("12+3=", "") == 0.0
    assert ls.min_length_reward("12+3=", "15") == -2.0
    assert ls.min_length_reward("12+3=", "1234", "15") == -4.0
    with pytest.raises(TypeError, match="response must be a str"):
        ls.min_length_reward("12+3=", None)


def test_mode_length_reward_is_peaked_at_the_target():
    reward = ls.length_reward("mode_length", 3, width=1.0)
    values = {n: reward("1+2=", "7" * n, "3") for n in range(7)}
    assert values[3] == 1.0
    assert values[2] == pytest.approx(math.exp(-1)) and values[4] == pytest.approx(math.exp(-1))
    assert values[0] == pytest.approx(math.exp(-9))
    assert max(values, key=values.get) == 3
    assert ls.length_reward("mode_length", 3, width=2.0)("1+2=", "7", "3") == pytest.approx(math.exp(-1))


def test_length_rewards_are_the_trainers_and_validate_their_peak():
    from dftkern.train.rewards import LengthPeakReward, neg_length_reward, resolve_reward

    assert ls.length_reward("min_length") is neg_length_reward is resolve_reward("neg_length")
    peak = ls.length_reward("mode_length", 1)
    assert isinstance(peak, LengthPeakReward) and peak("1+2=", "3", "3") == 1.0
    with pytest.raises(ValueError, match="needs mode"):
        ls.length_reward("mode_length")
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="mode"):
            ls.length_reward("mode_length", bad)
    with pytest.raises(ValueError, match="width"):
        ls.length_reward("mode_length", 2, width=0.0)
    with pytest.raises(ValueError, match="name must be one of"):
        ls.length_reward("length")


def test_modal_length():
    assert ls.modal_length([3, 2, 3, 1]) == 3
    assert ls.modal_length([2, 3, 3, 2]) == 2  # ties: the smaller length
    with pytest.raises(ValueError, match="empty"):
        ls.modal_length([])


def test_config_validation():
    with pytest.raises(ValueError, match="samples_per_prompt"):
        ls.LengthStudyConfig(samples_per_prompt=1).resolved()
    with pytest.raises(ValueError, match="rewards"):
        ls.LengthStudyConfig(rewards=("max_length",)).resolved()
    with pytest.raises(ValueError, match="lr must map every loss"):
        ls.LengthStudyConfig(lr={"dpo": 1e-4}).resolved()
    assert ls.LengthStudyConfig(steps=40, num_checkpoints=4).resolved().checkpoint_steps() == [0, 10, 20, 30, 40]


# --------------------------------------------------------------------------------------
# offline inputs
# --------------------------------------------------------------------------------------


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_offline_files_follow_the_on_policy_row_rule(tmp_path):
    prompts = _write(tmp_path / "prompts.jsonl", [{"id": "a", "prompt": "12+30=", "response": "42"},
                                                  {"id": "b", "prompt": "99+1=", "response": "100"}])
    samples = _write(tmp_path / "samples.jsonl", [
        {"prompt_id": "a", "responses": ["420", "4", "42"], "response_token_ids": [[7, 5, 3, 2], [7, 2], [7, 5, 2]]},
        {"prompt_id": "b", "responses": ["100", "1000", "1000"],
         "response_token_ids": [[4, 3, 3, 2], [4, 3, 3, 3, 2], [4, 3, 3, 3, 2]]}])
    data, negatives = ls.build_offline_files("dpo", "min_length", prompts, samples, tmp_path / "dpo")
    data_rows = [json.loads(x) for x in data.read_text().splitlines()]
    neg_rows = [json.loads(x) for x in negatives.read_text().splitlines()]
    # a: the sample "4" beats the data answer "42" -> chosen; worst = "420"
    assert data_rows[0]["response"] == "4" and neg_rows[0]["responses"] == ["420"]
    assert neg_rows[0]["response_token_ids"] == [[7, 5, 3, 2]] and neg_rows[0]["rewards"] == [-3.0]
    # b: no sample beats "100" -> the data answer stays chosen; worst = first "1000"
    assert data_rows[1]["response"] == "100" and neg_rows[1]["response_token_ids"] == [[4, 3, 3, 3, 2]]

    data, negatives = ls.build_offline_files("reinforce", "min_length", prompts, samples, tmp_path / "rf")
    data_rows = [json.loads(x) for x in data.read_text().splitlines()]
    neg_rows = [json.loads(x) for x in negatives.read_text().splitlines()]
    assert [r["response"] for r in data_rows] == ["420", "100"]  # sample 0 becomes row 0 of the group
    assert neg_rows[0]["positive_reward"] == -3.0 and neg_rows[0]["rewards"] == [-1.0, -2.0]
    assert neg_rows[1]["responses"] == ["1000", "1000"]


# --------------------------------------------------------------------------------------
# the study
# --------------------------------------------------------------------------------------


def test_on_policy_arm_resamples_from_the_current_policy(tmp_path, monkeypatch):
    """Reward calls (sampling rounds) interleave with optimizer steps: one round of B*n samples per
    ``refresh_every`` steps. The offline arm scores nothing while training."""
    events: list[str] = []
    original_step = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        events.append("step")
        return original_step(self, *args, **kwargs)

    import dftkern.train.trainer as trainer_module

    training = [False]  # reward calls are recorded while the trainer runs (not the study's evaluation)
    original_train = trainer_module.train

    def flagged_train(*args, **kwargs):
        training[0] = True
        try:
            return original_train(*args, **kwargs)
        finally:
            training[0] = False

    def recording_reward(prompt, response, reference=None):
        if training[0]:
            events.append("reward")
        return ls.min_length_reward(prompt, response, reference)

    def recording_length_reward(name, mode=None, width=1.0):  # the reward functions the study uses
        return recording_reward if name == "min_length" else ls.length_reward(name, mode, width)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    monkeypatch.setattr(trainer_module, "train", flagged_train)
    monkeypatch.setattr(ls.study, "length_reward", recording_length_reward)
    cfg = ls.LengthStudyConfig(out=str(tmp_path / "out"), work=str(tmp_path / "work"), quick=True,
                               rewards=("min_length",), losses=("reinforce",), refresh_every=2)
    results = ls.run_length_study(cfg)
    resolved = cfg.resolved()
    steps, per_round = resolved.steps, resolved.prompts_per_step * resolved.refresh_every * resolved.samples_per_prompt
    assert steps == 4

    # the reference warm-up's steps come first; then offline training (steps only), then on-policy
    tail = events[events.index("reward"):]
    rounds, run = [], 0
    for event in tail:
        if event == "reward":
            run += 1
        elif run:
            rounds.append(run)
            run = 0
    assert rounds == [per_round] * (steps // resolved.refresh_every)
    # between two rounds: exactly refresh_every optimizer steps
    text = "".join("R" if e == "reward" else "S" for e in tail)
    chunks = [c for c in text.split("R") if c]
    assert chunks == ["S" * resolved.refresh_every] * (steps // resolved.refresh_every)
    assert events.count("step") - tail.count("step") >= steps  # the offline run trained without scoring

    scored = {r["arm"]: r["samples_scored"] for r in results["runs"]}
    assert scored == {"offline": 0, "on_policy": steps * resolved.prompts_per_step * resolved.samples_per_prompt}


@pytest.mark.slow
def test_quick_run_end_to_end_through_the_command_line(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("DFTKERN_LENGTH_MODE", None)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dftkern.experiments.length_study", "--quick", "--out", str(out),
                           "--work", str(work)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"length_study --quick took {seconds:.1f} s")  # a speed figure, not a test condition (timeout above)
    for name in ("results.md", "results.json", "reward_vs_steps.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    cfg = results["config"]
    # one run per (reward, loss, arm); ppo/ppo_2ep/grpo/dpo_sampler have only the on-policy arm
    assert len(results["runs"]) == len(ls.LENGTH_REWARDS) * sum(len(ls.arms_of(loss)) for loss in ls.LOSSES)
    assert len(ls.LENGTH_REWARDS) * len(ls.LOSSES) * len(ls.ARMS) - len(results["runs"]) == \
        len(ls.LENGTH_REWARDS) * len(ls.ON_POLICY_ONLY)
    table = (out / "results.md").read_text()
    for reward in ls.LENGTH_REWARDS:
        for loss in ls.LOSSES:
            for arm in ("offline", "on-policy"):
                assert (f"| {reward} | {loss} | {arm} |" in table) == (arm.replace("-", "_") in ls.arms_of(loss))
    reference = results["reference"]
    assert reference["mode_length"] == ls.modal_length(
        [int(k) for k, c in reference["length_histogram"].items() for _ in range(c)])
    for run in results["runs"]:
        # on-policy: n samples per prompt and step; DPO's pair rule also scores the data's answer once;
        # ppo_2ep trains twice on each sampled window, so it samples for half the steps
        per_prompt = cfg["samples_per_prompt"] + (1 if run["loss"] in ("dpo", "dpo_sampler") else 0)
        sampled_steps = cfg["steps"] // 2 if run["loss"] == "ppo_2ep" else cfg["steps"]
        expected = sampled_steps * cfg["prompts_per_step"] * per_prompt if run["arm"] == "on_policy" else 0
        assert run["samples_scored"] == expected, run
        # every arm starts from the reference model, evaluated on the same prompts and seeds
        assert run["reward_at_step"]["0"] == pytest.approx(reference["reward"][run["reward"]])
        assert all(math.isfinite(v) for v in run["reward_at_step"].values())
    # the reference model is reused by a second invocation
    assert (work / "reference" / "reference.json").exists()
    # which reference DPO had, and whether PPO's clip acted, read off the trainer's own metrics
    metrics = {(r["reward"], r["loss"], r["arm"]): r["train_metrics"] for r in results["runs"]}
    for reward in ls.LENGTH_REWARDS:
        # the moving sampler as reference: every step starts at margin 0; the fixed initial model: not
        assert abs(metrics[(reward, "dpo_sampler", "on_policy")]["margin_mean"]["mean"]) < 1e-4
        assert abs(metrics[(reward, "dpo", "on_policy")]["margin_mean"]["last"]) > 1e-3
        assert abs(metrics[(reward, "dpo", "offline")]["margin_mean"]["last"]) > 1e-3
        for loss in ("ppo", "grpo"):  # one update per fresh window: ratio 1, nothing clipped
            m = metrics[(reward, loss, "on_policy")]
            assert abs(m["ratio_mean"]["mean"] - 1) < 1e-5 and m["clip_fraction_low"]["mean"] == 0
            assert m["clip_fraction_high"]["mean"] == 0
        two = metrics[(reward, "ppo_2ep", "on_policy")]
        assert two["clip_fraction_low"]["mean"] + two["clip_fraction_high"]["mean"] > 0
        assert "kl_mean" in metrics[(reward, "grpo", "on_policy")] and "kl_mean" not in metrics[(reward, "ppo", "on_policy")]
        assert metrics[(reward, "rwr", "on_policy")] == {}
    assert "Training diagnostics" in table and "First checkpoint step" in table


def test_paired_comparisons_pair_the_same_seeds():
    """Final and mean-over-training rewards are differenced seed by seed, against the maximum-likelihood
    arm (rwr) and across arms; the markdown lists every row."""
    cfg = ls.LengthStudyConfig(seeds=(3, 1), rewards=("min_length",), losses=("rwr", "dpo")).resolved()
    curves = {("rwr", "offline"): {3: [-2.8, -2.6, -2.5], 1: [-2.8, -2.7, -2.4]},
              ("dpo", "offline"): {3: [-2.8, -2.2, -2.1], 1: [-2.8, -2.5, -2.3]},
              ("rwr", "on_policy"): {3: [-2.8, -1.0, 0.0], 1: [-2.8, -1.5, -0.2]},
              ("dpo", "on_policy"): {3: [-2.8, -0.5, 0.0], 1: [-2.8, -0.4, 0.0]}}
    runs = [{"reward": "min_length", "loss": loss, "arm": arm, "seed": seed, "final_reward": values[-1],
             "reward_at_step": {str(step): v for step, v in zip((0, 20, 40), values)}}
            for (loss, arm), per_seed in curves.items() for seed, values in per_seed.items()]
    rows = ls.paired_comparisons(runs, cfg)
    by_key = {(row["loss"], row["arm"]): row for row in rows}
    assert set(by_key) == {("dpo", "offline"), ("dpo", "on_policy"), ("rwr", "on_policy - offline"),
                           ("dpo", "on_policy - offline")}
    off = by_key[("dpo", "offline")]
    assert off["vs"] == "rwr" and off["final"]["n"] == 2 and off["final"]["wins"] == 2
    assert off["final"]["mean"] == pytest.approx((0.4 + 0.1) / 2)
    assert off["auc"]["mean"] == pytest.approx(((0.4 + 0.4) / 3 + (0.2 + 0.1) / 3) / 2)
    on = by_key[("dpo", "on_policy")]
    assert on["final"]["mean"] == pytest.approx(0.1) and on["final"]["wins"] == 1
    assert by_key[("rwr", "on_policy - offline")]["final"]["mean"] == pytest.approx((2.5 + 2.2) / 2)
    text = ls.format_paired(rows, 2)
    assert text.count("| min_length |") == 4 and "dpo − rwr, on-policy" in text and "rwr, on-policy − offline" in text


def test_command_line_options():
    parser = ls.build_parser()
    args = parser.parse_args(["--losses", "rwr", "dpo", "--rewards", "mode_length", "--num-checkpoints", "2"])
    assert args.losses == ["rwr", "dpo"] and args.rewards == ["mode_length"] and args.num_checkpoints == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--losses", "ppo_unknown"])
    assert ls.LengthStudyConfig().resolved().checkpoint_steps() == [0, 20, 40, 60, 80, 100, 120, 140, 160]
    assert ls.LOSSES[0] == ls.MAXIMUM_LIKELIHOOD == "rwr"


def test_offline_files_of_the_maximum_likelihood_arm_are_the_group_of_samples(tmp_path):
    """rwr sees exactly the rows reinforce sees (the n samples with their rewards); only the loss differs."""
    prompts = _write(tmp_path / "prompts.jsonl", [{"id": "a", "prompt": "12+30=", "response": "42"}])
    samples = _write(tmp_path / "samples.jsonl", [
        {"prompt_id": "a", "responses": ["420", "4", "42"], "response_token_ids": [[7, 5, 3, 2], [7, 2], [7, 5, 2]]}])
    rwr = ls.build_offline_files("rwr", "min_length", prompts, samples, tmp_path / "rwr")
    reinforce = ls.build_offline_files("reinforce", "min_length", prompts, samples, tmp_path / "rf")
    for got, want in zip(rwr, reinforce):
        assert got.read_text() == want.read_text()


def test_arms_and_trainer_options_of_each_loss(tmp_path):
    """ppo/ppo_2ep/grpo/dpo_sampler run on-policy only; on-policy dpo takes the initial model as its
    reference, dpo_sampler the moving sampler; ppo_2ep is ppo with two updates per window."""
    assert ls.arms_of("rwr") == ls.arms_of("dpo") == ls.arms_of("reinforce") == ("offline", "on_policy")
    for loss in ("ppo", "ppo_2ep", "grpo", "dpo_sampler"):
        assert ls.arms_of(loss) == ("on_policy",)
    with pytest.raises(ValueError, match="loss must be one of"):
        ls.arms_of("sft")
    from dftkern.experiments.length_study.config import trainer_loss
    from dftkern.experiments.length_study.study import _train_config

    assert [trainer_loss(loss) for loss in ls.LOSSES] == ["rwr", "dpo", "dpo", "reinforce", "ppo", "ppo", "grpo"]
    cfg = ls.LengthStudyConfig(quick=True).resolved()
    kwargs = dict(reference=tmp_path / "ref", run_dir=tmp_path / "run", reward=ls.min_length_reward, seed=0,
                  prompts_file=tmp_path / "p.jsonl", samples_file=tmp_path / "s.jsonl", save_every=2)
    configs = {loss: _train_config(cfg, loss=loss, arm="on_policy", **kwargs) for loss in ls.LOSSES}
    assert configs["dpo"].on_policy.reference == "initial"
    assert configs["dpo_sampler"].on_policy.reference == "sampler"
    assert configs["dpo"].objective.loss == configs["dpo_sampler"].objective.loss == "dpo"
    assert configs["dpo"].objective.beta == cfg.dpo_beta and configs["rwr"].objective.beta == cfg.rwr_beta
    assert configs["ppo_2ep"].objective.loss == "ppo" and configs["ppo_2ep"].on_policy.ppo_epochs == 2
    assert configs["ppo"].on_policy.ppo_epochs == configs["grpo"].on_policy.ppo_epochs == 1
    for loss, c in configs.items():
        assert c.optim.max_steps == cfg.steps and c.optim.lr == cfg.lr[loss] and c.on_policy.samples_per_prompt == 4
    with pytest.raises(ValueError, match="has no 'offline' arm"):
        _train_config(cfg, loss="ppo", arm="offline", **kwargs)
    with pytest.raises(ValueError, match="no offline arm"):
        ls.build_offline_files("grpo", "min_length", tmp_path / "p.jsonl", tmp_path / "s.jsonl", tmp_path / "x")


def test_paired_comparisons_of_on_policy_only_losses_and_the_dpo_reference():
    """On-policy-only losses are compared with rwr on-policy only and have no on-policy − offline row;
    dpo − dpo_sampler compares the fixed and the moving DPO reference, seed by seed."""
    cfg = ls.LengthStudyConfig(seeds=(0, 1, 2), rewards=("mode_length",),
                               losses=("rwr", "dpo", "dpo_sampler", "ppo")).resolved()
    finals = {("rwr", "offline"): [0.80, 0.81, 0.79], ("rwr", "on_policy"): [0.99, 0.98, 0.97],
              ("dpo", "offline"): [0.95, 0.96, 0.94], ("dpo", "on_policy"): [0.99, 0.99, 0.96],
              ("dpo_sampler", "on_policy"): [0.97, 0.99, 0.98], ("ppo", "on_policy"): [0.90, 1.00, 0.99]}
    runs = [{"reward": "mode_length", "loss": loss, "arm": arm, "seed": seed, "final_reward": v,
             "reward_at_step": {"0": 0.75, "10": v}} for (loss, arm), values in finals.items()
            for seed, v in zip(cfg.seeds, values)]
    rows = ls.paired_comparisons(runs, cfg)
    keys = [(row["loss"], row["vs"], row["arm"]) for row in rows]
    assert keys == [("dpo", "rwr", "offline"), ("dpo", "rwr", "on_policy"), ("dpo_sampler", "rwr", "on_policy"),
                    ("ppo", "rwr", "on_policy"), ("dpo", "dpo_sampler", "on_policy"),
                    ("rwr", None, "on_policy - offline"), ("dpo", None, "on_policy - offline")]
    fixed_vs_moving = rows[keys.index(("dpo", "dpo_sampler", "on_policy"))]["final"]
    diffs = [0.99 - 0.97, 0.99 - 0.99, 0.96 - 0.98]
    assert fixed_vs_moving["mean"] == pytest.approx(sum(diffs) / 3) and fixed_vs_moving["wins"] == 1
    sd = math.sqrt(sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2)
    assert fixed_vs_moving["sd"] == pytest.approx(sd)
    assert "dpo − dpo_sampler, on-policy" in ls.format_paired(rows, 3)


def test_steps_to_optimum():
    cfg = ls.LengthStudyConfig(seeds=(0, 1), rewards=("min_length", "mode_length"), losses=("ppo",)).resolved()
    curves = {("min_length", 0): [-2.8, -0.5, -0.05, 0.0], ("min_length", 1): [-2.8, -1.0, -0.2, -0.11],
              ("mode_length", 0): [0.75, 0.98, 0.97, 0.99], ("mode_length", 1): [0.75, 0.9, 0.979, 0.999]}
    runs = [{"reward": reward, "loss": "ppo", "arm": "on_policy", "seed": seed,
             "reward_at_step": {str(s): v for s, v in zip((0, 20, 40, 60), values)}}
            for (reward, seed), values in curves.items()]
    rows = ls.steps_to_optimum(runs, cfg)
    assert [(row["reward"], row["steps"]) for row in rows] == [("min_length", [40, None]), ("mode_length", [20, 60])]
    assert rows[0]["threshold"] == pytest.approx(-0.1) and rows[1]["threshold"] == pytest.approx(0.98)
    assert "| min_length | ppo | on-policy | -0.10 | 40 / – |" in ls.format_steps_to_optimum(rows)


@pytest.mark.slow
def test_workers_give_the_same_runs_as_one_process(tmp_path):
    """Runs trained in two spawned worker processes equal the in-process runs (each run is seeded on its own)."""
    common = dict(work=str(tmp_path / "work"), quick=True, rewards=("mode_length",), losses=("rwr", "ppo_2ep"))
    one = ls.run_length_study(ls.LengthStudyConfig(out=str(tmp_path / "one"), **common))
    two = ls.run_length_study(ls.LengthStudyConfig(out=str(tmp_path / "two"), workers=2, **common))
    assert two["workers"] == 2 and len(one["runs"]) == len(two["runs"]) == 3
    for a, b in zip(one["runs"], two["runs"]):
        assert (a["loss"], a["arm"], a["seed"]) == (b["loss"], b["arm"], b["seed"])
        assert a["reward_at_step"] == b["reward_at_step"] and a["length_at_step"] == b["length_at_step"]
        assert a["train_metrics"] == b["train_metrics"] and a["samples_scored"] == b["samples_scored"]
