"""Inference caches: each attention module owns one while a model decodes.

The protocol, as gpt-fast's `Attention.kv_cache`: a model's `init_cache` gives every attention
module its layer cache (`attn.kv_cache`, None while training) and returns the `KVCache` that holds
them; the module's one `forward` then writes the new tokens' K/V into it and attends over it, with
the same code as without a cache. A layer cache carries what the step needs besides x, through the
`DecodeState` all layers of a model share (the one owner of lengths and spans): the row lengths
(B,), from which each new token's position follows (`positions`), and `span`, how many leading
positions a step reads. A variant subclass that overrides `forward` and calls its parent's (the
README's toy plugin) therefore decodes through the cache without knowing it.

Layer caches:
- `StaticKV`: preallocated K and V (B, heads cached, max_len, head_dim), for the variants that store
  a fixed number of K/V heads per token (a module's `kv_layout() -> (heads, head_dim)`);
- `CrossKV`: a decoder cross-attention's K and V of the source, computed at the first step and
  reused;
- a variant with a cache of its own (moas_kv's head pool) returns it from `make_cache`, a subclass
  of `LayerCache`.
Each keeps rows (`select`, beam search), counts its bytes (`nbytes`, `realised_bytes`) and notes
what it did differently from the full forward (`overflow`).

Nothing reallocates or resizes a tensor after allocation, and writes and masks use fixed shapes (the
mask compares positions with an arange over max_len): a one-token decode step has no
data-dependent shape and no host sync, so it compiles and captures in a CUDA graph. Rows of a batch
may hold different lengths. Positions past max_len are not checked (that would be a host sync): the
write then fails.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# SDPA backends for decoding: all but cuDNN's. cuDNN attention builds (and caches) an execution
# graph per input shape, and torch prefers it for bf16 on Hopper; decoding changes shape at almost
# every step (a growing prefix, a batch that shrinks as sentences finish), so each step paid a
# graph build (docs/results/translation.md measures it).
DECODING_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def without_cudnn_attention(fn):
    """`fn` runs with SDPA limited to DECODING_SDPA (a decoding loop: see the comment there)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with sdpa_kernel(DECODING_SDPA):
            return fn(*args, **kwargs)

    return wrapped


class CacheNotUsed(RuntimeError):
    """A module's forward ignored the cache it was given: its decoding would be wrong."""


@dataclass
class DecodeState:
    """What every layer cache of one model shares: `lengths` (B,) int64, the tokens each row holds
    (the next token of row b sits at position lengths[b]); `span`: a step reads the first `span`
    positions of the cache (None: all max_len), a promise of the caller, who counts the steps on
    the host, that every row's position lies below it (unchecked: a check would sync)."""

    lengths: Tensor
    max_len: int
    span: int | None = None

    def positions(self, t: int) -> Tensor:
        """(B, t) positions of t new tokens per row, right after each row's held tokens."""
        return self.lengths[:, None] + torch.arange(t, device=self.lengths.device)

    def select(self, rows: Tensor) -> None:
        self.lengths = self.lengths.index_select(0, rows)


class LayerCache:
    """What every layer cache provides; `used` turns true at its first write, so that a model can
    tell, after prefill, that each module really decodes through its cache."""

    state: DecodeState
    used: bool = False

    def select(self, rows: Tensor) -> None:
        """Keep (reorder, repeat) rows: beam search reordering hypotheses, finished ones leaving."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes allocated for K/V."""
        raise NotImplementedError

    def realised_bytes(self) -> Tensor | float:
        """K/V bytes the rows' real tokens hold in this layer (summed over rows)."""
        raise NotImplementedError

    @property
    def max_heads(self) -> int:
        """The most K/V heads a token stores here."""
        raise NotImplementedError

    def overflow(self) -> Tensor | int:
        """Real tokens stored differently from what the full forward computes (a pool's fallback);
        0 for an exact cache."""
        return 0

    def mark_used(self) -> None:
        if not self.used:  # a constant after prefill: a compiled step stores nothing here
            self.used = True


