"""Checkpoint files: trainer state as JSON + safetensors (never unpickled), crafted and damaged files."""

from __future__ import annotations

import json
import math
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dftkern.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    read_trainer_state,
    restore_rng_state,
)
from dftkern.train.data import Row, TrainExample
from dftkern.train.serialization import StateFileError, load_state, save_state


class _TouchOnUnpickle:
    """Unpickling this creates ``path``: the shape of a crafted checkpoint that runs code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_state_round_trip_is_exact(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95))
    sum(p.sum() for p in params).backward()
    optimizer.step()
    example = TrainExample(3, "ex-3", [Row((1, 5, 6, 2), 2), Row((1, 5, 7), 2)], ref_logps=[-1.5, -2.25],
                           rewards=[1.0, 0.0])
    state = {"optimizer": optimizer.state_dict(), "rng": [capture_rng_state()], "window": {3: example},
             "floats": [0.1, -0.0, float("inf"), 1e-310], "nested": {"__tensor__": "not a tag", "t": (1, "a", None)},
             "array": np.arange(6, dtype=np.uint32).reshape(2, 3), "scalar": np.float64(2.5)}
    save_state(tmp_path / "s", state)
    back = load_state(tmp_path / "s")
    assert back["window"] == {3: example} and isinstance(back["window"][3].rows[0], Row)
    assert back["nested"] == {"__tensor__": "not a tag", "t": (1, "a", None)}
    assert back["floats"][:2] == [0.1, -0.0] and math.copysign(1, back["floats"][1]) == -1
    assert back["floats"][2:] == [float("inf"), 1e-310]
    assert back["array"].dtype == np.uint32 and back["array"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert back["scalar"] == 2.5
    saved = optimizer.state_dict()
    assert back["optimizer"]["param_groups"] == saved["param_groups"]  # betas stay a tuple
    for key, entry in saved["state"].items():
        for name, value in entry.items():
            assert torch.equal(back["optimizer"]["state"][key][name], value)
            assert back["optimizer"]["state"][key][name].dtype == value.dtype


def test_rng_states_restore_bit_exactly(tmp_path):
    random.random(), np.random.rand(), torch.rand(1)
    save_state(tmp_path / "rng", capture_rng_state())
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    restore_rng_state(load_state(tmp_path / "rng"))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_unstorable_values_are_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"state.bad: cannot store a _TouchOnUnpickle"):
        save_state(tmp_path / "s", {"bad": _TouchOnUnpickle(tmp_path / "x")})
    assert not list(tmp_path.iterdir())


def _checkpoint_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run" / "checkpoints" / "step-00000002"
    path.mkdir(parents=True)
    return path


def test_a_crafted_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    # sanity: the payload really runs when unpickled (demonstrated on another marker)
    demo = tmp_path / "demo-marker"
    pickle.loads(pickle.dumps(_TouchOnUnpickle(demo)))
    assert demo.exists()

    checkpoint = _checkpoint_dir(tmp_path)
    torch.save({"step": 2, "payload": _TouchOnUnpickle(marker)}, checkpoint / "trainer_state.pt")
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt: a pickled trainer state .* not loaded"):
        read_trainer_state(checkpoint)
    # the same bytes under the new names: a foreign file, refused with its name
    payload = (checkpoint / "trainer_state.pt").read_bytes()
    (checkpoint / "trainer_state.json").write_bytes(payload)
    (checkpoint / "trainer_state.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: not (a UTF-8 text file|valid JSON)"):
        read_trainer_state(checkpoint)
    save_state(checkpoint / "trainer_state", {"step": 2})
    (checkpoint / "trainer_state.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"trainer_state\.safetensors: cannot read the tensors"):
        read_trainer_state(checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize("tree, message", [
    ({"__record__": "Popen", "fields": {"args": "touch x"}}, "unknown record type 'Popen'"),
    ({"__tensor__": "t9"}, "refers to tensor 't9'"),
    ({"__ndarray__": {"dtype": "object", "shape": [1], "data": [1]}}, "numpy dtype 'object'"),
    ({"__record__": "Row", "fields": {"input_ids": [1]}}, "record Row needs the fields"),
    ({"__tuple__": 3}, "__tuple__ must hold a list"),
])
def test_foreign_state_entries_name_the_file_and_entry(tmp_path, tree, message):
    save_state(tmp_path / "s", {})
    (tmp_path / "s.json").write_text(json.dumps({"format": "dftkern-state", "version": 1, "state": {"x": tree}}))
    with pytest.raises(StateFileError, match=rf"s\.json: state\.x: .*{message}"):
        load_state(tmp_path / "s")


def test_truncated_state_files_name_the_file(tmp_path):
    save_state(tmp_path / "s", {"u": torch.arange(100.0)})
    tensors = tmp_path / "s.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-7])
    with pytest.raises(StateFileError, match=r"s\.safetensors: cannot read the tensors"):
        load_state(tmp_path / "s")
    save_state(tmp_path / "s", {"u": torch.arange(100.0)})
    text = (tmp_path / "s.json").read_text()
    (tmp_path / "s.json").write_text(text[: len(text) // 2])
    with pytest.raises(StateFileError, match=r"s\.json: not valid JSON"):
        load_state(tmp_path / "s")
    (tmp_path / "s.json").write_text('{"state": {}}')
    with pytest.raises(StateFileError, match=r"s\.json: not a dftkern state file"):
        load_state(tmp_path / "s")


def test_stale_temporaries_of_any_save_are_removed(tmp_path):
    """Whatever an interrupted save leaves (.tmp-step-N, .tmp-step-N-PID, .old-step-N-PID, dirs or
    files) is removed; checkpoints and anything else in the folder stay."""
    from dftkern.train.checkpoint import remove_stale_temporaries

    root = tmp_path / "checkpoints"
    root.mkdir()
    stale = [".tmp-step-00000006", ".tmp-step-00000006-123", ".old-step-00000004-9"]
    for name in stale:
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(b"half")
    (root / ".tmp-step-00000007-5").write_bytes(b"")  # a file, not a folder
    kept = ["step-00000002", "corrupt-step-00000003", ".notes"]
    for name in kept:
        (root / name).mkdir()
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale + [".tmp-step-00000007-5"])
    assert sorted(p.name for p in root.iterdir()) == sorted(kept)
