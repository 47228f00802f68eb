"""Distributed training with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Launch the same ``train`` command under ``torchrun --nproc_per_node N``: the process group is
created from torchrun's environment (NCCL on CUDA, gloo on CPU), every decoder layer (the model's
``_no_split_modules`` classes) becomes its own FSDP unit and the :class:`PolicyWithLoss` wrapper is
the root unit. The root owns the embeddings and the LM head, so the fused loss, called inside the
wrapper's ``forward``, reads the *unsharded* LM-head weight (calling the loss on ``lm_head.weight``
outside a sharded module's forward would see only this rank's shard).

``DFTState`` stays identical on all ranks because its ``write`` all-gathers every update.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .model import resolve_device

__all__ = ["DistContext", "init_distributed", "shard_model", "full_model_state_dict", "full_optimizer_state_dict",
           "load_optimizer_state", "gather_objects"]


@dataclass
class DistContext:
    """This process's place in the job (``world_size == 1`` without torchrun)."""

    rank: int
    world_size: int
    device: torch.device
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def reduce(self, values: dict[str, torch.Tensor | float]) -> dict[str, float]:
        """Combine scalar metrics over ranks: keys ending in ``_max`` by maximum, the rest by mean.

        Every rank must pass the same keys.
        """
        out = {}
        for op, keys in ((dist.ReduceOp.MAX, sorted(k for k in values if k.endswith("_max"))),
                         (dist.ReduceOp.SUM, sorted(k for k in values if not k.endswith("_max")))):
            if not keys:
                continue
            vector = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
            if self.distributed:
                backend_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
                vector = vector.to(backend_device)
                dist.all_reduce(vector, op=op)
                vector = vector.cpu()
                if op == dist.ReduceOp.SUM:
                    vector = vector / self.world_size
            out.update(zip(keys, vector.tolist()))
        return out

    def sum(self, value: float) -> float:
        if not self.distributed:
            return float(value)
        backend_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=backend_device)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` is true on every rank (a collective when distributed)."""
        if not self.distributed:
            return bool(flag)
        backend_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=backend_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return bool(tensor.item())

    def shutdown(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str = "auto") -> DistContext:
    """Join the torchrun job described by ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` (if any).

    The device is ``cuda:LOCAL_RANK`` under ``device="auto"`` with CUDA, otherwise as given.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        if resolved.index is None:
            resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(resolved)
    owns = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
        owns = True
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), resolved, owns)
    return DistContext(0, 1, resolved, False)


def shard_model(wrapper: nn.Module, causal_lm: nn.Module) -> None:
    """``fully_shard`` every decoder layer of ``causal_lm`` (its ``_no_split_modules``), then ``wrapper``."""
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(getattr(causal_lm, "_no_split_modules", None) or [])
    layers = [m for m in causal_lm.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"{type(causal_lm).__name__} declares no _no_split_modules; cannot find its decoder "
                         f"layers to shard")
    for layer in layers:
        fully_shard(layer)
    fully_shard(wrapper)


def _strip_prefix(state: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in state.items()}


def full_model_state_dict(wrapper: nn.Module, ctx: DistContext, prefix: str = "causal_lm.") -> dict | None:
    """The full (unsharded) CPU state dict of the wrapped model on rank 0, None elsewhere.

    Keys are the Hugging Face model's own (``prefix`` removed). Collective: all ranks must call it.
    """
    if not ctx.distributed:
        return _strip_prefix({k: v.detach().cpu() for k, v in wrapper.state_dict().items()}, prefix)
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    state = get_model_state_dict(wrapper, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _strip_prefix(state, prefix) if ctx.is_main else None


def full_optimizer_state_dict(wrapper: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict | None:
    """The optimizer state (full, on CPU) on rank 0, None elsewhere. Collective."""
    if not ctx.distributed:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    state = get_optimizer_state_dict(wrapper, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if ctx.is_main else None


def load_optimizer_state(wrapper: nn.Module, optimizer: torch.optim.Optimizer, state: dict, ctx: DistContext) -> None:
    """Load a state saved by :func:`full_optimizer_state_dict` (every rank passes the full state)."""
    if not ctx.distributed:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(wrapper, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def gather_objects(obj, ctx: DistContext) -> list:
    """``[obj from rank 0, obj from rank 1, ...]`` on every rank (picklable objects)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
