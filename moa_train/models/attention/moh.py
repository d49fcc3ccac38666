"""Mixture-of-Head attention (MoH, Jin et al. 2024): multi-head attention whose head outputs are
weighted per token before the output projection. Heads 0..h_s-1 are shared (always on); each token
picks top_k of the h_r = n_head - h_s routed heads; the others contribute nothing.

Gating (`gating`):
- `router` (the paper and its released ViT/DiT code): p = softmax(W_r x) over the routed heads; a
  selected head's gate is k * p_i / (sum of p over the k selected), so uniform routing gives 1;
  shared gates h_s * softmax(W_s x) (h_s > 1; 1 for a single shared head); the two groups weighted
  by [a_shared, a_routed] = 2 * softmax(W_h x) (when both exist). Load balance, under the usual
  `balance` name: the released code's h_r * sum_i P_i f_i with f_i the share of tokens selecting
  routed head i (summing to k), i.e. `model.aux.balance_type=switch_k`, coefficient 0.01, the mean
  over layers.
- `query_norm` (the released MoH-LLaMA3 code): parameter-free. Each routed head's logit is the L2
  norm of its query divided by the (unbiased) std of those norms over the routed heads; the top_k
  by softmax of those logits (the k largest query norms) are kept; the gates are a binary mask
  (1 for shared and selected heads, 0 otherwise); no aux loss (its routing record carries
  statistics only).

Execution: like the released code, every head is computed (MHA's projections and attention) and
the unselected ones are multiplied by zero, so the output is exact; the FLOP counter reports that
(the released code's figure, which is what runs here), and `active_flops_per_token` the figure for
the Q/O projections and attention of the selected heads only, which a per-head sparse path would
execute. K/V of every head are needed (a later query may select any head): the KV cache is MHA's
(n_kv_heads heads per token, GQA as in MoH-LLaMA3 when set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from moa_train.models.attention.mha import MHAConfig, MultiHeadAttention, merge_heads
from moa_train.models.roles import ROUTER
from moa_train.models.rope import Rotary
from moa_train.models.routing import Routing
from moa_train.schema import ModelConfig
from moa_train.validation import check, one_of


@dataclass
class MoHConfig(MHAConfig):
    """moh: shared heads always on, top_k of the routed heads per token."""

    # shared heads (the first n_shared_heads); null = n_head // 2, as in MoH-LLaMA3
    n_shared_heads: int | None = None
    # routed heads active per token, 1..n_head - n_shared_heads; null = max(1, n_head // 4), as in
    # MoH-LLaMA3 (a quarter of all heads)
    top_k: int | None = None
    # router (learned softmax router, the paper and ViT/DiT code) | query_norm (MoH-LLaMA3 code)
    gating: str = "router"

    @staticmethod
    def shared(m) -> int:
        return m.n_head // 2 if m.n_shared_heads is None else m.n_shared_heads

    @staticmethod
    def active(m) -> int:
        return max(1, m.n_head // 4) if m.top_k is None else m.top_k

    @classmethod
    def validate(cls, m, cfg) -> None:
        super().validate(m, cfg)
        h_s = cls.shared(m)
        check(
            0 <= h_s < m.n_head,
            "model.n_shared_heads",
            f"{h_s} leaves no routed head of model.n_head={m.n_head}; valid: 0..{m.n_head - 1}",
        )
        h_r = m.n_head - h_s
        check(
            1 <= cls.active(m) <= h_r,
            "model.top_k",
            f"{cls.active(m)} is not in 1..{h_r} (the routed heads: model.n_head - "
            "model.n_shared_heads)",
        )
        one_of(m.gating, "model.gating", ("router", "query_norm"))
        check(
            m.gating != "query_norm" or h_r >= 2,
            "model.gating",
            "query_norm divides the routed heads' query norms by their std: it needs at least 2 "
            f"routed heads, got {h_r}",
        )

    @classmethod
    def attention_params(cls, m) -> int:
        """MHA's projections and, with the learned router, W_r, W_s (h_s > 1) and W_h (h_s > 0)."""
        return super().attention_params(m) + m.d_model * cls.router_outputs(m)

    @classmethod
    def router_outputs(cls, m) -> int:
        """Outputs of the router linears (0 for query_norm)."""
        if m.gating == "query_norm":
            return 0
        h_s = cls.shared(m)
        return (m.n_head - h_s) + (h_s if h_s > 1 else 0) + (2 if h_s > 0 else 0)


