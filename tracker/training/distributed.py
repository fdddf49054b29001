"""Data-parallel helpers over torch.distributed, used when a launcher (Ray Train, torchrun) set it up.

The library never starts a process group itself; with none initialised every helper is a no-op
for a single process. Each worker runs the same Trainer over its own share of every epoch's
batches; gradients of the trainable parameters are averaged after each backward, so all workers
hold identical weights, and only rank 0 evaluates and writes checkpoints.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce and average each parameter's gradient across workers (absent gradients count as 0)."""
    rank, size = world()
    if size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(size)


def broadcast_flag(value: bool) -> bool:
    """Rank 0's value of a boolean decision (e.g. stop early), on every worker."""
    rank, size = world()
    if size == 1:
        return value
    t = torch.tensor([1 if value else 0], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return bool(t.item())


def broadcast_parameters(params: Iterable[torch.nn.Parameter]) -> None:
    """Copy rank 0's trainable weights to every worker (after a fresh initialisation)."""
    rank, size = world()
    if size == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def shard(batches: list, rank: int, size: int) -> list:
    """This worker's batches of an epoch: every size-th from `rank`, cut so all workers take as many steps."""
    per_worker = len(batches) // size if size > 1 else len(batches)
    return batches[rank::size][:per_worker]
