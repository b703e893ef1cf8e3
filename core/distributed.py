"""Keeping controller state identical on every rank of a data-parallel run (DDP, Lightning DDP).

DDP averages the gradients of the model's parameters, and γ is one of them for
ACE. Everything else a controller computes from the rank's own batch (RECM's
probe gradients, CR's regulariser, the finite-step flag) goes through these
helpers: one collective per step, and none at all outside a process group, so
single-process training is untouched.
"""

from __future__ import annotations

import torch


def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_(tensors: list[torch.Tensor], average: bool = True) -> None:
    """Sum (or average) ``tensors`` over the ranks, in place, in one collective."""
    if world_size() == 1 or not tensors:
        return
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat)
    if average:
        flat /= world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t).to(t.dtype))
        offset += t.numel()


def all_ranks_true(flag: torch.Tensor) -> torch.Tensor:
    """``flag`` (a bool scalar) and-ed over the ranks: one rank's NaN step is skipped by all."""
    if world_size() == 1:
        return flag
    import torch.distributed as dist

    value = flag.to(torch.int32).reshape(1)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value[0].to(torch.bool)
