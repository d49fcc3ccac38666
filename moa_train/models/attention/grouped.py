"""Grouped matmul over rows sorted by group: rows offs[g-1]:offs[g] of `x` times `w[g]`, in one
kernel.

The kernel is torch's grouped GEMM (bf16 on CUDA, compute capability >= 9.0: the MoE kernel
torchtitan uses); it computes nothing for an empty group and needs no host sync, so it works under
torch.compile and CUDA graphs. Elsewhere (CPU, fp32, older GPUs, a torch without it)
`grouped_mm_reference` computes the same product group by group; it reads the offsets on the host,
so it is the slow reference, not a fast path.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _kernel():
    fn = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    return fn


def grouped_kernel_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True where `grouped_mm` runs the fused kernel (bf16 on a CUDA device of capability >=
    9.0)."""
    return (
        _kernel() is not None
        and device.type == "cuda"
        and dtype == torch.bfloat16
        and torch.cuda.get_device_capability(device) >= (9, 0)
    )


def grouped_mm_reference(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """x (A, K) rows sorted by group, w (G, K, N), offs (G,) cumulative row counts -> (A, N)."""
    sizes = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    return torch.cat([part @ w[g] for g, part in enumerate(x.split(sizes))])


def grouped_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """x (A, K) @ w[group of the row] (G, K, N) -> (A, N); the kernel where available, else the
    reference."""
    if grouped_kernel_available(x.device, x.dtype):
        return _kernel()(x, w.to(x.dtype), offs=offs)
    return grouped_mm_reference(x, w.to(x.dtype), offs)


class _GatherRows(torch.autograd.Function):
    """out[i] = x[src[i]] where every row of x is taken `copies` times (a permutation when copies =
    1); the backward is a gather too: grad_x[n] = sum_j grad_out[dst[n * copies + j]], with dst the
    inverse map. Autograd's own backward of x[src] would scatter-add into zeros (atomics, an extra
    pass): measured slower for MoA's sorts."""

    @staticmethod
    def forward(ctx, x: Tensor, src: Tensor, dst: Tensor, copies: int) -> Tensor:
        ctx.save_for_backward(dst)
        ctx.copies = copies
        return x.index_select(0, src)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (dst,) = ctx.saved_tensors
        g = grad.index_select(0, dst)
        if ctx.copies > 1:
            g = g.view(-1, ctx.copies, g.shape[-1]).sum(1)
        return g, None, None, None


def gather_rows(x: Tensor, src: Tensor, dst: Tensor, copies: int = 1) -> Tensor:
    """x (R, C) -> (len(src), C) rows x[src]; `dst` maps each (row, copy) slot back to its output
    row."""
    return _GatherRows.apply(x, src, dst, copies)
