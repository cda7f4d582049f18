"""One evaluation over several processes (`torchrun --nproc_per_node N`): shards of work, results to rank 0.

Without a launcher (`WORLD_SIZE` unset or 1) everything here is a no-op for a single process of rank 0.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one evaluation."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: item i belongs to rank i % world_size."""
        return list(items[self.rank :: self.world_size])

    def gather(self, items: list[T]) -> list[T]:
        """Every rank's items, rank 0's first, on rank 0; an empty list on the other ranks."""
        if self.world_size == 1:
            return list(items)
        gathered: list[list[T]] | None = [[] for _ in range(self.world_size)] if self.is_main else None
        dist.gather_object(items, gathered, dst=0)
        return [item for part in gathered or [] for item in part]


SINGLE_PROCESS = Ranks()


@contextmanager
def process_group(device: str | None) -> Iterator[tuple[Ranks, str | None]]:
    """Join the launcher's process group (gloo on CPU, nccl on CUDA) for the block; yields (ranks, device).

    Under a launcher, a bare `cuda` device becomes this process's GPU, `cuda:LOCAL_RANK`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield Ranks(), device
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if on_cuda:
        device = device if torch.device(device).index is not None else f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_cuda else "gloo", rank=rank, world_size=world_size)
    try:
        yield Ranks(rank, world_size), device
    finally:
        dist.destroy_process_group()
