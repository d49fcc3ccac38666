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

Cache (models/kv_cache.py, PoolLayout / HeadPool): per layer and row a pool of
ceil(model.kv_pool_slack x kv_budget x max_len) head slots (at least max_len; kv_budget null: n_head
x max_len), each token's heads at its own offset. Overflow policy: a token whose scheme would leave
fewer free slots than the row has positions left stores MQA instead (counted per position;
moa-generate reports the count once). Cached attention (`HeadPool.attend`) reads the pool's slots
once per step (scores against every slot, then each position's score picked from its slot), so a
decode step reads what the tokens stored, not an n_head-head view of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from moa_train.config import ModelConfig, _check, _one_of
from moa_train.models.attention.mha import merge_heads, sdpa, split_heads
from moa_train.models.attention.moas import check_gqa_heads
from moa_train.models.kv_cache import PoolLayout
from moa_train.models.roles import NO_DECAY, RESIDUAL, ROUTER
from moa_train.models.routing import Routing

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
        _check(
            m.kv_budget is None or 1 <= m.kv_budget <= m.n_head,
            "model.kv_budget",
            f"must be null or in [1, model.n_head={m.n_head}] (stored K/V heads per token), got "
            f"{m.kv_budget}",
        )
        _check(m.router_tau > 0, "model.router_tau", f"must be > 0, got {m.router_tau}")
        _one_of(m.inference_routing, "model.inference_routing", ("hard", "soft"))
        _check(m.kv_pool_slack >= 1, "model.kv_pool_slack", f"must be >= 1, got {m.kv_pool_slack}")


class MoASKVAttention(nn.Module):
    PARAM_ROLES: ClassVar[dict] = {
        "router": ROUTER,
        "c_proj.weight": RESIDUAL,
        "c_attn.bias": NO_DECAY,
        "c_proj.bias": NO_DECAY,
        "router.bias": NO_DECAY,
    }

    def __init__(
        self,
        d_model: int,
        n_head: int,
        gqa_kv_heads: int = 2,
        dropout: float = 0.0,
        bias: bool = False,
        causal: bool = True,
        attn_dropout: float | None = None,
        kv_budget: float | None = None,
        router_tau: float = 1.0,
        inference_routing: str = "hard",
        kv_pool_slack: float = 1.25,
    ):
        super().__init__()
        self.n_head, self.head_dim, self.gqa_kv_heads = n_head, d_model // n_head, gqa_kv_heads
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.c_proj = nn.Linear(d_model, d_model, bias=bias)
        self.router = nn.Linear(d_model, len(SCHEMES), bias=bias)
        self.causal = causal
        self.dropout = dropout if attn_dropout is None else attn_dropout
        self.resid_dropout = nn.Dropout(dropout)
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
        return cls(
            m.d_model,
            m.n_head,
            m.gqa_kv_heads,
            m.dropout,
            m.bias,
            causal,
            ModelConfig.attn_p(m),
            m.kv_budget,
            m.router_tau,
            m.inference_routing,
            m.kv_pool_slack,
        )

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
        gates, routing = self.route(x)
        q, k, v = (split_heads(part, self.n_head) for part in self.c_attn(x).chunk(3, dim=-1))
        y = sdpa(
            q,
            self.mix(k, gates),
            self.mix(v, gates),
            mask,
            self.causal,
            self.dropout if self.training else 0.0,
        )
        return self.resid_dropout(self.c_proj(merge_heads(y))), routing

    def forward_cached(
        self, x: Tensor, pool, cache_v: None, positions: Tensor, span: int | None = None
    ) -> Tensor:
        """Cached self-attention through this layer's HeadPool (models/kv_cache.py): every new token
        stores only its argmax scheme's heads (or MQA's, where the pool's overflow policy says so);
        each query head reads, per past token, the head that token stored for it. Always hard
        routing. `span` is not used: the pool is addressed by slots, and the positions past a row's
        length are masked."""
        choice = self.router(x).float().argmax(-1)  # (B, T)
        q, k, v = (split_heads(part, self.n_head) for part in self.c_attn(x).chunk(3, dim=-1))
        # (B, T, H+G+1, D)
        k_cand, v_cand = (torch.cat(self.candidates(kv), 1).transpose(1, 2) for kv in (k, v))
        pool.store(k_cand, v_cand, choice, positions)
        return self.c_proj(merge_heads(pool.attend(q, positions)))

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

    def kv_layout(self) -> PoolLayout:
        """A pool (see the module docstring): a token stores n_head, G or 1 heads."""
        h, g = self.n_head, self.gqa_kv_heads
        read = (tuple(range(h)), tuple(i // (h // g) for i in range(h)), (0,) * h)
        return PoolLayout(
            self.head_dim, (h, g, 1), (0, h, h + g), read, self.kv_pool_slack * self.budget_heads()
        )

    def kv_cache_elems_per_token(self, heads: float | None = None) -> float:
        """2 x stored heads x head_dim: the budget's heads (n_head without one), or `heads` (a
        measured mean, e.g. from `realised_heads`)."""
        return 2 * (self.budget_heads() if heads is None else heads) * self.head_dim

    def realised_heads(self, routing: Routing) -> Tensor:
        """Mean stored heads per token of this layer's hard routing in `routing` (from an eval
        forward)."""
        return self.stored_heads[routing.chosen[:, 0]].mean()
