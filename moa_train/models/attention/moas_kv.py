"""MoAS-KV: per-token routing of the KEY/VALUE side between MHA, GQA and MQA, so that the KV cache
really shrinks.

A query-side MoAS (moas.py) must cache every branch's K/V (n_head + G + 1 heads per token and
layer). Here each token's router picks, per layer, how many K/V heads that token STORES: MHA (n_head
heads), GQA (G heads) or MQA (1 head). A query head h reads, for each past token, the K/V head that
token stored for h: its own head h (MHA), its group's head h // (n_head / G) (GQA) or its single
head (MQA). The closest published idea is mixSGA (token-wise routing to experts of different KV
group sizes); this is a trainable version under a KV budget.

Weights (mixSGA-style sharing): Q, K, V and O are ONE MHA projection (n_head query heads, n_head K/V
heads, one output projection), shared by the three schemes. A token's GQA heads are the means of its
MHA K/V heads over each group of n_head / G heads, its MQA head the mean over all n_head; since the
projection is linear, these are GQA/MQA projections whose weights are the group means of the MHA
rows. The only parameters beyond MHA are the router, one Linear(d_model, 3) per layer (no bias
unless model.bias). Separate per-scheme K/V projections would add 2(G+1) heads of weights per layer,
and a token's cheap heads would then not be summaries of its full ones: a token moving between
schemes would change representation entirely, which makes the routing harder to learn.

Training relaxation: straight-through (hard forward, soft backward). The forward uses the router's
argmax scheme (one-hot gates), so training attends to exactly the heads inference reads and the
cache stores; the backward uses the gradient of softmax(logits / tau) (model.router_tau) in place of
the one-hot's. Rejected: a soft mixture of the three K/Vs (training would read every scheme's heads,
and a budget on the expected heads does not bound what argmax stores at inference) and
straight-through Gumbel-softmax (the sampled scheme is what training pays for; inference's argmax
then stores a different, larger amount whenever the router is unsure).

KV budget (model.kv_budget, heads per token averaged over tokens and layers; MHA = n_head, MQA = 1;
null = none): the loss model.aux.kv_budget_coef x relu(heads - kv_budget)^2, heads = the
straight-through stored heads per token (value: what the hard routing stores; gradient: through the
router's probabilities), averaged over tokens and layers (moa_train.models.routing.aux_losses:
train/aux/kv_heads, train/aux/kv_budget). Layers may differ; only the mean is held.

Inference (model.inference_routing): hard (the default: the argmax scheme, what the cache stores) or
soft (eval forwards mix the three schemes' K/V with the router's probabilities: a reference that
cannot be cached in less than n_head heads; cached decoding is always hard).

Cache (`HeadPool`, below, this module's own LayerCache): per layer and row a pool of
ceil(model.kv_pool_slack x kv_budget x max_len) head slots (at least max_len; kv_budget null: n_head
x max_len), each token's heads at its own offset. Overflow policy: a token whose scheme would leave
fewer free slots than the row has positions left stores MQA instead (counted per position;
moa-generate reports the count once). Cached attention (`HeadPool.attend`) reads the pool's slots
once per step (scores against every slot, then each position's score picked from its slot), so a
decode step reads what the tokens stored, not an n_head-head view of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from moa_train.models.attention.mha import attention_settings, merge_heads, sdpa, split_heads
from moa_train.models.attention.moas import check_gqa_heads
from moa_train.models.kv_cache import DecodeState, LayerCache
from moa_train.models.roles import NO_DECAY, RESIDUAL, ROUTER
from moa_train.models.rope import Rotary, rotate_qk
from moa_train.models.routing import Routing
from moa_train.schema import ModelConfig
from moa_train.validation import check, one_of

SCHEMES = ("mha", "gqa", "mqa")


@dataclass
class MoASKVConfig(ModelConfig):
    """moas_kv: per token and layer, the K/V side routed between MHA, GQA and MQA (the heads the
    token stores)."""

    gqa_kv_heads: int = 2  # K/V heads a token stores under GQA, dividing n_head
    # target stored K/V heads per token, averaged over tokens and layers (MHA = n_head, MQA = 1);
    # null = no budget loss. Its strength: model.aux.kv_budget_coef
    kv_budget: float | None = None
    # temperature of the softmax whose gradient the straight-through router uses
    router_tau: float = 1.0
    # hard: eval forwards use the argmax scheme (what the cache stores) | soft: eval forwards mix
    # the schemes' K/V by the router's probabilities (a reference; cached decoding stays hard);
    # training is always straight-through
    inference_routing: str = "hard"
    # cache pool per layer and row: ceil(kv_pool_slack x kv_budget x max_len) head slots (null
    # budget: n_head x max_len); a token that would overflow it stores MQA
    kv_pool_slack: float = 1.25

    cross_attention_ok: ClassVar[bool] = False  # a self-attention scheme
    cross_default: ClassVar[str | None] = "mha"

    @classmethod
    def validate(cls, m, cfg) -> None:
        super().validate(m, cfg)
        check_gqa_heads(m)
        check(
            m.kv_budget is None or 1 <= m.kv_budget <= m.n_head,
            "model.kv_budget",
            f"must be null or in [1, model.n_head={m.n_head}] (stored K/V heads per token), got "
            f"{m.kv_budget}",
        )
        check(m.router_tau > 0, "model.router_tau", f"must be > 0, got {m.router_tau}")
        one_of(m.inference_routing, "model.inference_routing", ("hard", "soft"))
        check(m.kv_pool_slack >= 1, "model.kv_pool_slack", f"must be >= 1, got {m.kv_pool_slack}")

    @classmethod
    def attention_params(cls, m) -> int:
        """c_attn, c_proj and the router of MoASKVAttention."""
        return (m.d_model + m.bias) * (4 * m.d_model + len(SCHEMES))


class MoASKVAttention(nn.Module):
    PARAM_ROLES: ClassVar[dict] = {
        "router": ROUTER,
        "c_proj.weight": RESIDUAL,
        "c_attn.bias": NO_DECAY,
        "c_proj.bias": NO_DECAY,
        "router.bias": NO_DECAY,
    }
    kv_cache = None  # its HeadPool while the model decodes

    def __init__(
        self,
        d_model: int,
        n_head: int,
        gqa_kv_heads: int = 2,
        kv_budget: float | None = None,
        router_tau: float = 1.0,
        inference_routing: str = "hard",
        kv_pool_slack: float = 1.25,
        dropout: float = 0.0,
        bias: bool = False,
        causal: bool = True,
        attn_dropout: float | None = None,
    ):
        super().__init__()
        self.n_head, self.head_dim, self.gqa_kv_heads = n_head, d_model // n_head, gqa_kv_heads
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.c_proj = nn.Linear(d_model, d_model, bias=bias)
        self.router = nn.Linear(d_model, len(SCHEMES), bias=bias)
        attention_settings(self, dropout, attn_dropout, causal)
        self.kv_budget, self.router_tau, self.inference_routing = (
            kv_budget,
            router_tau,
            inference_routing,
        )
        self.kv_pool_slack = kv_pool_slack
        self.register_buffer(
            "stored_heads",
            torch.tensor([float(n_head), float(gqa_kv_heads), 1.0]),
            persistent=False,
        )

    @classmethod
    def from_config(cls, m, causal: bool = True) -> MoASKVAttention:
        attn = cls(
            m.d_model,
            m.n_head,
            m.gqa_kv_heads,
            dropout=m.dropout,
            bias=m.bias,
            causal=causal,
            attn_dropout=ModelConfig.attn_p(m),
            kv_budget=m.kv_budget,
            router_tau=m.router_tau,
            inference_routing=m.inference_routing,
            kv_pool_slack=m.kv_pool_slack,
        )
        # K is rotated before the GQA/MQA means: one rotation per position, so the mean of rotated
        # heads is the rotated mean
        attn.rope = Rotary.of(m, attn.head_dim)
        return attn

    def route(self, x: Tensor) -> tuple:
        """(gates (B, T, 3) mixing the schemes' K/V, Routing). Training: straight-through one-hot of
        the argmax; eval: the one-hot (hard) or the probabilities (soft)."""
        logits = self.router(x).float()
        probs = (logits / self.router_tau).softmax(-1)
        chosen = logits.argmax(-1, keepdim=True)
        hard = torch.zeros_like(probs).scatter(-1, chosen, 1.0)
        if self.training:
            gates = hard + probs - probs.detach()
        else:
            gates = probs if self.inference_routing == "soft" else hard
        routing = Routing(
            probs.view(-1, 3),
            SCHEMES,
            chosen.view(-1, 1),
            logits.view(-1, 3),
            cost=self.stored_heads,
            budget=self.kv_budget,
        )
        return gates, routing

    def candidates(self, kv: Tensor) -> list:
        """K or V heads (B, n_head, T, D) -> each scheme's stored heads: [MHA (n_head), GQA (G), MQA
        (1)]."""
        b, h, t, d = kv.shape
        return [
            kv,
            kv.view(b, self.gqa_kv_heads, h // self.gqa_kv_heads, t, d).mean(2),
            kv.mean(1, keepdim=True),
        ]

    def mix(self, kv: Tensor, gates: Tensor) -> Tensor:
        """(B, n_head, T, D): per token, the gate-weighted schemes' heads as query head h reads
        them."""
        b, h, t, d = kv.shape
        # under autocast K/V are bf16: the mix stays in their dtype, as Q is
        gates = gates.to(kv.dtype)
        out = 0.0
        for i, heads in enumerate(self.candidates(kv)):
            read = (
                heads.unsqueeze(2)
                .expand(b, heads.shape[1], h // heads.shape[1], t, d)
                .reshape(b, h, t, d)
            )
            out = out + gates[:, None, :, i : i + 1] * read
        return out

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None):
        if context is not None:
            raise NotImplementedError(
                "moas_kv is a self-attention scheme; use mha or moa for cross-attention"
            )
        q, k, v = (split_heads(part, self.n_head) for part in self.c_attn(x).chunk(3, dim=-1))
        q, k = rotate_qk(self, q, k)
        if self.kv_cache is not None:  # hard routing: the argmax alone, no gates
            logits = self.router(x).float()
            y = self.through_pool(q, k, v, logits.argmax(-1))
            return self.c_proj(merge_heads(y)), None
        gates, routing = self.route(x)
        y = sdpa(
            q,
            self.mix(k, gates),
            self.mix(v, gates),
            mask,
            self.causal,
            self.dropout if self.training else 0.0,
        )
        return self.resid_dropout(self.c_proj(merge_heads(y))), routing

    def through_pool(self, q: Tensor, k: Tensor, v: Tensor, choice: Tensor) -> Tensor:
        """Decoding through this layer's HeadPool: every new token stores only its argmax scheme's
        heads (or MQA's, where the pool's overflow policy says so); each query head reads, per past
        token, the head that token stored for it. Always hard routing. The pool is addressed by
        slots: the state's span is not used (positions past a row's length are masked). Decoding
        returns no routing record."""
        # choice (B, T): each token's argmax scheme; (B, T, H+G+1, D) candidates
        k_cand, v_cand = (torch.cat(self.candidates(kv), 1).transpose(1, 2) for kv in (k, v))
        self.kv_cache.store(k_cand, v_cand, choice)
        return self.kv_cache.attend(q)

    def matmul_params_per_token(self) -> int:
        return self.c_attn.weight.numel() + self.c_proj.weight.numel() + self.router.weight.numel()

    def flops_per_token(self, seq_len: int) -> int:
        """6 x (MHA's projections + the router) + 12 x n_head x head_dim x T: attention runs n_head
        query heads whatever the schemes (the group means are elementwise and not counted, as no
        variant counts those)."""
        return 6 * self.matmul_params_per_token() + 12 * self.n_head * self.head_dim * seq_len

    def budget_heads(self) -> float:
        """Stored heads per token the cache is sized for: kv_budget, or n_head without one."""
        return float(self.n_head if self.kv_budget is None else self.kv_budget)

    def make_cache(self, state: DecodeState, device, dtype) -> HeadPool:
        """A pool (see the module docstring): a token stores n_head, G or 1 heads."""
        h, g = self.n_head, self.gqa_kv_heads
        read = (tuple(range(h)), tuple(i // (h // g) for i in range(h)), (0,) * h)
        return HeadPool.allocate(
            state,
            self.head_dim,
            (h, g, 1),
            (0, h, h + g),
            read,
            self.kv_pool_slack * self.budget_heads(),
            device,
            dtype,
        )

    def kv_cache_elems_per_token(self, heads: float | None = None) -> float:
        """2 x stored heads x head_dim: the budget's heads (n_head without one), or `heads` (a
        measured mean, e.g. from `realised_heads`)."""
        return 2 * (self.budget_heads() if heads is None else heads) * self.head_dim

    def realised_heads(self, routing: Routing) -> Tensor:
        """Mean stored heads per token of this layer's hard routing in `routing` (from an eval
        forward)."""
        return self.stored_heads[routing.chosen[:, 0]].mean()


class HeadPool(LayerCache):
    """One layer's pooled K/V: per row `k`, `v` (slots + 1, head_dim), and per position the scheme
    its token stored, the offset of its first slot and whether the overflow policy changed its
    scheme. Under scheme c a token stores `heads[c]` heads (its candidate heads `first[c]` ..
    `first[c] + heads[c] - 1`), and query head h reads the token's stored head `read_index[c][h]`.

    Overflow policy (fall back, never grow: fixed shapes, so decode steps compile): a token at
    position p keeps its chosen scheme only if, after its heads, at least one slot per later
    position of the row (up to max_len) is left; otherwise it stores the fallback scheme (the last,
    one head), which always fits. `overflow` counts such tokens; moa-generate reports them once per
    generation. A pool of max(heads) x max_len slots never falls back."""

    def __init__(self, state, k, v, scheme, offset, fell_back, heads, first, read_index, width):
        self.state, self.k, self.v = state, k, v
        self.scheme = scheme  # (B, max_len) int64
        self.offset = offset  # (B, max_len) int64: the token's first slot
        self.fell_back = fell_back  # (B, max_len) bool
        self.heads, self.first, self.read_index = heads, first, read_index  # (C,), (C,), (C, H)
        self.width = width  # the most heads a token stores

    @classmethod
    def allocate(
        cls, state, head_dim, heads, first, read_index, slots_per_token, device, dtype
    ) -> HeadPool:
        """ceil(slots_per_token x max_len) slots per row, at least max_len (one per position: the
        fallback scheme, one head, always fits) and at most max(heads) x max_len."""
        b, max_len = state.lengths.shape[0], state.max_len
        slots = max(max_len, min(max(heads) * max_len, math.ceil(slots_per_token * max_len)))

        def table(value: int) -> Tensor:
            return torch.full((b, max_len), value, dtype=torch.int64, device=device)

        # the last slot takes the writes of the heads a scheme does not store
        k = torch.zeros(b, slots + 1, head_dim, device=device, dtype=dtype)
        return cls(
            state,
            k,
            torch.zeros_like(k),
            table(0),
            table(0),
            torch.zeros(b, max_len, dtype=torch.bool, device=device),
            torch.tensor(heads, device=device),
            torch.tensor(first, device=device),
            torch.tensor(read_index, device=device),
            max(heads),
        )

    @property
    def max_len(self) -> int:
        return self.scheme.shape[1]

    @property
    def slots(self) -> int:
        return self.k.shape[1] - 1

    @property
    def max_heads(self) -> int:
        return self.width

    def select(self, rows: Tensor) -> None:
        for name in ("k", "v", "scheme", "offset", "fell_back"):
            setattr(self, name, getattr(self, name).index_select(0, rows))

    def head_bytes(self) -> int:
        """Bytes of one stored head: K and V."""
        return 2 * self.k.shape[2] * self.k.element_size()

    def nbytes(self) -> int:
        return self.slots * self.head_bytes() * self.k.shape[0]

    def realised_bytes(self) -> Tensor:
        return self.used_slots(self.state.lengths).sum() * self.head_bytes()

    def overflow(self) -> Tensor:
        return self.fallbacks(self.state.lengths).sum()

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
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        rows = rows.expand_as(positions)
        for table, value in ((self.scheme, scheme), (self.offset, offset), (self.fell_back, ~ok)):
            # index_put, as in write_kv: compiled, it writes these entries alone
            table[rows, positions] = value
        return scheme

    def store(self, k: Tensor, v: Tensor, choice: Tensor) -> None:
        """The new tokens (B, T), after each row's held ones, with candidate heads k, v (B, T,
        candidates, D) and chosen schemes (B, T): each stores its placed scheme's heads in its
        slots."""
        positions = self.state.positions(choice.shape[1])
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
        self.mark_used()

    def attend(self, q: Tensor) -> Tensor:
        """Attention of the new tokens' queries q (B, n_head, T, D) over this pool: query head h
        sees, for every position up to its own, the head that position's token stored for h.
        Returns (B, n_head, T, D). Call after `store` (the new tokens are then held: their positions
        are the last T below lengths + T).

        Computed on the slots, not on a gathered (B, n_head, max_len, D) view of them: the scores of
        every query head against every slot are one batched matmul that reads the pool's K once;
        each head's score for each position is then picked from that position's slot (a gather of
        scalars), and the softmax weights go back to their slots (a scatter of scalars) for one
        matmul with the pool's V. A gathered view writes and reads n_head heads per position, MHA's
        cache traffic, whatever the tokens stored."""
        b, h, t, d = q.shape
        positions = self.state.positions(t)
        read = self.read_index[self.scheme].transpose(1, 2)
        slot = (self.offset[:, None, :] + read).clamp_max(self.slots)
        # (B, H, T, L): the slot head h reads at each position
        slot = slot[:, :, None, :].expand(b, h, t, self.max_len)
        # (B, H x T, D) @ (B, D, slots + 1): a bmm over rows (broadcasting the pool over heads would
        # copy it per head)
        scores = torch.bmm(q.reshape(b, h * t, d), self.k.to(q.dtype).transpose(1, 2))
        scores = scores.float().view(b, h, t, -1)
        # (B, 1, T, L)
        keep = torch.arange(self.max_len, device=q.device) <= positions[:, None, :, None]
        p = (scores.gather(-1, slot) * d**-0.5).masked_fill(~keep, float("-inf")).softmax(-1)
        weights = torch.zeros_like(scores).scatter_add_(-1, slot, p)  # masked positions add 0
        out = torch.bmm(weights.to(q.dtype).view(b, h * t, -1), self.v.to(q.dtype))
        return out.view(b, h, t, d)

    def used_slots(self, lengths: Tensor) -> Tensor:
        """(B,) slots held by each row's first `lengths` tokens."""
        real = torch.arange(self.max_len, device=lengths.device) < lengths[:, None]
        return (self.heads[self.scheme] * real).sum(1)

    def fallbacks(self, lengths: Tensor) -> Tensor:
        """(B,) of each row's first `lengths` tokens, those stored as the fallback scheme by the
        overflow policy."""
        real = torch.arange(self.max_len, device=lengths.device) < lengths[:, None]
        return (self.fell_back & real).sum(1)
