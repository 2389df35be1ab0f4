"""Process-group setup under ``torchrun`` and the few collectives the trainer needs.

``torchrun --nproc_per_node=N`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without them the run is a
single process and every collective here is the identity.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # ``setup`` created the process group, so ``shutdown`` destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> this process's CUDA device if CUDA is available, else CPU; ``"cpu"``/``"cuda"`` as asked."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but CUDA is not available; use device='auto' or 'cpu'")
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return torch.device("cpu")


def setup(device: str = "auto") -> DistContext:
    """Join the ``torchrun`` process group if launched by it (gloo on CPU, NCCL on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    owns_group = world_size > 1 and not dist.is_initialized()
    if owns_group:
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved,
                       owns_group=owns_group)


def shutdown(context: DistContext, *, synchronize: bool) -> None:
    """Destroy the process group ``setup`` created (a no-op otherwise).

    ``synchronize`` (a run that ended normally on every rank) first waits at a barrier, so that no rank tears
    down its gloo connections while another is still inside a collective or writing (a peer vanishing under gloo's
    I/O threads can abort a rank at exit: "terminate called without an active exception").
    After a rank-local error there is no barrier (the other ranks may never reach it).
    """
    if not (context.owns_group and dist.is_initialized()):
        return
    if synchronize:
        dist.barrier()
    dist.destroy_process_group()


def all_reduce_mean(values: Tensor, context: DistContext) -> Tensor:
    """Mean of ``values`` over processes (identity for one process)."""
    if not context.is_distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / context.world_size


def all_reduce_sum(values: Tensor, context: DistContext) -> Tensor:
    if not context.is_distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_object(value: Any, context: DistContext) -> list[Any]:
    """``[value of rank 0, value of rank 1, ...]`` on every rank (``[value]`` for one process).

    Every rank must call it. ``value`` is pickled, so tensors inside it come back on the device they were on
    when sent: move CUDA tensors to the CPU first (``to_cpu``) so that every rank can hold every value. Under
    NCCL the pickled bytes travel through this process's current CUDA device, which ``setup`` selected.
    """
    if not context.is_distributed:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (through dicts, lists and tuples) on the CPU."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(item) for item in value)
    return value


def barrier(context: DistContext) -> None:
    if context.is_distributed:
        dist.barrier()
