"""Grouped matmul over rows sorted by group: rows offs[g-1]:offs[g] of `x` times `w[g]`, in one kernel.

The kernel is torch's grouped GEMM (bf16 on CUDA, compute capability >= 9.0: the MoE kernel torchtitan uses); it
computes nothing for an empty group and needs no host sync, so it works under torch.compile and CUDA graphs.
Elsewhere (CPU, fp32, older GPUs, a torch without it) `grouped_mm_reference` computes the same product group by
group; it reads the offsets on the host, so it is the slow reference, not a fast path.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _kernel():
    fn = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    return fn


def grouped_kernel_available(x: Tensor) -> bool:
    """True where `grouped_mm` runs the fused kernel for `x` (bf16 on a CUDA device of capability >= 9.0)."""
    return (_kernel() is not None and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def grouped_mm_reference(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """x (A, K) rows sorted by group, w (G, K, N), offs (G,) cumulative row counts -> (A, N)."""
    sizes = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    return torch.cat([part @ w[g] for g, part in enumerate(x.split(sizes))])


def grouped_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """x (A, K) @ w[group of the row] (G, K, N) -> (A, N); the kernel where available, else the reference."""
    if grouped_kernel_available(x):
        return _kernel()(x, w.to(x.dtype), offs=offs)
    return grouped_mm_reference(x, w.to(x.dtype), offs)
