"""Data-parallel runs over several processes (GPUs, or CPU slots), launched by ``torchrun``.

``torchrun --nproc_per_node N -m cryo_drvae classify ...`` (and ``srun torchrun ...`` across
nodes) sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; :func:`init_comm` then joins the process
group (NCCL on GPUs, gloo on CPUs). Each rank owns a contiguous shard of the particles:
per-class sums are all-reduced, per-particle results all-gathered, so every rank holds the same
classes and labels; rank 0 alone writes outputs. Without those variables :class:`Comm` is a
single process and every collective is the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from numpy.typing import NDArray


@dataclass(frozen=True)
class Comm:
    """Rank and world of this process, with the collectives the classifier needs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")      # where collectives run (CUDA for NCCL)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int, rank: int | None = None) -> slice:
        """The contiguous block of ``n`` particles that ``rank`` (default: this one) owns."""
        bounds = np.linspace(0, n, self.world_size + 1).round().astype(int)
        r = self.rank if rank is None else rank
        return slice(int(bounds[r]), int(bounds[r + 1]))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (returns a tensor on the input's device)."""
        if not self.active:
            return tensor
        moved = tensor.to(self.device).contiguous()
        dist.all_reduce(moved)
        return moved.to(tensor.device)

    def gather(self, array: NDArray, n_total: int) -> NDArray:
        """Concatenate every rank's shard rows (``(shard, ...)`` each) into ``(n_total, ...)``."""
        if not self.active:
            return array
        local = torch.from_numpy(np.ascontiguousarray(array))
        longest = max(self.shard(n_total, r).stop - self.shard(n_total, r).start
                      for r in range(self.world_size))
        padded = local.new_zeros((longest, *local.shape[1:]))
        padded[:len(local)] = local
        parts = [torch.empty_like(padded, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.to(self.device))
        rows = [parts[r][:self.shard(n_total, r).stop - self.shard(n_total, r).start].cpu()
                for r in range(self.world_size)]
        return torch.cat(rows).numpy()

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's value of ``tensor`` on every rank."""
        if not self.active:
            return tensor
        moved = tensor.to(self.device).contiguous()
        dist.broadcast(moved, src=0)
        return moved.to(tensor.device)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def is_main_process() -> bool:
    """True unless this is a non-zero rank started by torchrun (rank 0 alone writes files)."""
    return int(os.environ.get("RANK", "0")) == 0


def launched_world_size() -> int:
    """Number of processes the launcher (torchrun) started; 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_comm(use_cuda: bool) -> Comm:
    """Join the process group that ``torchrun`` set up (NCCL with CUDA, gloo otherwise)."""
    world = launched_world_size()
    if world <= 1:
        return Comm()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if use_cuda else torch.device("cpu")
    return Comm(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown(comm: Comm) -> None:
    if comm.active and dist.is_initialized():
        comm.barrier()
        dist.destroy_process_group()
