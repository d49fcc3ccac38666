"""Collectives the model's own forward needs (routing statistics summed over the data-parallel
ranks), below every other layer so that models/ can use them; train/distributed.py, which sets the
process group up, re-exports them."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


class _GlobalSum(torch.autograd.Function):
    """all-reduce (sum) in the forward and in the backward, with functional collectives so
    torch.compile traces it without a graph break."""

    @staticmethod
    def forward(ctx, x):
        return funcol.all_reduce(x, "sum", dist.group.WORLD)

    @staticmethod
    def backward(ctx, grad):
        return funcol.all_reduce(grad.contiguous(), "sum", dist.group.WORLD)


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_sum(x: torch.Tensor) -> torch.Tensor:
    """x summed over the ranks (x itself in one process). Differentiable: the backward sums the
    ranks' gradients too, and DDP's (or FSDP's) mean over the ranks then gives exactly the gradient
    of a loss on the global batch."""
    if world_size() == 1:
        return x
    return _GlobalSum.apply(x)
