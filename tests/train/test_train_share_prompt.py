"""``train --share-prompt``: the backbone runs once over each group's prompt, and training is the same.

End to end through ``train``: three optimizer steps with the prompt-shared layout end with the
weights of three steps with the unshared one (float32 rounding: the layouts sum the prompt's
gradient in a different order), for every trainer loss with several rows per prompt, offline and
on-policy, padded and packed, with gradient checkpointing, and under 2-process FSDP2. And the
switch itself: on by default where the model passes the probe, off (with the reason) otherwise.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import small_run, subprocess_env

from dftkern.train import prefix_sharing, trainer
from dftkern.train.cli import build_parser
from dftkern.train.options import flat_values, option_names
from dftkern.train.prefix_sharing import PREFIX_SDPA, SharedPromptUnsupported
from dftkern.train.trainer import train

ATOL = 1e-4  # measured differences are <= 1e-5; one training step moves weights by ~1e-3 (lr=1e-3, Adam)


def _weights(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.final_checkpoint / "model.safetensors"))


def _run_info(out) -> dict:
    return json.loads((out / "train_config.json").read_text())


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_training(workspace, shared, plain, shared_dir, plain_dir) -> None:
    a, b = _weights(shared), _weights(plain)
    base = load_file(str(workspace.model / "model.safetensors"))
    moved = max(float((b[name] - base[name]).abs().max()) for name in b)
    assert moved > 10 * ATOL  # training moved the weights far more than the tolerance
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=ATOL, msg=name)
    assert _losses(shared_dir) == pytest.approx(_losses(plain_dir), rel=1e-4, abs=1e-5)
    assert _run_info(shared_dir)["share_prompt_active"] and not _run_info(plain_dir)["share_prompt_active"]


@pytest.mark.parametrize("loss", ["dft", "dft2", "dpo", "ipo", "hinge", "simpo", "unlikelihood", "rwr", "reinforce",
                                  "rloo"])
def test_shared_prompt_trains_like_the_unshared_layout(workspace, tmp_path, loss):
    shared = train(small_run(workspace, tmp_path / "shared", loss=loss, share_prompt=True))
    plain = train(small_run(workspace, tmp_path / "plain", loss=loss, share_prompt=False))
    _assert_same_training(workspace, shared, plain, tmp_path / "shared", tmp_path / "plain")
    info = _run_info(tmp_path / "shared")
    assert info["attn_kernel"] == PREFIX_SDPA and info["attn"] == "auto"  # the kernel run; the option given


@pytest.mark.parametrize("loss", ["rloo", "dft", "dpo"])
def test_on_policy_shared_prompt_trains_like_the_unshared_layout(workspace, tmp_path, loss):
    common = dict(loss=loss, negatives=None, on_policy=True, reward="train_helpers:starts_with_one",
                  samples_per_prompt=3, sample_max_new_tokens=4)
    shared = train(small_run(workspace, tmp_path / "shared", share_prompt=True, **common))
    plain = train(small_run(workspace, tmp_path / "plain", share_prompt=False, **common))
    _assert_same_training(workspace, shared, plain, tmp_path / "shared", tmp_path / "plain")


@pytest.mark.parametrize("extra", [dict(packing="on"), dict(gradient_checkpointing=True),
                                   dict(attn="eager", gradient_checkpointing=True)],
                         ids=["packed", "checkpointing", "eager-checkpointing"])
def test_shared_prompt_against_packed_rows_checkpointing_and_eager(workspace, tmp_path, extra):
    shared = train(small_run(workspace, tmp_path / "shared", loss="dft", share_prompt=True, **extra))
    plain = train(small_run(workspace, tmp_path / "plain", loss="dft", share_prompt=False, **extra))
    _assert_same_training(workspace, shared, plain, tmp_path / "shared", tmp_path / "plain")
    info = _run_info(tmp_path / "shared")
    assert info["attn_kernel"] == (PREFIX_SDPA if "attn" not in extra else "eager")
    assert info["attn"] == extra.get("attn", "auto")


def test_on_by_default_where_a_prompt_has_several_rows(workspace, tmp_path, capsys):
    assert small_run(workspace, tmp_path).share_prompt is None  # neither flag: automatic
    train(small_run(workspace, tmp_path / "dft", loss="dft"))
    info = _run_info(tmp_path / "dft")
    assert info["share_prompt_active"] and info["share_prompt_reason"] == f"on ({PREFIX_SDPA})"
    train(small_run(workspace, tmp_path / "sft", loss="sft", negatives=None))
    info = _run_info(tmp_path / "sft")
    assert not info["share_prompt_active"] and "one row per prompt" in info["share_prompt_reason"]
    train(small_run(workspace, tmp_path / "off", loss="dft", share_prompt=False))
    assert _run_info(tmp_path / "off")["share_prompt_reason"] == "off (--no-share-prompt)"
    assert "--share-prompt" not in capsys.readouterr().err  # nothing to report in these three


DERIVED = {"world_size", "packed", "share_prompt_active", "share_prompt_reason", "attn_kernel", "total_steps",
           "num_examples", "negatives_pool", "dftkern_version"}


@pytest.mark.parametrize("attn", ["auto", "sdpa"])
def test_train_config_json_rebuilds_the_config_and_records_the_kernel(workspace, tmp_path, attn):
    """train_config.json holds the flat options as given (``attn`` included, though prompt sharing
    runs its own kernel) plus what the run derived: its options rebuild the TrainConfig, which resumes."""
    cfg = small_run(workspace, tmp_path / "run", loss="dft", attn=attn, max_steps=1)
    train(cfg)
    info = _run_info(tmp_path / "run")
    assert info["attn"] == attn and info["attn_kernel"] == PREFIX_SDPA and info["share_prompt_active"]
    options = option_names(trainer.TrainConfig)
    assert set(info) - options == DERIVED
    flat = {k: v for k, v in info.items() if k in options}
    rebuilt = trainer.TrainConfig(**flat)
    assert flat_values(rebuilt) == flat_values(cfg) == flat
    resumed = train(trainer.TrainConfig(**{**flat, "resume": "auto", "max_steps": 2}))
    assert resumed.steps == 2 and _run_info(tmp_path / "run")["attn"] == attn


def test_a_model_failing_the_probe_falls_back_or_fails_as_asked(workspace, tmp_path, monkeypatch, capsys):
    def refuse(causal_lm):
        raise SharedPromptUnsupported("hidden states differ from the unshared layout by 0.1 (probe)")

    monkeypatch.setattr(trainer, "prepare_shared_prompt_model", refuse)
    result = train(small_run(workspace, tmp_path / "auto", loss="dpo"))
    assert result.steps == 3 and not _run_info(tmp_path / "auto")["share_prompt_active"]
    assert "--share-prompt off: hidden states differ" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"share_prompt=True \(--share-prompt\): hidden states differ"):
        train(small_run(workspace, tmp_path / "explicit", loss="dpo", share_prompt=True))


def test_explicit_share_prompt_with_a_kernel_that_cannot_train_it_is_an_error(workspace, tmp_path):
    with pytest.raises(SharedPromptUnsupported, match="FlexAttention has no backward on CPU"):
        train(small_run(workspace, tmp_path / "flex", loss="dft", attn="flex_attention", share_prompt=True))


def test_command_line_switches():
    parser = build_parser()
    base = ["train", "--model", "m", "--data", "d", "--out", "o"]
    assert vars(parser.parse_args(base))["share_prompt"] is None
    assert vars(parser.parse_args([*base, "--share-prompt"]))["share_prompt"] is True
    assert vars(parser.parse_args([*base, "--no-share-prompt"]))["share_prompt"] is False
    with pytest.raises(ValueError, match=r"share_prompt must be True or False \(a bool\) \(or None\), got 'yes'"):
        trainer.TrainConfig(model="m", data="d", out="o", share_prompt="yes")


def test_a_nan_hidden_state_in_the_shared_layout_skips_the_step(workspace, tmp_path, monkeypatch):
    """The prompt-shared twin of test_train_nonfinite's NaN test: NaN at the first negative's loss
    positions -> that DFT group's state update and the optimizer step are skipped, u stays finite."""
    from dftkern.train.checkpoint import read_trainer_state

    calls = [0]
    original = prefix_sharing.shared_backbone_hidden

    def nan_in_one_negative(causal_lm, batch):
        hidden = original(causal_lm, batch)
        calls[0] += causal_lm.training  # not the start-up probe (eval mode)
        if calls[0] == 2 and causal_lm.training:
            bounds = batch.loss_batch.cu_seqlens.tolist()
            hidden = hidden.clone()
            hidden[bounds[1]:bounds[2]] = float("nan")  # row 1 = the first negative of the first example
        return hidden

    monkeypatch.setattr(prefix_sharing, "shared_backbone_hidden", nan_in_one_negative)
    result = train(small_run(workspace, tmp_path / "run", loss="dft", max_steps=4, share_prompt=True))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in records] == [False, True, False, False]
    assert records[1]["dft_skipped_groups"] > 0 and records[0]["dft_skipped_groups"] == 0
    assert torch.isfinite(read_trainer_state(result.final_checkpoint)["dft_state"]["u"]).all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fsdp2_two_processes_shared_equal_one_process_unshared(workspace, tmp_path):
    """torchrun, 2 processes x 2 prompts, --share-prompt with gradient checkpointing (FSDP2, gloo) vs
    1 process x 4 prompts, --no-share-prompt: the same examples per step, the same weights."""
    args = ["--model", str(workspace.model), "--data", str(workspace.data), "--negatives", str(workspace.negatives),
            "--loss", "rloo", "--max-steps", "3", "--lr", "1e-3", "--device", "cpu", "--no-progress", "--no-plot"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "dftkern.train", "train", *args, "--batch-size", "2",
               "--out", str(tmp_path / "fsdp"), "--share-prompt", "--gradient-checkpointing"]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _run_info(tmp_path / "fsdp")["share_prompt_active"] and _run_info(tmp_path / "fsdp")["world_size"] == 2
    single = train(small_run(workspace, tmp_path / "single", loss="rloo", share_prompt=False))
    a = load_file(str(tmp_path / "fsdp" / "checkpoints" / "step-00000003" / "model.safetensors"))
    b = _weights(single)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=2e-5, msg=name)
