"""A static KV cache for cached inference: per layer, preallocated K and V of (B, heads cached,
max_len, head_dim).

The contract every attention module implements:
- `kv_layout() -> (n_heads_cached, head_dim)`: what one token leaves in one layer's cache (per K and
  per V); its `kv_cache_elems_per_token()` is 2 * n_heads_cached * head_dim.
- `forward_cached(x, cache_k, cache_v, positions, span=None) -> y`: x (B, T, d) new tokens at
  per-row positions (B, T); writes their K/V into the cache at those positions (`write_kv`), then
  attends from each new token to every cached position up to its own (`cached_sdpa`), reading only
  the first `span` positions when span is given (every position lies below it). No dropout:
  inference only. A variant whose forward_cached has no `span` parameter (a plugin written before
  it) is called without it and reads the whole cache.

Nothing here reallocates or resizes a tensor after `KVCache.allocate`, and the write and the mask
use only fixed shapes (the mask compares positions with an arange over max_len): a one-token decode
step has no data-dependent shape and no host sync, so it can be compiled or captured in a CUDA
graph. Rows of a batch may hold different lengths. Positions past max_len are not checked (that
would be a host sync): the scatter then fails.

A variant whose tokens store different numbers of K/V heads (moas_kv) returns a `PoolLayout` from
`kv_layout()` instead of a tuple: its layer of the cache is then a `HeadPool` (per row a pool of
head slots with per-token offsets), passed to its `forward_cached` as `cache_k`, with `cache_v`
None. Every other variant is unchanged.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# SDPA backends for decoding: all but cuDNN's. cuDNN attention builds (and caches) an execution
# graph per input shape, and torch prefers it for bf16 on Hopper; decoding changes shape at almost
# every step (a growing prefix, a batch that shrinks as sentences finish), so each step paid a graph
# build: beam search over Multi30k's test set in bf16 on an H200 was 5-13x slower with it (mha: 22.1
# s with it, 1.7 s without; docs/results/translation.md).
DECODING_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def without_cudnn_attention(fn):
    """`fn` runs with SDPA limited to DECODING_SDPA (a decoding loop: see the comment there)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with sdpa_kernel(DECODING_SDPA):
            return fn(*args, **kwargs)

    return wrapped


def has_kv_cache(model) -> bool:
    """Whether `model` (a LanguageModel or a Seq2Seq) decodes through a KV cache (its
    `cached_decoding_ok`: every attention implements the contract); otherwise its callers recompute
    full forwards (the same tokens, slower)."""
    return getattr(model, "cached_decoding_ok", lambda: False)()


@dataclass
class KVCache:
    """Per layer K and V (B, n_heads_cached, max_len, head_dim) in one dtype (a pooled layer: its
    HeadPool in `k`, None in `v`); `lengths` (B,) int64: tokens held per row (slots at and past a
    row's length may hold garbage, never attended: each is overwritten before it is read)."""

    k: list
    v: list
    lengths: Tensor

    @classmethod
    def allocate(
        cls, layouts: list, batch_size: int, max_len: int, device, dtype: torch.dtype
    ) -> KVCache:
        """`layouts`: one (n_heads_cached, head_dim) or PoolLayout per layer."""
        k, v = [], []
        for layout in layouts:
            if isinstance(layout, PoolLayout):
                k.append(layout.allocate(batch_size, max_len, device, dtype))
                v.append(None)
            else:
                heads, head_dim = layout
                k.append(
                    torch.zeros(batch_size, heads, max_len, head_dim, device=device, dtype=dtype)
                )
                v.append(torch.zeros_like(k[-1]))
        return cls(k, v, torch.zeros(batch_size, dtype=torch.int64, device=device))

    @property
    def max_len(self) -> int:
        first = self.k[0]
        return first.max_len if isinstance(first, HeadPool) else first.shape[2]

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def nbytes(self) -> int:
        """Bytes allocated for K and V (a pool: its head slots, the bookkeeping tables left out)."""
        return sum(
            t.nbytes() if isinstance(t, HeadPool) else t.numel() * t.element_size()
            for t in (*self.k, *self.v)
            if t is not None
        )

    def realised_bytes_per_token(self) -> float:
        """K/V bytes the rows' real tokens (`lengths`) really hold, over all layers, per token: a
        pooled layer's used slots (`HeadPool.used_slots`), a static layer's heads x head_dim."""
        tokens = self.lengths.sum().clamp_min(1)
        total = 0.0
        for k in self.k:
            if isinstance(k, HeadPool):
                total += float(k.used_slots(self.lengths).sum() / tokens) * k.head_bytes()
            else:
                total += 2 * k.shape[1] * k.shape[3] * k.element_size()
        return total

    def select(self, rows: Tensor) -> None:
        """Keep (reorder, repeat) the rows `rows` of every layer and of `lengths`: beam search
        reordering its hypotheses, finished ones leaving the batch."""
        self.k = [t.index_select(0, rows) for t in self.k]
        # None: a pooled layer's
        self.v = [None if t is None else t.index_select(0, rows) for t in self.v]
        self.lengths = self.lengths.index_select(0, rows)

    def fallbacks(self) -> int:
        """Real tokens the pooled layers' overflow policy stored as their fallback scheme (summed
        over layers); 0 without pooled layers."""
        return sum(int(k.fallbacks(self.lengths).sum()) for k in self.k if isinstance(k, HeadPool))


