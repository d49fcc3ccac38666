"""Mixture of Attention Heads (MoA, Zhang et al. 2022): each token picks k of E experts; an expert is a query
projection and an output projection of n_kv_heads x head_dim; K and V are shared by all experts (n_kv_heads groups,
default 1, as in the released code). The k selected query heads of every token attend in one SDPA call.

Gating: `softmax_all` (released code) takes the top-k of a softmax over all E and does not renormalise;
`topk_softmax` renormalises over the k selected. The router starts at zero (uniform), as in the released code.

Expert projections: the default path computes all E experts' queries in one matmul and gathers the k selected;
the output side scatters the gated heads into an E-slot buffer and applies all experts' O in one matmul. That is
exact and fast when k is close to E; the FLOP counter counts only the k selected experts.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from moa_train.models.attention.mha import sdpa, split_heads
from moa_train.models.routing import Routing


class MixtureOfAttentionHeads(nn.Module):
    def __init__(self, d_model: int, n_experts: int, top_k: int, head_dim: int, n_kv_heads: Optional[int] = None,
                 dropout: float = 0.0, bias: bool = False, gating: str = "softmax_all", causal: bool = True):
        super().__init__()
        self.n_experts, self.top_k, self.head_dim = n_experts, top_k, head_dim
        self.n_kv = n_kv_heads or 1
        self.expert_dim = self.n_kv * head_dim  # one query head per K/V group per expert
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.q_proj = nn.Linear(d_model, n_experts * self.expert_dim, bias=bias)
        self.kv_proj = nn.Linear(d_model, 2 * self.expert_dim, bias=bias)
        self.c_proj = nn.Linear(n_experts * self.expert_dim, d_model, bias=bias)
        self.gating = gating
        self.dropout, self.causal = dropout, causal
        self.resid_dropout = nn.Dropout(dropout)
        self.choice_names = tuple(str(i) for i in range(n_experts))

    @classmethod
    def from_config(cls, m, causal: bool = True) -> "MixtureOfAttentionHeads":
        head_dim = m.head_dim or m.d_model // m.n_head
        return cls(m.d_model, m.n_experts, m.top_k, head_dim, m.n_kv_heads, m.dropout, m.bias, m.gating, causal)

    def post_init(self) -> None:
        nn.init.zeros_(self.router.weight)

    def route(self, x: Tensor) -> tuple:
        """(gates (N, k), chosen (N, k), Routing) for the flattened tokens."""
        logits = self.router(x).float().flatten(0, -2)
        probs = logits.softmax(-1)
        if self.gating == "softmax_all":
            gates, chosen = probs.topk(self.top_k, dim=-1)
        else:
            top_logits, chosen = logits.topk(self.top_k, dim=-1)
            gates = top_logits.softmax(-1)
        routing = Routing(probs, self.choice_names, chosen, logits)
        return gates, chosen, routing

    def forward(self, x: Tensor, context: Optional[Tensor] = None, mask: Optional[Tensor] = None):
        b, t, _ = x.shape
        e, k, g, dh = self.n_experts, self.top_k, self.n_kv, self.head_dim
        gates, chosen, routing = self.route(x)
        # queries of the selected experts: (B, T, k, g, dh) -> heads ordered group-major (B, g*k, T, dh)
        q_all = self.q_proj(x).view(b * t, e, self.expert_dim)
        q = q_all.gather(1, chosen.unsqueeze(-1).expand(-1, -1, self.expert_dim))
        q = q.view(b, t, k, g, dh).permute(0, 3, 2, 1, 4).reshape(b, g * k, t, dh)
        kv_k, kv_v = self.kv_proj(x if context is None else context).split(self.expert_dim, dim=-1)
        p = self.dropout if self.training else 0.0
        o = sdpa(q, split_heads(kv_k, g), split_heads(kv_v, g), mask, self.causal and context is None, p)
        o = o.view(b, g, k, t, dh).permute(0, 3, 2, 1, 4).reshape(b * t, k, self.expert_dim)
        o = o * gates.to(o.dtype).unsqueeze(-1)
        slots = o.new_zeros(b * t, e, self.expert_dim).scatter(1, chosen.unsqueeze(-1).expand_as(o), o)
        y = self.c_proj(slots.view(b, t, e * self.expert_dim))
        return self.resid_dropout(y), routing

    def matmul_params_per_token(self) -> int:
        """Router and shared K/V for every token; Q and O of the k selected experts only."""
        d = self.router.in_features
        return d * self.n_experts + 2 * d * self.expert_dim + 2 * self.top_k * d * self.expert_dim

    def flops_per_token(self, seq_len: int) -> int:
        return 6 * self.matmul_params_per_token() + 12 * self.top_k * self.n_kv * self.head_dim * seq_len

    def kv_cache_elems_per_token(self) -> int:
        return 2 * self.expert_dim
