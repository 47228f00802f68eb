"""The collator's host metadata and ``--accum-dtype``.

* ``collate`` computes ``valid_positions`` (labels != -100, flat, int64) on the CPU and
  ``Batch.to`` keeps it and ``cu_seqlens`` there, so the fused losses find their valid tokens
  without the device-to-host sync the engine otherwise needs on CUDA;
* the trainer's objective hands those positions to the engine for every loss family (including
  the pair selection of DPO-style losses and the prompt-shared loss view), and the engine checks
  them against the labels on CPU, so a wrong position would fail these runs;
* ``--accum-dtype weight`` reaches the engine: with bf16 autocast the head's ``dW`` is then
  accumulated in bf16 (fp32 by default).
"""

from __future__ import annotations

import pytest
import torch
from train_helpers import small_run

import dftkern.chunking as chunking
import dftkern.functional as functional
from dftkern.train.batching import IGNORE_INDEX, Row, TrainExample, collate, valid_label_positions
from dftkern.train.cli import build_parser
from dftkern.train.prefix_sharing import collate_shared
from dftkern.train.trainer import train


def _examples() -> list[TrainExample]:
    return [TrainExample(0, "a", [Row((1, 2, 3, 4), 2), Row((1, 2, 5), 2)], ref_logps=[-1.0, -2.0]),
            TrainExample(1, "b", [Row((6, 7, 8, 9, 10), 3), Row((6, 7, 8, 11), 3)], ref_logps=[-3.0, -4.0])]


@pytest.mark.parametrize("packed", [False, True])
def test_collate_computes_valid_positions_on_the_cpu_and_to_keeps_them_there(packed):
    batch = collate(_examples(), pad_token_id=0, packed=packed)
    expected = (batch.labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    assert batch.valid_positions.dtype == torch.int64 and torch.equal(batch.valid_positions, expected)
    assert batch.valid_positions.numel() == 2 + 1 + 2 + 1  # response tokens of the four rows
    moved = batch.to("meta")  # any other device: the data moves, the host metadata does not
    assert moved.labels.device.type == "meta" and moved.input_ids.device.type == "meta"
    assert moved.valid_positions.device.type == "cpu" and torch.equal(moved.valid_positions, expected)
    if packed:
        assert moved.cu_seqlens.device.type == "cpu"


def test_the_shared_loss_view_gets_its_positions_when_moved():
    shared = collate_shared(_examples(), pad_token_id=0, with_ref_logps=True).to("cpu")
    labels = shared.loss_batch.labels
    assert torch.equal(shared.loss_batch.valid_positions, valid_label_positions(labels))


@pytest.mark.parametrize("loss, share", [("dft", False), ("dft", True), ("sft", False), ("dpo", False),
                                         ("dpo", True), ("rloo", False), ("simpo", True)])
def test_the_trainer_hands_the_positions_to_the_engine(workspace, tmp_path, monkeypatch, loss, share):
    seen = []
    original = chunking.ValidTokens.find.__func__

    def spy(cls, labels, ignore_index, valid_positions=None, **kwargs):
        if labels.requires_grad is False and torch.is_grad_enabled():
            seen.append(valid_positions)
        return original(cls, labels, ignore_index, valid_positions, **kwargs)

    monkeypatch.setattr(chunking.ValidTokens, "find", classmethod(spy))
    train(small_run(workspace, tmp_path / "run", loss=loss, max_steps=2, share_prompt=share,
                    negatives=None if loss == "sft" else str(workspace.negatives)))
    assert seen and all(v is not None and v.device.type == "cpu" for v in seen), seen


def test_accum_dtype_weight_reaches_the_engine(workspace, tmp_path, monkeypatch):
    parser = build_parser()
    base = ["train", "--model", "m", "--data", "d", "--out", "o"]
    assert vars(parser.parse_args(base))["accum_dtype"] == "fp32"
    assert vars(parser.parse_args([*base, "--accum-dtype", "weight"]))["accum_dtype"] == "weight"
    with pytest.raises(ValueError, match=r"accum_dtype must be one of \('fp32', 'weight'\), got 'bf16'"):
        small_run(workspace, tmp_path, accum_dtype="bf16")
    seen = []
    original = functional.resolve_accum_dtype

    def spy(accum_dtype, weight):
        resolved = original(accum_dtype, weight)
        seen.append((accum_dtype, resolved))
        return resolved

    monkeypatch.setattr(functional, "resolve_accum_dtype", spy)
    for accum, expected in (("fp32", torch.float32), ("weight", torch.bfloat16)):  # bf16 autocast: a bf16 head
        seen.clear()
        train(small_run(workspace, tmp_path / accum, loss="dft", precision="bf16", max_steps=1, accum_dtype=accum))
        assert seen and set(seen) == {(accum, expected)}, seen