class StaticKV(LayerCache):
    """K and V (B, heads, max_len, head_dim) of a fixed number of heads per token."""

    def __init__(self, k: Tensor, v: Tensor, state: DecodeState):
        self.k, self.v, self.state = k, v, state

    @classmethod
    def allocate(cls, layout: tuple, state: DecodeState, device, dtype) -> StaticKV:
        heads, head_dim = layout
        shape = (state.lengths.shape[0], heads, state.max_len, head_dim)
        k = torch.zeros(shape, device=device, dtype=dtype)
        return cls(k, torch.zeros_like(k), state)

    def write(self, k: Tensor, v: Tensor) -> Tensor:
        """Write the new tokens' k, v (B, heads, T, D) at their positions; returns the positions
        (B, T)."""
        positions = self.state.positions(k.shape[2])
        write_kv(self.k, k, positions)
        write_kv(self.v, v, positions)
        self.mark_used()
        return positions

    def update(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """`write` k, v, then attend from q (B, Hq, T, D) over the cache (Hq a multiple of heads):
        each query sees the cached positions up to its own."""
        positions = self.write(k, v)
        return cached_sdpa(q, self.k, self.v, positions, self.state.span)

    @property
    def max_heads(self) -> int:
        return self.k.shape[1]

    def select(self, rows: Tensor) -> None:
        self.k, self.v = self.k.index_select(0, rows), self.v.index_select(0, rows)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def realised_bytes(self) -> Tensor:
        per_token = 2 * self.k.shape[1] * self.k.shape[3] * self.k.element_size()
        return self.state.lengths.sum() * per_token


class CrossKV(LayerCache):
    """A cross-attention's K and V of the source, computed by `fill` at the first step and reused;
    the source (its memory and key-padding mask) lives in the model's KVCache."""

    def __init__(self, state: DecodeState):
        self.state, self.kv = state, None

    def fill(self, compute) -> tuple:
        """The stored (K, V), `compute()` on the first call."""
        if self.kv is None:
            self.kv = compute()
        self.mark_used()
        return self.kv

    def select(self, rows: Tensor) -> None:
        if self.kv is not None:
            self.kv = tuple(t.index_select(0, rows) for t in self.kv)

    def nbytes(self) -> int:
        return 0 if self.kv is None else sum(t.numel() * t.element_size() for t in self.kv)

    def realised_bytes(self) -> int:
        return self.nbytes()


def layer_cache(attn, state: DecodeState, device, dtype, cross: bool = False) -> LayerCache | None:
    """The cache of one attention module: its own (`make_cache`), a StaticKV of its `kv_layout()`,
    a CrossKV for a cross-attention, or None for a module that declares it cannot use one (neither
    method)."""
    if cross:
        return CrossKV(state)
    if hasattr(attn, "make_cache"):
        return attn.make_cache(state, device, dtype)
    if hasattr(attn, "kv_layout"):
        return StaticKV.allocate(attn.kv_layout(), state, device, dtype)
    return None


def can_cache(attn) -> bool:
    """Whether a module decodes through a cache (it has a cache factory or a K/V layout)."""
    return hasattr(attn, "make_cache") or hasattr(attn, "kv_layout")


class KVCache:
    """The caches of one model for a batch: `layers` (attention module, its layer cache), the shared
    DecodeState, and for an encoder-decoder the source (`memory`, `src_mask`). Attached to the
    modules from `attach()` to `detach()` (a model's init_cache attaches)."""

    def __init__(self, layers: list, state: DecodeState, memory=None, src_mask=None):
        self.layers, self.state = layers, state
        self.memory, self.src_mask = memory, src_mask

    @classmethod
    def allocate(cls, modules: list, batch_size: int, max_len: int, device, dtype, **source):
        """`modules`: (attention module, cross?) pairs; None where a module cannot cache."""
        state = DecodeState(torch.zeros(batch_size, dtype=torch.int64, device=device), max_len)
        layers = [(m, layer_cache(m, state, device, dtype, cross)) for m, cross in modules]
        return cls(layers, state, **source)

    @property
    def complete(self) -> bool:
        """Every module has a cache."""
        return all(c is not None for _, c in self.layers)

    def attach(self) -> None:
        for module, cache in self.layers:
            module.kv_cache = cache

    def detach(self) -> None:
        for module, cache in self.layers:
            if getattr(module, "kv_cache", None) is cache:
                module.kv_cache = None

    def check_used(self) -> None:
        """CacheNotUsed (naming the modules) unless every layer cache was written: call after
        prefill, where a module whose forward ignores its cache would otherwise decode wrongly."""
        unused = sorted({type(m).__name__ for m, c in self.layers if c is not None and not c.used})
        if unused:
            raise CacheNotUsed(
                f"{', '.join(unused)}: forward ignored its KV cache (it does not call its parent's "
                "forward nor the cache); decoding by full forwards instead"
            )

    @property
    def lengths(self) -> Tensor:
        return self.state.lengths

    @property
    def max_len(self) -> int:
        return self.state.max_len

    @property
    def batch_size(self) -> int:
        return self.state.lengths.shape[0]

    @property
    def span(self) -> int | None:
        return self.state.span

    @span.setter
    def span(self, value: int | None) -> None:
        if value is not None and not 1 <= value <= self.max_len:
            raise ValueError(f"span={value} must lie in 1..{self.max_len} (the cache's max_len)")
        self.state.span = value

    def select(self, rows: Tensor) -> None:
        """Keep (reorder, repeat) rows of every layer, of the lengths and of the source."""
        for _, cache in self.layers:
            cache.select(rows)
        self.state.select(rows)
        if self.memory is not None:
            self.memory = self.memory.index_select(0, rows)
            self.src_mask = self.src_mask.index_select(0, rows)

    def self_layers(self) -> list:
        return [c for _, c in self.layers if not isinstance(c, CrossKV)]

    @property
    def k(self) -> list:
        """The self-attention layers' K tensors (a head pool: its slots), for inspection."""
        return [c.k for c in self.self_layers()]

    @property
    def v(self) -> list:
        return [c.v for c in self.self_layers()]

    def nbytes(self) -> int:
        """Bytes allocated for the self-attention K/V (the source's cross K/V left out)."""
        return sum(c.nbytes() for c in self.self_layers())

    def realised_bytes_per_token(self) -> float:
        """Self-attention K/V bytes the rows' real tokens hold, over all layers, per token (a
        static layer: its allocation per token; a pool: its used slots)."""
        tokens = self.state.lengths.sum().clamp_min(1)
        return float(sum(c.realised_bytes() / tokens for c in self.self_layers()))

    def overflow(self) -> int:
        """Real tokens (summed over layers) that a layer cache stored differently from the full
        forward (a head pool's fallback); 0 for exact caches. A host sync."""
        return int(sum(c.overflow() for c in self.self_layers()))


class CacheHolder:
    """A model's side of the protocol (LanguageModel, Seq2Seq): `cache`, the KVCache its attentions
    decode through, or None."""

    cache: KVCache | None = None

    def attach_cache(self, cache: KVCache) -> None:
        """Make `cache` the one the attentions decode through (replacing an attached one)."""
        if self.cache is not None and self.cache is not cache:
            self.cache.detach()
        cache.attach()
        self.cache = cache

    def release_cache(self) -> None:
        """Take the caches away from the attentions (full forwards again)."""
        if self.cache is not None:
            self.cache.detach()
        self.cache = None

    @contextlib.contextmanager
    def cache_set_aside(self):
        """A full forward while a cache is attached: the attentions see none, and get it back."""
        cache = self.cache
        if cache is None:
            yield
            return
        cache.detach()
        try:
            yield
        finally:
            cache.attach()


def has_kv_cache(model) -> bool:
    """Whether `model` (a LanguageModel or a Seq2Seq) decodes through a KV cache: every attention
    module can cache (`can_cache`); otherwise its callers recompute full forwards."""
    return getattr(model, "cached_decoding_ok", lambda: False)()


def kv_bytes_per_token(model, dtype: torch.dtype, routings: list | None = None) -> float:
    """Analytic cache bytes one token takes over all layers of `model` (a LanguageModel): the
    modules' `kv_cache_elems_per_token()` x the dtype's bytes. A module storing a varying number of
    heads (moas_kv) counts its budget, or with `routings` (the records of an eval forward, one per
    layer) what its hard routing stored (`realised_heads`)."""

    def elems(attn, routing) -> float:
        if routing is None or not hasattr(attn, "realised_heads"):
            return attn.kv_cache_elems_per_token()
        return attn.kv_cache_elems_per_token(float(attn.realised_heads(routing)))

    records = routings or [None] * len(model.blocks)
    return (
        sum(elems(block.attn, r) for block, r in zip(model.blocks, records, strict=True))
        * dtype.itemsize
    )


def write_kv(cache: Tensor, new: Tensor, positions: Tensor) -> None:
    """cache (B, H, L, D)[b, :, positions[b, t]] = new (B, H, T, D)[b, :, t], in place.

    An index_put, not a scatter_: torch.compile (inductor) turns an index_put into a cache input
    into a store of the new entries alone, but a scatter_ into a copy of the whole cache and a copy
    back (tests/test_kv_cache.py reads inductor's code for it). Always into the whole cache, never
    into a view of its first positions: inductor compiled a write through such a view into copies of
    the view out and back (docs/results/runs/inference/span_views_2026-12-02.json)."""
    rows = torch.arange(cache.shape[0], device=cache.device)[:, None].expand_as(positions)
    # indexed (B, T, H, D): advanced dims first
    cache[rows, :, positions] = new.transpose(1, 2).to(cache.dtype)


def cached_sdpa(
    q: Tensor, cache_k: Tensor, cache_v: Tensor, positions: Tensor, span: int | None = None
) -> Tensor:
    """q (B, Hq, T, D) of tokens at positions (B, T) against the cache (B, Hkv, L, D), Hkv dividing
    Hq (query head h reads K/V head h // (Hq / Hkv)): each query sees the cached positions <= its
    own. span: only the first `span` positions are read (every position < span)."""
    # a view for READING only: writes go to the whole cache (write_kv says why)
    if span is not None:
        cache_k, cache_v = cache_k[:, :, :span], cache_v[:, :, :span]
    # (B, 1, T, L)
    keep = torch.arange(cache_k.shape[2], device=q.device) <= positions[:, None, :, None]
    # enable_gqa=True whatever the head counts (it allows equal ones): a test of the shapes is a
    # SymBool under dynamic shapes (a recompiled decode step), which SDPA refuses; with a mask no
    # flash kernel runs either way
    return F.scaled_dot_product_attention(
        q, cache_k.to(q.dtype), cache_v.to(q.dtype), attn_mask=keep, enable_gqa=True
    )