def kv_bytes_per_token(model, dtype: torch.dtype, routings: list | None = None) -> float:
    """Analytic cache bytes one token takes over all layers of `model` (a LanguageModel): 2 (K and
    V) x heads cached x head_dim x the dtype's bytes, summed over layers. A variant storing a
    varying number of heads (moas_kv) counts its budget, or with `routings` (the records of an eval
    forward, one per layer) the mean its hard routing stored."""

    def elems(attn, routing) -> float:
        if routings is None or not hasattr(attn, "realised_heads"):
            return attn.kv_cache_elems_per_token()
        return attn.kv_cache_elems_per_token(float(attn.realised_heads(routing)))

    return (
        sum(
            elems(block.attn, r)
            for block, r in zip(model.blocks, routings or [None] * len(model.blocks), strict=True)
        )
        * dtype.itemsize
    )


def write_kv(cache: Tensor, new: Tensor, positions: Tensor) -> None:
    """cache (B, H, L, D)[b, :, positions[b, t]] = new (B, H, T, D)[b, :, t], in place.

    An index_put, not a scatter_: torch.compile (inductor) turns an index_put into a cache input
    into a store of the new entries alone, but a scatter_ into a copy of the whole cache and a copy
    back, two passes over every layer's cache at every decode step (1.7 ms of mha's 2.75 ms
    GPT-2-size decode step at batch 64 on an H200: the traces in docs/results/inference.md;
    tests/test_kv_cache.py reads inductor's code for it). Always into the whole cache, never into a
    view of its first positions: inductor compiled a write through such a view into copies of the
    view out and back (48 copy kernels, 1.6 ms of a 2.0 ms GPT-2-size mha step at batch 64 on an
    H200, 31,563 tokens/s against 71,204:
    docs/results/runs/inference/span_views_2026-12-02.json)."""
    rows = torch.arange(cache.shape[0], device=cache.device)[:, None].expand_as(positions)
    # indexed (B, T, H, D): advanced dims first
    cache[rows, :, positions] = new.transpose(1, 2).to(cache.dtype)


def cached_sdpa(
    q: Tensor, cache_k: Tensor, cache_v: Tensor, positions: Tensor, span: int | None = None
) -> Tensor:
    """q (B, Hq, T, D) of tokens at positions (B, T) against the cache (B, Hkv, L, D), Hkv dividing
    Hq (query head h reads K/V head h // (Hq / Hkv)): each query sees the cached positions <= its
    own. span: only the first `span` positions are read (every position < span; see
    LanguageModel.decode_step)."""
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


# --- head pools: tokens storing different numbers of K/V heads ------------------------------------


