"""Non-finite losses: the optimizer step is skipped and logged; too many in a row stop training."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import small_run

from dftkern.train import objectives
from dftkern.train.checkpoint import checkpoint_dir, read_trainer_state
from dftkern.train.cli import main
from dftkern.train.trainer import NonFiniteLossError, train


def _poison(monkeypatch, steps: set[int]) -> None:
    """Make the loss NaN on the given (1-based) training calls; with grad_accum=1 a call is a step."""
    calls = [0]
    original = objectives.Objective.__call__

    def poisoned(self, *args, **kwargs):
        loss, stats = original(self, *args, **kwargs)
        calls[0] += 1
        return (loss * float("nan") if calls[0] in steps else loss), stats

    monkeypatch.setattr(objectives.Objective, "__call__", poisoned)


def _cfg(workspace, out, **overrides):
    return small_run(workspace, out, **{**dict(loss="dpo", max_steps=6, lr=3e-3, save_every=1, keep_checkpoints=None), **overrides})


def _strict_json(line: str) -> dict:
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(line, parse_constant=refuse)


def test_nonfinite_steps_are_skipped_logged_and_do_not_move_the_weights(workspace, tmp_path, monkeypatch):
    _poison(monkeypatch, {2, 3, 5})
    result = train(_cfg(workspace, tmp_path / "run", max_nonfinite_steps=3))
    assert result.steps == 6
    records = [_strict_json(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r.get("skipped", False) for r in records] == [False, True, True, False, True, False]
    for r in records:
        if r.get("skipped"):
            assert r["loss"] is None and "loss" in r["nonfinite"] and "grad_norm" in r["nonfinite"]
        else:
            assert isinstance(r["loss"], float) and "nonfinite" not in r
    weights = {s: load_file(str(checkpoint_dir(tmp_path / "run", s) / "model.safetensors")) for s in range(1, 7)}
    for a, b, same in ((1, 2, True), (2, 3, True), (3, 4, False), (4, 5, True), (5, 6, False)):
        equal = all(torch.equal(weights[a][k], weights[b][k]) for k in weights[a])
        assert equal == same, (a, b)
    moments = [read_trainer_state(checkpoint_dir(tmp_path / "run", s))["optimizer"]["state"] for s in (1, 3)]
    assert all(torch.equal(moments[0][k]["exp_avg"], moments[1][k]["exp_avg"]) for k in moments[0])
    assert read_trainer_state(checkpoint_dir(tmp_path / "run", 3))["nonfinite_run"] == 2


def test_too_many_nonfinite_steps_in_a_row_stop_with_a_clear_error(workspace, tmp_path, monkeypatch):
    _poison(monkeypatch, {2, 3})
    with pytest.raises(NonFiniteLossError, match=r"2 optimizer step\(s\) in a row \(2-3\) .*--max-nonfinite-steps 2"):
        train(_cfg(workspace, tmp_path / "run", max_nonfinite_steps=2))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [_strict_json(line).get("skipped", False) for line in lines] == [False, True, True]


def test_the_command_line_reports_the_stop_in_one_line(workspace, tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, set(range(1, 10)))
    code = main(["train", "--model", str(workspace.model), "--data", str(workspace.data), "--out",
                 str(tmp_path / "run"), "--loss", "sft", "--batch-size", "4", "--max-steps", "5", "--device", "cpu",
                 "--no-progress", "--no-plot"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "3 optimizer step(s) in a row (1-3)" in err and "--max-nonfinite-steps 3" in err


def test_a_nan_example_in_dft_skips_the_step_and_leaves_the_state_finite(workspace, tmp_path, monkeypatch):
    """A NaN hidden state in one negative: the loss skips that group's DFTState update (reported as
    dft_skipped_groups), the trainer skips the optimizer step, and training goes on with finite u."""
    from dftkern.train import model as model_module

    calls = [0]
    original = model_module.backbone_hidden

    def nan_in_one_negative(causal_lm, batch):
        hidden = original(causal_lm, batch)
        calls[0] += 1
        if calls[0] == 2 and causal_lm.training:
            hidden = hidden.clone()
            hidden[1] = float("nan")  # row 1 = the first negative of the first example
        return hidden

    monkeypatch.setattr(model_module, "backbone_hidden", nan_in_one_negative)
    # the padded layout this poisons (row 1); the prompt-shared layout's version is in test_train_share_prompt.py
    result = train(_cfg(workspace, tmp_path / "run", loss="dft", max_steps=4, share_prompt=False))
    records = [_strict_json(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in records] == [False, True, False, False]
    assert records[1]["dft_skipped_groups"] > 0 and records[0]["dft_skipped_groups"] == 0
    assert all(isinstance(r["loss"], float) for r in records[2:])
    u = read_trainer_state(result.final_checkpoint)["dft_state"]["u"]
    assert torch.isfinite(u).all()
