"""Rotary position embeddings (model.positions=rope), for every attention variant that takes them.

Rotate-half layout (GPT-NeoX, Llama, SwitchHeadRope): the first `n_rot` channels of each query and
key head are split in two halves (x1, x2) and rotated as x * cos + cat(-x2, x1) * sin, the pair (i,
i + n_rot/2) at angle position * base^(-2i / n_rot); the other head_dim - n_rot channels pass
unrotated. n_rot = model.rope_fraction x head_dim, rounded down to an even count (SwitchHead rotates
half of each head: rope_fraction 0.5).

Positions come from where the attention runs, not from an argument: a full forward numbers its
tokens 0..T-1; while the model decodes, the module's layer cache shares the model's DecodeState (the
one owner of row lengths, models/kv_cache.py), which gives each new token's position. Keys are
rotated before they are cached, so a cached key never needs its position again. No parameters and no
buffers: cos/sin are computed in fp32 from the positions at each call (a buffer would be cast to
bf16 with the model).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


class Rotary(nn.Module):
    """Rotates the first `n_rot` channels of (B, H, T, D) heads by their tokens' positions."""

    def __init__(self, head_dim: int, fraction: float = 1.0, base: float = 10000.0):
        super().__init__()
        self.n_rot = int(fraction * head_dim) // 2 * 2
        self.base = float(base)

    @classmethod
    def of(cls, m, head_dim: int) -> Rotary | None:
        """The rotary of model config `m` for heads of `head_dim`, or None (positions not rope)."""
        if m.positions != "rope":
            return None
        return cls(head_dim, m.rope_fraction, m.rope_base)

    def cos_sin(self, positions: Tensor) -> tuple:
        """(cos, sin) of shape (1 or B, 1, T, n_rot) in fp32 for positions (T,) or (B, T)."""
        half = self.n_rot // 2
        inv_freq = self.base ** (
            -torch.arange(half, device=positions.device, dtype=torch.float32) / half
        )
        angles = positions.to(torch.float32)[..., None] * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        if angles.dim() == 2:
            angles = angles[None]
        return angles.cos()[:, None], angles.sin()[:, None]

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x (B, H, T, D) rotated at positions (T,) or (B, T)."""
        return rotate(x, *self.cos_sin(positions), self.n_rot)


def rotate(x: Tensor, cos: Tensor, sin: Tensor, n_rot: int) -> Tensor:
    """Rotate-half of x's first n_rot channels by (cos, sin) broadcast over x (computed in fp32)."""
    rot, rest = x[..., :n_rot].float(), x[..., n_rot:]
    x1, x2 = rot.chunk(2, dim=-1)
    out = (rot * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def token_positions(module: nn.Module, t: int, device) -> Tensor:
    """Positions of the t tokens a self-attention `module` sees now: (B, t) from its cache's
    DecodeState while the model decodes, else 0..t-1 (t,)."""
    cache = getattr(module, "kv_cache", None)
    if cache is not None:
        return cache.state.positions(t)
    return torch.arange(t, device=device)


def rotate_qk(module: nn.Module, q: Tensor, k: Tensor) -> tuple:
    """(q, k) rotated by `module.rope` at the positions of its tokens (`token_positions`);
    unchanged where the module has no rotary. Self-attention only (q and k of the same tokens)."""
    rope = getattr(module, "rope", None)
    if rope is None:
        return q, k
    cos, sin = rope.cos_sin(token_positions(module, q.shape[2], q.device))
    return rotate(q, cos, sin, rope.n_rot), rotate(k, cos, sin, rope.n_rot)
