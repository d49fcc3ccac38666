"""A static KV cache for cached inference: per layer, preallocated K and V of (B, heads cached, max_len, head_dim).

The contract every attention module implements:
- `kv_layout() -> (n_heads_cached, head_dim)`: what one token leaves in one layer's cache (per K and per V); its
  `kv_cache_elems_per_token()` is 2 * n_heads_cached * head_dim.
- `forward_cached(x, cache_k, cache_v, positions) -> y`: x (B, T, d) new tokens at per-row positions (B, T); writes
  their K/V into the cache at those positions (`write_kv`), then attends from each new token to every cached
  position up to its own (`cached_sdpa`). No dropout: inference only.

Nothing here reallocates or resizes a tensor after `KVCache.allocate`, and the write and the mask use only fixed
shapes (the mask compares positions with an arange over max_len): a one-token decode step has no data-dependent shape
and no host sync, so it can be compiled or captured in a CUDA graph. Rows of a batch may hold different lengths.
Positions past max_len are not checked (that would be a host sync): the scatter then fails.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# SDPA backends for decoding: all but cuDNN's. cuDNN attention builds (and caches) an execution graph per input
# shape, and torch prefers it for bf16 on Hopper; decoding changes shape at almost every step (a growing prefix, a
# batch that shrinks as sentences finish), so each step paid a graph build: beam search over Multi30k's test set took
# 8.4 s in bf16 with it and 0.36 s without it on an H200 (300 sentences; docs/results/translation.md).
DECODING_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def without_cudnn_attention(fn):
    """`fn` runs with SDPA limited to DECODING_SDPA (a decoding loop: see the comment there)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with sdpa_kernel(DECODING_SDPA):
            return fn(*args, **kwargs)
    return wrapped


@dataclass
class KVCache:
    """Per layer K and V (B, n_heads_cached, max_len, head_dim) in one dtype; `lengths` (B,) int64: tokens held per
    row (slots at and past a row's length may hold garbage, never attended: each is overwritten before it is read)."""
    k: list
    v: list
    lengths: Tensor

    @classmethod
    def allocate(cls, layouts: list, batch_size: int, max_len: int, device, dtype: torch.dtype) -> "KVCache":
        """`layouts`: one (n_heads_cached, head_dim) per layer."""
        def zeros(heads: int, head_dim: int) -> Tensor:
            return torch.zeros(batch_size, heads, max_len, head_dim, device=device, dtype=dtype)
        return cls([zeros(*hd) for hd in layouts], [zeros(*hd) for hd in layouts],
                   torch.zeros(batch_size, dtype=torch.int64, device=device))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


def kv_bytes_per_token(model, dtype: torch.dtype) -> int:
    """Analytic cache bytes one token takes over all layers of `model` (a LanguageModel): 2 (K and V) x heads cached
    x head_dim x the dtype's bytes, summed over layers."""
    return sum(block.attn.kv_cache_elems_per_token() for block in model.blocks) * dtype.itemsize


def write_kv(cache: Tensor, new: Tensor, positions: Tensor) -> None:
    """cache (B, H, L, D)[b, :, positions[b, t]] = new (B, H, T, D)[b, :, t], in place.

    An index_put, not a scatter_: torch.compile (inductor) turns an index_put into a cache input into a store of the
    new entries alone, but a scatter_ into a copy of the whole cache and a copy back, two passes over every layer's
    cache at every decode step (a third of a GPT-2-size decode step at batch 64 on an H200: the traces in
    docs/results/inference.md; tests/test_kv_cache.py reads inductor's code for it)."""
    rows = torch.arange(cache.shape[0], device=cache.device)[:, None].expand_as(positions)
    cache[rows, :, positions] = new.transpose(1, 2).to(cache.dtype)  # indexed (B, T, H, D): advanced dims first


def cached_sdpa(q: Tensor, cache_k: Tensor, cache_v: Tensor, positions: Tensor) -> Tensor:
    """q (B, Hq, T, D) of tokens at positions (B, T) against the cache (B, Hkv, L, D), Hkv dividing Hq (query head h
    reads K/V head h // (Hq / Hkv)): each query sees the cached positions <= its own."""
    keep = torch.arange(cache_k.shape[2], device=q.device) <= positions[:, None, :, None]  # (B, 1, T, L)
    # enable_gqa=True whatever the head counts (it allows equal ones): a test of the shapes is a SymBool under
    # dynamic shapes (a recompiled decode step), which SDPA refuses; with a mask no flash kernel runs either way
    return F.scaled_dot_product_attention(q, cache_k.to(q.dtype), cache_v.to(q.dtype), attn_mask=keep,
                                          enable_gqa=True)
