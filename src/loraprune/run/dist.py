"""Data parallelism on the stock torch.distributed stack (torchrun sets the environment).

Every rank builds the same global batch from the same seeded stream and keeps its slice of rows;
after backward the gradients (LoRA, plus whatever a criterion asked for) are averaged across ranks,
so every rank sees the one-process gradient and computes the same importance. Scores are averaged
as well (criteria that use activations see different rows per rank), so masks are computed
identically everywhere; `mask_checksum` lets a debug run verify that. Only rank 0 writes files.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from ..errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (contiguous blocks, so row order is kept)."""
        if not self.enabled:
            return batch
        n = batch.shape[0] // self.world
        return batch[self.rank * n:(self.rank + 1) * n]

    def average(self, tensors: list[torch.Tensor]) -> None:
        """In-place mean across ranks, flattened into one buffer (one collective per call)."""
        if not self.enabled or not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        flat /= self.world
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t).to(t.dtype))
            offset += n

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def all_equal(self, value: str) -> bool:
        if not self.enabled:
            return True
        vals = [None] * self.world
        tdist.all_gather_object(vals, value)
        return all(v == vals[0] for v in vals)


def init_from_env() -> Dist:
    """Single process unless torchrun's WORLD_SIZE > 1; nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(rank, world, local, device)


def check_batch(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise UserError(f"--batch-size {batch_size} (the global micro-batch) must be divisible by the "
                        f"{world} processes")


def checksum(tensors) -> str:
    """A short hash of bool/number tensors (masks), to compare across ranks."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def shutdown() -> None:
    """End the process group torchrun's run created (the CLI calls it when a command ends)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