@dataclass(frozen=True)
class PoolLayout:
    """What a pooled layer's token stores: under scheme c, `heads[c]` K/V heads (its candidate heads
    `first[c]`..`first[c] + heads[c] - 1` of the layer's candidates); query head h then reads the
    token's stored head `read_index[c][h]`. The pool holds ceil(slots_per_token x max_len) slots per
    row, at least max_len (one per position: the fallback scheme, which stores one head, always
    fits)."""

    head_dim: int
    # (C,) K/V heads a token stores under each scheme; the last is the fallback and stores 1
    heads: tuple
    # (C,) each scheme's first head among the candidates the module hands to `HeadPool.store`
    first: tuple
    read_index: tuple  # (C, n_query_heads): the stored head query head h reads
    slots_per_token: float

    def slots(self, max_len: int) -> int:
        return max(
            max_len, min(max(self.heads) * max_len, math.ceil(self.slots_per_token * max_len))
        )

    def allocate(self, batch_size: int, max_len: int, device, dtype: torch.dtype) -> HeadPool:
        def table(value: int) -> Tensor:
            return torch.full((batch_size, max_len), value, dtype=torch.int64, device=device)

        # the last slot takes the writes of the heads a scheme does not store
        slots = self.slots(max_len) + 1
        kv = [
            torch.zeros(batch_size, slots, self.head_dim, device=device, dtype=dtype)
            for _ in range(2)
        ]
        return HeadPool(
            *kv,
            table(0),
            table(0),
            torch.zeros(batch_size, max_len, dtype=torch.bool, device=device),
            torch.tensor(self.heads, device=device),
            torch.tensor(self.first, device=device),
            torch.tensor(self.read_index, device=device),
            max(self.heads),
        )


