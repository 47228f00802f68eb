"""patch_causal_lm under FSDP2 (``fully_shard``), 2 CPU processes over gloo.

Each rank runs the patched, sharded model on its own batch and backpropagates; FSDP2 averages the
gradients over ranks. Every rank also computes, in plain PyTorch without sharding, the unpatched
model's loss on both batches; the all-gathered FSDP gradients must equal the mean of those
gradients. Two layouts: the head inside the root unit (FSDP2 unshards it before our forward runs),
and the head in its own unit (its weight is a DTensor shard that dftkern all-gathers).
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from integ_helpers import batch, free_port, make_model

pytest.importorskip("transformers")

WORLD_SIZE = 2


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        for head_unit in (False, True):  # one process group for both layouts (spawning costs more than the runs)
            _run_layout(rank, out_dir, head_unit)
    finally:
        dist.destroy_process_group()


def _run_layout(rank: int, out_dir: str, head_unit: bool) -> None:
    from torch.distributed.fsdp import fully_shard

    from dftkern.integrations.transformers import patch_causal_lm

    model = make_model("llama")
    reference = copy.deepcopy(model)
    for layer in model.model.layers:
        fully_shard(layer)
    if head_unit:
        fully_shard(model.lm_head)
    fully_shard(model)
    patch_causal_lm(model)
    ids, mask, labels = batch(seed=rank)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = {name: p.grad.full_tensor().clone() for name, p in model.named_parameters()}

    expected_losses = []
    for r in range(WORLD_SIZE):  # the unpatched, unsharded model on every rank's batch
        ids_r, mask_r, labels_r = batch(seed=r)
        out = reference(input_ids=ids_r, attention_mask=mask_r, labels=labels_r)
        (out.loss / WORLD_SIZE).backward()
        expected_losses.append(out.loss.detach())
    expected = {name: p.grad.clone() for name, p in reference.named_parameters()}
    torch.save({"loss": loss.detach(), "expected_loss": expected_losses[rank], "grads": grads,
                "expected": expected}, os.path.join(out_dir, f"rank{rank}-{int(head_unit)}.pt"))
    dist.barrier()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.skipif(sys.platform == "win32", reason="gloo over tcp://127.0.0.1 is not set up on Windows here")
def test_fsdp2_loss_and_grads_match_unsharded_hf(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    for rank, head_unit in ((r, h) for r in range(WORLD_SIZE) for h in (0, 1)):
        result = torch.load(tmp_path / f"rank{rank}-{head_unit}.pt", weights_only=True)
        torch.testing.assert_close(result["loss"], result["expected_loss"], rtol=1e-5, atol=1e-5)
        assert result["grads"].keys() == result["expected"].keys()
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, result["expected"][name], rtol=1e-4, atol=1e-5, msg=name)
