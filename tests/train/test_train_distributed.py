"""FSDP2 on CPU (gloo): the same ``train`` command under torchrun, and resume under FSDP2.

2 processes x ``batch_size`` examples see the same examples per step as 1 process x
``2 * batch_size`` (see ExampleOrder), FSDP2 averages gradients over ranks and the loss is a mean
over groups, so both runs must end with (numerically) the same weights and the same DFTState.
The DFTState matching also shows it is synced: without the sync each rank would miss the other
rank's updates.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import subprocess_env

from dftkern.train.checkpoint import read_trainer_state
from dftkern.train.trainer import TrainConfig, train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(workspace, out, batch_size, steps):
    return ["--model", str(workspace.model), "--data", str(workspace.data), "--negatives", str(workspace.negatives),
            "--out", str(out), "--loss", "dft", "--batch-size", str(batch_size), "--max-steps", str(steps),
            "--lr", "1e-3", "--device", "cpu", "--no-progress", "--no-plot"]


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_with_double_batch(workspace, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "dftkern.train", "train",
               *_train_args(workspace, tmp_path / "fsdp", batch_size=2, steps=3)]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    single = train(TrainConfig(model=str(workspace.model), data=str(workspace.data), negatives=str(workspace.negatives),
                               out=str(tmp_path / "single"), loss="dft", batch_size=4, max_steps=3, lr=1e-3,
                               device="cpu", progress=False, plot=False))
    fsdp_ckpt = tmp_path / "fsdp" / "checkpoints" / "step-00000003"
    a = load_file(str(fsdp_ckpt / "model.safetensors"))
    b = load_file(str(single.final_checkpoint / "model.safetensors"))
    assert a.keys() == b.keys()  # tied LM head saved once, as in a plain save_pretrained
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=2e-5)
    sa, sb = read_trainer_state(fsdp_ckpt), read_trainer_state(single.final_checkpoint)
    assert sa["world_size"] == 2 and int(sa["dft_state"]["num_updates"].sum()) == 12
    torch.testing.assert_close(sa["dft_state"]["u"], sb["dft_state"]["u"], rtol=1e-4, atol=1e-5)
    assert torch.equal(sa["dft_state"]["num_updates"], sb["dft_state"]["num_updates"])


def _resume_worker(rank: int, port: int, root: str, ws: dict, results) -> None:
    import os

    import torch.distributed as dist

    # a CPU/gloo test: hide GPUs so nothing picks cuda:LOCAL_RANK on a 1-GPU machine
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        common = dict(model=ws["model"], data=ws["data"], negatives=ws["negatives"], loss="dft", batch_size=2,
                      max_steps=4, lr=1e-3, device="cpu", progress=False, plot=False)
        full = train(TrainConfig(out=f"{root}/full", **common))
        train(TrainConfig(out=f"{root}/split", stop_after=2, **common))
        resumed = train(TrainConfig(out=f"{root}/split", resume="auto", **common))
        common.pop("negatives")  # on-policy: samples drawn through the sharded model, in lockstep
        on_policy = train(TrainConfig(out=f"{root}/on_policy", on_policy=True, samples_per_prompt=2,
                                      sample_max_new_tokens=4, reward="dftkern.train.synthetic:addition_reward",
                                      **dict(common, max_steps=2)))
        if rank == 0:
            results.put((str(full.final_checkpoint), str(resumed.final_checkpoint), resumed.steps,
                         str(on_policy.final_checkpoint)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_resume_and_on_policy_sampling(workspace, tmp_path):
    """Under 2-process FSDP2: a stopped-and-resumed run equals an uninterrupted one bit for bit, and
    on-policy DFT (sampling through the sharded model) matches 1 process with double batch (sample
    seeds depend on the prompt, not on the rank)."""
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.SimpleQueue()
    ws = {"model": str(workspace.model), "data": str(workspace.data), "negatives": str(workspace.negatives)}
    torch.multiprocessing.start_processes(_resume_worker, args=(_free_port(), str(tmp_path), ws, results), nprocs=2,
                                          start_method="spawn")
    full, resumed, steps, on_policy = results.get()
    assert steps == 4 and full.endswith("step-00000004") and resumed.endswith("step-00000004")
    a, b = load_file(f"{full}/model.safetensors"), load_file(f"{resumed}/model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert torch.equal(read_trainer_state(full)["dft_state"]["u"], read_trainer_state(resumed)["dft_state"]["u"])
    single = train(TrainConfig(model=ws["model"], data=ws["data"], out=str(tmp_path / "on_policy_single"), loss="dft",
                               batch_size=4, max_steps=2, lr=1e-3, device="cpu", progress=False, plot=False,
                               on_policy=True, samples_per_prompt=2, sample_max_new_tokens=4,
                               reward="dftkern.train.synthetic:addition_reward"))
    a, b = load_file(f"{on_policy}/model.safetensors"), load_file(str(single.final_checkpoint / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=2e-5)
