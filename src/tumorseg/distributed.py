"""Data-parallel training under `torchrun`: PyTorch's DistributedDataParallel, set up
from the environment torchrun gives each process (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT). Without torchrun (WORLD_SIZE unset or 1) every function here is a
no-op for a single process, so training has one code path.

- Backend: NCCL for CUDA, gloo on the CPU; each CUDA process takes GPU LOCAL_RANK.
- Batches: `--batch-size` is per process; the global batch is batch size x world size.
  Every rank draws the same global batches from the same seeded epoch order and trains
  on its own slice of each (`shard_of`), so the data of a step are those of a single
  process with the global batch.
- Losses: gradients are averaged across ranks (DDP); the batch-pooled Dice sums are
  added across ranks first (`sum_across_ranks`, with autograd), so the loss and its
  gradient are those of the global batch.
- Only rank 0 writes files and prints; `any_rank` turns a Ctrl-C or SIGTERM on any rank
  into a stop of every rank at the same step (after each step and after validation).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from tumorseg.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()  # one process, no torchrun


def world_from_env() -> World:
    """The World torchrun describes in the environment (a single process without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(rank=int(os.environ.get("RANK", "0")), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init(world: World, device: torch.device) -> torch.device:
    """Join the process group (NCCL for CUDA, gloo otherwise) when `world` has several
    processes; returns this process's device (cuda:LOCAL_RANK for CUDA).

    Raises:
        ConfigError: several processes on MPS, or a CUDA rank without its GPU.
    """
    if not world.distributed:
        return device
    if device.type == "mps":
        raise ConfigError("distributed training runs on CUDA (NCCL) or the CPU (gloo), not on MPS")
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {world.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                              "start at most one process per GPU (--nproc-per-node)")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank, world_size=world.size)
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard_of(batch: torch.Tensor, world: World) -> slice:
    """The slice of a global batch that this rank trains on (equal shards)."""
    n = batch.shape[0] // world.size
    return slice(world.rank * n, (world.rank + 1) * n)


class _SumAcrossRanks(torch.autograd.Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) of the gradients: with every rank
    computing the same loss from the summed values, DDP's averaging of the parameter
    gradients then gives exactly the gradient of the global batch."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        g = grad.clone()
        dist.all_reduce(g)
        return g


def sum_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over the ranks, differentiably; `x` itself in a single process."""
    return _SumAcrossRanks.apply(x) if active() else x


def gather(value: T) -> list[T]:
    """Every rank's `value` (picklable), in rank order; [value] in a single process."""
    if not active():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast(value: T) -> T:
    """Rank 0's `value` on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank (a stop request, a diverged
    loss): one small all_reduce, so that every rank takes the same branch."""
    if not active():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def barrier() -> None:
    if active():
        dist.barrier()


def split_patients(patients: Sequence[str], world: World) -> list[str]:
    """This rank's share of the validation patients (every world.size-th)."""
    return list(patients)[world.rank :: world.size]