class MoHAttention(MultiHeadAttention):
    """MHA (its projections, attention and cache) with MoH's per-token head gates."""

    PARAM_ROLES: ClassVar[dict] = {
        **MultiHeadAttention.PARAM_ROLES,
        "router": ROUTER,
        "shared_router": ROUTER,
        "group_router": ROUTER,
    }

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_shared_heads: int,
        top_k: int,
        gating: str = "router",
        n_kv_heads: int | None = None,
        dropout: float = 0.0,
        bias: bool = False,
        causal: bool = True,
        attn_dropout: float | None = None,
    ):
        super().__init__(d_model, n_head, n_kv_heads, dropout, bias, causal, attn_dropout)
        self.n_shared, self.top_k, self.gating = n_shared_heads, top_k, gating
        self.n_routed = n_head - n_shared_heads
        self.choice_names = tuple(str(i) for i in range(n_shared_heads, n_head))
        if gating == "router":
            self.router = nn.Linear(d_model, self.n_routed, bias=False)  # W_r
            if n_shared_heads > 1:
                self.shared_router = nn.Linear(d_model, n_shared_heads, bias=False)  # W_s
            if n_shared_heads > 0:
                self.group_router = nn.Linear(d_model, 2, bias=False)  # W_h: shared vs routed

    @classmethod
    def from_config(cls, m, causal: bool = True) -> MoHAttention:
        attn = cls(
            m.d_model,
            m.n_head,
            MoHConfig.shared(m),
            MoHConfig.active(m),
            m.gating,
            m.n_kv_heads,
            m.dropout,
            m.bias,
            causal,
            ModelConfig.attn_p(m),
        )
        # rotation keeps each head's query norm: query_norm gating is unchanged by it
        attn.rope = Rotary.of(m, attn.head_dim)
        return attn

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None):
        """(y, Routing): MHA's attention (cached while decoding, as MultiHeadAttention's), each
        head's output times its gate, then the output projection."""
        q, heads = self.attend(x, context, mask)
        gates, routing = self.gates(x, q)
        b, t, _ = x.shape
        heads = heads * gates.view(b, t, -1).transpose(1, 2).unsqueeze(-1).to(heads.dtype)
        return self.resid_dropout(self.c_proj(merge_heads(heads))), routing

    def gates(self, x: Tensor, q: Tensor) -> tuple:
        """(gates (N, n_head), Routing over the routed heads) for the flattened tokens of x; q (B,
        n_head, T, head_dim) are the queries (query_norm routes on them)."""
        if self.gating == "query_norm":
            return self.query_norm_gates(q)
        logits = self.router(x).float().flatten(0, -2)
        probs = logits.softmax(-1)
        top, chosen = probs.topk(self.top_k, dim=-1)
        renorm = top / top.sum(-1, keepdim=True).clamp_min(torch.finfo(top.dtype).eps)
        routed = torch.zeros_like(probs).scatter(-1, chosen, self.top_k * renorm)
        routing = Routing(probs, self.choice_names, chosen, logits)
        if self.n_shared == 0:
            return routed, routing
        flat = x.flatten(0, -2)
        shared = (
            self.n_shared * self.shared_router(flat).float().softmax(-1)
            if self.n_shared > 1
            else probs.new_ones(probs.shape[0], 1)
        )
        group = 2 * self.group_router(flat).float().softmax(-1)
        return torch.cat([group[:, :1] * shared, group[:, 1:] * routed], -1), routing

    def query_norm_gates(self, q: Tensor) -> tuple:
        """MoH-LLaMA3's rule: the routed heads with the largest query norms, a binary mask."""
        norms = q[:, self.n_shared :].float().norm(dim=-1).permute(0, 2, 1).flatten(0, 1)
        # (the std is floored: equal norms, which the released code divides by 0, select any k)
        logits = norms / norms.std(-1, keepdim=True).clamp_min(torch.finfo(norms.dtype).tiny)
        probs = logits.softmax(-1)
        chosen = probs.topk(self.top_k, dim=-1).indices
        routed = torch.zeros_like(probs).scatter(-1, chosen, 1.0)
        gates = torch.cat([routed.new_ones(routed.shape[0], self.n_shared), routed], -1)
        return gates, Routing(probs.detach(), self.choice_names, chosen, aux_terms=False)

    def router_params_per_token(self) -> int:
        return sum(
            getattr(self, name).weight.numel()
            for name in ("router", "shared_router", "group_router")
            if hasattr(self, name)
        )

    def matmul_params_per_token(self) -> int:
        """MHA's projections (every head is computed) and the router linears."""
        return super().matmul_params_per_token() + self.router_params_per_token()

    def active_flops_per_token(self, seq_len: int) -> int:
        """What a path computing only the selected heads would execute: K/V of every head (the
        cache needs them), Q, O and attention of the n_shared + top_k active heads, the routers."""
        d, dh = self.c_proj.out_features, self.head_dim
        active = self.n_shared + self.top_k
        params = 2 * d * self.n_kv * dh + 2 * d * active * dh + self.router_params_per_token()
        return 6 * params + 12 * active * dh * seq_len