@dataclass
class HeadPool:
    """One layer's pooled K/V: per row `k`, `v` (slots + 1, head_dim), and per position the scheme
    its token stored, the offset of its first slot and whether the overflow policy changed its
    scheme.

    Overflow policy (fall back, never grow: fixed shapes, so decode steps compile): a token at
    position p keeps its chosen scheme only if, after its heads, at least one slot per later
    position of the row (up to max_len) is left; otherwise it stores the fallback scheme (one head),
    which always fits. `fallbacks` counts such tokens; moa-generate reports them once per
    generation. A pool of max(heads) x max_len slots never falls back."""

    k: Tensor
    v: Tensor
    scheme: Tensor  # (B, max_len) int64
    offset: Tensor  # (B, max_len) int64: the token's first slot
    fell_back: Tensor  # (B, max_len) bool
    heads: Tensor  # (C,)
    first: Tensor  # (C,)
    read_index: Tensor  # (C, H)
    width: int  # the most heads a token stores

    @property
    def max_len(self) -> int:
        return self.scheme.shape[1]

    def index_select(self, dim: int, rows: Tensor) -> HeadPool:
        """The pool of rows `rows` (dim 0: beam search reorders and drops hypotheses, as with a
        cache tensor)."""
        assert dim == 0, "a head pool selects rows only"
        return HeadPool(
            *(
                t.index_select(0, rows)
                for t in (self.k, self.v, self.scheme, self.offset, self.fell_back)
            ),
            self.heads,
            self.first,
            self.read_index,
            self.width,
        )

    @property
    def slots(self) -> int:
        return self.k.shape[1] - 1

    def head_bytes(self) -> int:
        """Bytes of one stored head: K and V."""
        return 2 * self.k.shape[2] * self.k.element_size()

    def nbytes(self) -> int:
        return self.slots * self.head_bytes() * self.k.shape[0]

    def _end_before(self, positions: Tensor) -> Tensor:
        """(B,) the first free slot after the tokens at positions < positions (B,)."""
        end = self.offset + self.heads[self.scheme]
        before = end.gather(1, (positions - 1).clamp_min(0)[:, None])[:, 0]
        return torch.where(positions > 0, before, torch.zeros_like(before))

    def _fits(self, offset: Tensor, scheme: Tensor, positions: Tensor) -> Tensor:
        return offset + self.heads[scheme] + (self.max_len - 1 - positions) <= self.slots

    def place(self, choice: Tensor, positions: Tensor) -> Tensor:
        """The schemes (B, T) the tokens at consecutive positions (B, T) store, given their choices,
        after the overflow policy; records scheme, offset and fallback per position. One token
        (decode): no host sync; a prompt (T > 1) whose choices do not all fit is placed token by
        token."""
        fallback = len(self.heads) - 1
        start = self._end_before(positions[:, 0])
        n = self.heads[choice]
        offset = start[:, None] + n.cumsum(1) - n
        ok = self._fits(offset, choice, positions)
        if choice.shape[1] > 1 and not bool(ok.all()):  # host sync: prefill only
            columns = []
            for t in range(choice.shape[1]):
                fits = self._fits(start, choice[:, t], positions[:, t])
                columns.append((torch.where(fits, choice[:, t], fallback), start, fits))
                start = start + self.heads[columns[-1][0]]
            scheme, offset, ok = (torch.stack(c, 1) for c in zip(*columns, strict=True))
        else:
            scheme = torch.where(ok, choice, fallback)
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(
            positions
        )
        for table, value in ((self.scheme, scheme), (self.offset, offset), (self.fell_back, ~ok)):
            # index_put, as in write_kv: compiled, it writes these entries alone
            table[rows, positions] = value
        return scheme

    def store(self, k: Tensor, v: Tensor, choice: Tensor, positions: Tensor) -> None:
        """Tokens at positions (B, T) with candidate heads k, v (B, T, candidates, D) and chosen
        schemes (B, T): each stores its placed scheme's heads in its slots."""
        scheme = self.place(choice, positions)
        j = torch.arange(self.width, device=k.device)  # (J,): the j-th head a token stores
        n = self.heads[scheme][..., None]  # (B, T, 1)
        source = (self.first[scheme][..., None] + j).clamp_max(k.shape[2] - 1)  # (B, T, J)
        # unused: last slot
        slot = torch.where(j < n, self.offset.gather(1, positions)[..., None] + j, self.slots)
        b, t, width = source.shape
        rows = torch.arange(b, device=k.device)[:, None].expand(b, t * width)
        for pool, new in ((self.k, k), (self.v, v)):
            # (B, T, J, D)
            heads = new.gather(2, source[..., None].expand(-1, -1, -1, new.shape[3]))
            pool[rows, slot.view(b, t * width)] = heads.reshape(b, t * width, -1).to(pool.dtype)

    def attend(self, q: Tensor, positions: Tensor) -> Tensor:
        """Attention of queries q (B, n_head, T, D) at positions (B, T) over this pool: query head h
        sees, for every position up to its own, the head that position's token stored for h. Returns
        (B, n_head, T, D).

        Computed on the slots, not on a gathered (B, n_head, max_len, D) view of them: the scores of
        every query head against every slot are one batched matmul that reads the pool's K once;
        each head's score for each position is then picked from that position's slot (a gather of
        scalars), and the softmax weights go back to their slots (a scatter of scalars) for one
        matmul with the pool's V. A gathered view writes and reads n_head heads per position, MHA's
        cache traffic, whatever the tokens stored."""
        b, h, t, d = q.shape
        slot = (self.offset[:, None, :] + self.read_index[self.scheme].transpose(1, 2)).clamp_max(
            self.slots
        )
        # (B, H, T, L): the slot head h reads at each position
        slot = slot[:, :, None, :].expand(b, h, t, self.max_len)
        # (B, H x T, D) @ (B, D, slots + 1): a bmm over rows (broadcasting the pool over heads would
        # copy it per head)
        scores = (
            torch.bmm(q.reshape(b, h * t, d), self.k.to(q.dtype).transpose(1, 2))
            .float()
            .view(b, h, t, -1)
        )
        # (B, 1, T, L)
        keep = torch.arange(self.max_len, device=q.device) <= positions[:, None, :, None]
        p = (scores.gather(-1, slot) * d**-0.5).masked_fill(~keep, float("-inf")).softmax(-1)
        weights = torch.zeros_like(scores).scatter_add_(-1, slot, p)  # masked positions add 0
        return torch.bmm(weights.to(q.dtype).view(b, h * t, -1), self.v.to(q.dtype)).view(
            b, h, t, d
        )

    def used_slots(self, lengths: Tensor) -> Tensor:
        """(B,) slots held by each row's first `lengths` tokens."""
        real = torch.arange(self.max_len, device=lengths.device) < lengths[:, None]
        return (self.heads[self.scheme] * real).sum(1)

    def fallbacks(self, lengths: Tensor) -> Tensor:
        """(B,) of each row's first `lengths` tokens, those stored as the fallback scheme by the
        overflow policy."""
        real = torch.arange(self.max_len, device=lengths.device) < lengths[:, None]
        return (self.fell_back & real).sum(1)
