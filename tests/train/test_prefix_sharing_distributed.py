"""Prefix sharing under FSDP2 (2 processes, gloo, CPU) and with FlexAttention (CPU, no gradients).

FSDP2: every rank builds the same tiny model, prepares and probes it (``prepare_shared_prompt_model``:
the block-wise kernel or the dense SDPA mask) before sharding, shards it the way the
trainer does (``shard_model``: decoder layers, then the wrapper as root), and runs one step on its
own groups in the padded unshared layout and in the prompt-shared layouts, through a wrapper whose
forward is the proposed trainer integration (``shared_forward`` inside the sharded root's forward,
LM-head weight read there). Loss and every full (unsharded) parameter gradient must agree to
float32 rounding.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
from test_prefix_sharing import GRAD_RTOL, LOSS_RTOL, make_examples, max_rel_diff, tiny_model
from torch import nn

from dftkern import DFTState
from dftkern.train.data import collate
from dftkern.train.model import lm_head_params
from dftkern.train.objectives import Objective, ObjectiveConfig
from dftkern.train.prefix_sharing import PREFIX_SDPA, collate_shared, prepare_shared_prompt_model, shared_forward


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Policy(nn.Module):
    """Backbone + fused loss in one forward, as ``PolicyWithLoss`` would run it with ``shared_forward``."""

    def __init__(self, causal_lm, objective):
        super().__init__()
        self.causal_lm, self.objective = causal_lm, objective

    def forward(self, batch, state):
        hidden, loss_batch = shared_forward(self.causal_lm, batch)
        weight, bias = lm_head_params(self.causal_lm)
        return self.objective(hidden, weight, bias, loss_batch, state=state)


def _fsdp_worker(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from dftkern.train.distributed import shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    out = {}
    try:
        for family, loss_name, checkpointing, block in (("llama", "dft", False, False), ("qwen2", "rloo", True, True),
                                                        ("llama", "dpo", True, True)):
            model = tiny_model(family)
            kernel = prepare_shared_prompt_model(model, block_attention=block)  # the probe runs before sharding
            assert kernel == (PREFIX_SDPA if block else "sdpa")
            if checkpointing:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            objective = Objective(ObjectiveConfig(loss=loss_name))
            wrapper = _Policy(model, objective)
            shard_model(wrapper, model)
            examples = make_examples(seed=10 + rank)  # each rank its own groups
            kwargs = dict(pad_token_id=0, with_ref_logps=objective.spec.needs_ref_logps,
                          with_rewards=objective.spec.needs_rewards)
            runs = {}
            for layout in ("padded", "shared", "shared_packed"):
                batch = collate(examples, packed=False, **kwargs) if layout == "padded" else \
                    collate_shared(examples, pack_groups=layout == "shared_packed", **kwargs)
                wrapper.zero_grad(set_to_none=True)
                loss, _ = wrapper(batch, DFTState(len(examples)))
                loss.backward()
                grads = {name: p.grad.full_tensor().clone() for name, p in wrapper.named_parameters()}
                runs[layout] = (loss.detach(), grads)
            ref_loss, ref_grads = runs["padded"]
            for layout in ("shared", "shared_packed"):
                loss, grads = runs[layout]
                out[(family, loss_name, checkpointing, kernel, layout)] = (
                    float((loss - ref_loss).abs()) / max(1.0, float(ref_loss.abs())), max_rel_diff(grads, ref_grads),
                    len(grads))
        results.put((rank, out))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_processes_shared_equals_unshared():
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.SimpleQueue()
    torch.multiprocessing.start_processes(_fsdp_worker, args=(_free_port(), results), nprocs=2, start_method="spawn")
    by_rank = dict(results.get() for _ in range(2))
    assert sorted(by_rank) == [0, 1]
    for rank, out in by_rank.items():
        assert len(out) == 6
        for case, (loss_diff, grad_diff, num_params) in out.items():
            assert num_params > 10, case  # every parameter's gradient was compared
            assert loss_diff <= LOSS_RTOL and grad_diff <= GRAD_RTOL, (rank, case, loss_diff, grad_diff)


@pytest.mark.slow
def test_flex_attention_scoring_on_cpu_equals_unshared_sdpa():
    """FlexAttention's BlockMask path (forward only: torch has no CPU backward for it): the shared
    layout's sequence log-probs equal the unshared SDPA ones."""
    from dftkern import sequence_logprobs

    examples = make_examples()
    model = tiny_model("llama").eval()
    weight, _ = lm_head_params(model)
    with torch.no_grad():
        plain = collate(examples, pad_token_id=0, packed=False)
        hidden, batch = shared_forward(model, plain)
        reference = sequence_logprobs(hidden, weight, batch.labels)
        model.config._attn_implementation = "flex_attention"
        shared = collate_shared(examples, pad_token_id=0, pack_groups=True)
        hidden, batch = shared_forward(model, shared)
        got = sequence_logprobs(hidden, weight, batch.labels, cu_seqlens=batch.cu_seqlens)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    assert float(reference.abs().min()) > 1.0  # non-trivial log-probs
