"""Data-parallel training under torchrun: process group, sharding and reductions.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them training runs as a
single process and every helper here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> Context:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU), or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        # One process: the GPU when there is one (RNNSERVE_TRAIN_DEVICE=cpu keeps it on the CPU).
        wanted = os.environ.get("RNNSERVE_TRAIN_DEVICE", "auto")
        use_cuda = wanted != "cpu" and torch.cuda.is_available()
        return Context(device=torch.device("cuda") if use_cuda else torch.device("cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        # Share the cores instead of every rank starting one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Context(rank=rank, world_size=world_size, device=device)


def teardown(context: Context) -> None:
    if context.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_object(context: Context, value):
    """Rank 0's value on every rank."""
    if not context.enabled:
        return value
    holder = [value if context.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def mean(context: Context, value: float) -> float:
    if not context.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor) / context.world_size


def gather_objects(context: Context, value) -> list:
    """Every rank's value, in rank order, on every rank."""
    if not context.enabled:
        return [value]
    gathered = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered
