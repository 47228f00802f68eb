"""Resuming from damaged checkpoints: fall back to the newest intact one, or fail in one line."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file
from test_train_checkpoint import _TouchOnUnpickle
from train_helpers import small_run

from dftkern.train.checkpoint import CheckpointError, CheckpointWarning, list_checkpoints
from dftkern.train.cli import main
from dftkern.train.data import DataError
from dftkern.train.ref_logps import RefLogpsConfig, compute_ref_logps
from dftkern.train.serialization import load_state, save_state
from dftkern.train.trainer import train


def _cfg(workspace, out, **overrides):
    return small_run(workspace, out, **{**dict(max_steps=6, save_every=2, keep_checkpoints=3, lr=3e-3), **overrides})


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _wrong_optimizer_shape(checkpoint):
    state = load_state(checkpoint / "trainer_state")
    entry = next(iter(state["optimizer"]["state"].values()))
    entry["exp_avg"] = entry["exp_avg"].reshape(-1)[:3].clone()
    save_state(checkpoint / "trainer_state", state)


DAMAGE = {
    "model.safetensors": lambda c: _truncate(c / "model.safetensors"),
    "trainer_state.safetensors": lambda c: _truncate(c / "trainer_state.safetensors", keep=0.9),
    "trainer_state.json": lambda c: (c / "trainer_state.json").write_text('{"format": "dftkern-state", "vers'),
    "config.json": lambda c: (c / "config.json").unlink(),
    "optimizer": _wrong_optimizer_shape,
}


@pytest.fixture(scope="module")
def stopped_run(workspace, tmp_path_factory):
    """A run stopped after step 4 (checkpoints step-2 and step-4), and a run resumed directly from its step-2."""
    root = tmp_path_factory.mktemp("stopped")
    train(_cfg(workspace, root / "run", stop_after=4))
    direct = root / "direct"
    shutil.copytree(root / "run", direct)
    result = train(_cfg(workspace, direct, resume=str(direct / "checkpoints" / "step-00000002")))
    return root / "run", load_file(str(result.final_checkpoint / "model.safetensors"))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_older_one(workspace, stopped_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(stopped_run[0], run)
    DAMAGE[damage](run / "checkpoints" / "step-00000004")
    stale = run / "checkpoints" / ".tmp-step-00000006-12345"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    with pytest.warns(CheckpointWarning) as caught:
        result = train(_cfg(workspace, run, resume="auto"))
    message = str(caught[0].message)
    assert "step-00000004" in message and (damage if damage != "optimizer" else "optimizer") in message
    assert "resumed from" in message and "step-00000002" in message
    assert result.steps == 6 and not stale.exists()
    assert (run / "checkpoints" / "corrupt-step-00000004").is_dir()  # kept for inspection, out of the way
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004", "step-00000006"]
    weights = load_file(str(result.final_checkpoint / "model.safetensors"))
    for name, value in stopped_run[1].items():
        assert torch.equal(weights[name], value), name  # identical to resuming from step-2 directly


def test_keep_checkpoints_is_honoured_after_a_fallback(workspace, stopped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run[0], run)
    DAMAGE["model.safetensors"](run / "checkpoints" / "step-00000004")
    with pytest.warns(CheckpointWarning):
        train(_cfg(workspace, run, resume="auto", keep_checkpoints=1))
    assert [p.name for p in list_checkpoints(run)] == ["step-00000006"]


def test_no_intact_checkpoint_is_one_error_line(workspace, stopped_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(stopped_run[0], run)
    marker = tmp_path / "pwned"
    for checkpoint in (run / "checkpoints").iterdir():  # step-4 damaged, step-2 a crafted legacy pickle
        (checkpoint / "trainer_state.json").unlink()
        (checkpoint / "trainer_state.safetensors").unlink()
        torch.save({"payload": _TouchOnUnpickle(marker)}, checkpoint / "trainer_state.pt")
    DAMAGE["model.safetensors"](run / "checkpoints" / "step-00000004")
    code = main(["train", "--model", str(workspace.model), "--data", str(workspace.data), "--negatives",
                 str(workspace.negatives), "--out", str(run), "--batch-size", "4", "--max-steps", "6",
                 "--save-every", "2", "--lr", "3e-3", "--device", "cpu", "--no-progress", "--no-plot",
                 "--keep-checkpoints", "3", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "no intact checkpoint" in err and "trainer_state.pt: a pickled trainer state" in err
    assert not marker.exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]


def test_an_explicit_damaged_checkpoint_is_an_error_naming_the_file(workspace, stopped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run[0], run)
    DAMAGE["trainer_state.safetensors"](run / "checkpoints" / "step-00000004")
    with pytest.raises(CheckpointError, match=r"step-00000004/trainer_state\.safetensors: unreadable safetensors file"):
        train(_cfg(workspace, run, resume=str(run / "checkpoints" / "step-00000004")))


def test_changed_settings_are_refused_not_skipped(workspace, stopped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run[0], run)
    with pytest.raises(ValueError, match=r"written with batch_size=4 \(now 2\), seed=0 \(now 1\)"):
        train(_cfg(workspace, run, resume="auto", batch_size=2, seed=1))
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004"]


def test_a_damaged_reference_cache_is_named_and_recomputed(workspace, tmp_path):
    negatives = tmp_path / "neg.jsonl"
    shutil.copy(workspace.negatives, negatives)
    cache = tmp_path / workspace.ref_cache.name
    shutil.copy(workspace.ref_cache, cache)
    _truncate(cache, keep=0.7)
    with pytest.raises(DataError, match=rf"{cache.name}: cannot read the reference log-prob cache"):
        train(_cfg(workspace, tmp_path / "r", negatives=str(negatives), max_steps=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = compute_ref_logps(RefLogpsConfig(model=str(workspace.model), data=str(workspace.data),
                                                 negatives=str(negatives), device="cpu", progress=False))
    assert again == cache and any("recomputing the damaged cache" in str(w.message) for w in caught)
    assert load_file(str(cache))["row_logps"].shape == (24, 3)
    train(_cfg(workspace, tmp_path / "r2", negatives=str(negatives), max_steps=1))
