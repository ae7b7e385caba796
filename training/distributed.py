"""Distributed data-parallel setup from ``torchrun``'s environment variables.

Under ``torchrun --nproc_per_node N`` every process reads ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``; the process group uses NCCL on GPUs and gloo on CPU. Without those variables
the run is a single process (rank 0 of 1) and nothing is initialised.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group described by torchrun's environment (if any).

    On CUDA each process takes GPU ``LOCAL_RANK``; on CPU all use ``device``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    if rank == 0:
        logger.info("distributed run: %d processes, backend %s", world_size, backend)
    else:  # rank-0 logging: the other processes report warnings and errors only
        logging.getLogger().setLevel(logging.WARNING)
    return DistributedContext(rank, local_rank, world_size, device)


def is_main_process() -> bool:
    """Whether this is rank 0 of a torchrun run (or a single-process run)."""
    return int(os.environ.get("RANK", "0")) == 0


def shutdown_distributed(context: DistributedContext) -> None:
    if context.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Element-wise sum of ``values`` over all processes (returned; ``values`` is left as is)."""
    if not context.is_distributed:
        return values
    total = values.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def barrier(context: DistributedContext) -> None:
    if context.is_distributed:
        dist.barrier()
