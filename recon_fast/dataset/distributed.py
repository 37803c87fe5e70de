"""torch.distributed as torchrun (or `accelerate launch`) sets it up: RANK, WORLD_SIZE and
LOCAL_RANK from the environment, gloo on CPU, nccl on CUDA. Without those variables (a plain
`python` or a notebook) everything here is a single rank and nothing is initialised."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank (pickled; small objects only)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def from_environment() -> Ranks:
    """This process's place as torchrun describes it (rank 0 of 1 when not launched by it)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return Ranks(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def device_for(ranks: Ranks) -> torch.device:
    """cuda:LOCAL_RANK where there is CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Ranks]:
    """The process group for a run launched by torchrun: initialised here unless the caller did
    it, and destroyed at the end only if it was initialised here."""
    ranks = from_environment()
    ours = ranks.distributed and not dist.is_initialized()
    if ours:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    try:
        yield ranks
    finally:
        if ours:
            dist.destroy_process_group()
