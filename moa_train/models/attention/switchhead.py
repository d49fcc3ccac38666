"""SwitchHead (Csordás, Piękos, Irie, Schmidhuber; NeurIPS 2024): few heads, each with dense Q and K
and mixture-of-experts V and O projections.

Per head h with E experts and top-k (the released `SwitchHeadCore`):
- q, k = W_Q^h x, W_K^h x (dense, shared by the head's experts), rotated with model.positions=rope
  (the preset: half of each head's channels, base 10000, as `SwitchHeadRope`);
- value, chosen by the SOURCE token s: r_s = sigmoid(S_V^h x_s) over E, I_s = its top-k,
  v_s = sum_{e in I_s} r_s[e] W_V^{h,e} x_s;
- output, chosen by the DESTINATION token t: o_t = sigmoid(S_O^h x_t), J_t = its top-k,
  y_t = sum_h sum_{e in J_t} o_t[e] W_O^{h,e} u_t^h, u^h the head's attention output.
Selection is non-competitive: sigmoid scores, no softmax, no renormalisation over the k, no bias;
the top-k indices carry no gradient, the selected scores do. Selection logits are computed in
fp32. No auxiliary loss (the paper's runs use none), so forward returns no routing record.

Only the selected experts are computed: the N x H x k (token, head, slot) assignments are sorted by
expert (h * E + e) and V and O run as grouped matmuls over the sorted rows (models/attention/
grouped.py: the fused kernel in bf16 on an H100-class GPU, a per-expert loop elsewhere).

Cache: a StaticKV of H heads of head_dim: each token's rotated K and its value AFTER expert mixing.
A value's experts depend only on its own (source) token, so the mixed V is exact to cache: 2 x H x
head_dim values per token and layer, as MHA with H heads. The released layer's cached path rotates a
new query as position 0 (its offset is q_len - k_len); ours numbers it from the cache's DecodeState,
and the conformance check compares it with our own full forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from moa_train.models.attention.grouped import gather_rows, grouped_mm
from moa_train.models.attention.mha import MultiHeadAttention, attention_settings, sdpa, split_heads
from moa_train.models.attention.moa import MixtureOfAttentionHeads
from moa_train.models.roles import RESIDUAL, ROUTER
from moa_train.models.rope import Rotary, rotate_qk
from moa_train.schema import ModelConfig
from moa_train.validation import check, check_experts, positive_or_null


@dataclass
class SwitchHeadConfig(ModelConfig):
    """switchhead: n_head heads, V and O of each a top_k-of-n_experts mixture."""

    head_dim: int | None = None  # per-head size; null = d_model // n_head
    n_experts: int = 5  # E: V and O experts per head
    top_k: int = 2  # k experts per token and head (moe_k), 1..E

    cross_attention_ok: ClassVar[bool] = False  # V and O pick experts for self-attention tokens
    cross_default: ClassVar[str | None] = "mha"

    @classmethod
    def validate(cls, m, cfg) -> None:
        super().validate(m, cfg)
        check_experts(m)
        positive_or_null(m.head_dim, "model.head_dim")
        if m.head_dim is None:
            cls.check_heads(m)
        t = cfg.trainer if cfg is not None else None
        check(
            t is None or not (t.cuda_graphs and t.precision != "bf16"),
            "trainer.cuda_graphs",
            "switchhead's expert matmuls outside bf16 run the reference, which reads group sizes "
            "on the host and so cannot be captured; use trainer.precision=bf16",
        )

    @classmethod
    def attention_params(cls, m) -> int:
        """Q and K, the V and O experts, the two selectors (no biases)."""
        hd = m.n_head * (m.head_dim or m.d_model // m.n_head)
        return 2 * m.d_model * hd * (1 + m.n_experts) + 2 * m.n_head * m.n_experts * m.d_model


def sort_by_expert(experts: Tensor, n_groups: int) -> tuple:
    """(order, inverse, offs) of assignments `experts` (A,): `order` sorts them by expert (stable),
    inverse[a] is a's place in it, offs[g] counts the assignments to experts 0..g (group ends)."""
    order = experts.argsort(stable=True)
    inverse = torch.empty_like(order).scatter_(
        0, order, torch.arange(order.numel(), device=order.device)
    )
    bounds = torch.arange(n_groups, device=experts.device, dtype=experts.dtype)
    offs = torch.searchsorted(experts[order], bounds, right=True)
    return order, inverse, offs.to(torch.int32)


class SwitchHeadAttention(nn.Module):
    PARAM_ROLES: ClassVar[dict] = {"o": RESIDUAL, "sel_v": ROUTER, "sel_o": ROUTER}
    kv_cache = None  # its StaticKV while the model decodes (models/kv_cache.py)

    def __init__(
        self,
        d_model: int,
        n_head: int,
        head_dim: int,
        n_experts: int,
        top_k: int,
        dropout: float = 0.0,
        causal: bool = True,
        attn_dropout: float | None = None,
    ):
        super().__init__()
        self.n_head, self.head_dim, self.n_experts, self.top_k = n_head, head_dim, n_experts, top_k
        groups = n_head * n_experts
        self.qk = nn.Linear(d_model, 2 * n_head * head_dim, bias=False)
        self.sel_v = nn.Linear(d_model, groups, bias=False)
        self.sel_o = nn.Linear(d_model, groups, bias=False)
        # expert h * E + e: V (d_model -> head_dim), O (head_dim -> d_model), as the released v, o
        self.v = nn.Parameter(torch.empty(groups, d_model, head_dim).normal_(0.0, 0.02))
        self.o = nn.Parameter(torch.empty(groups, head_dim, d_model).normal_(0.0, 0.02))
        attention_settings(self, dropout, attn_dropout, causal)

    @classmethod
    def from_config(cls, m, causal: bool = True) -> SwitchHeadAttention:
        head_dim = m.head_dim or m.d_model // m.n_head
        attn = cls(
            m.d_model,
            m.n_head,
            head_dim,
            m.n_experts,
            m.top_k,
            m.dropout,
            causal,
            ModelConfig.attn_p(m),
        )
        attn.rope = Rotary.of(m, head_dim)
        return attn

    def select(self, selector: nn.Linear, x: Tensor) -> tuple:
        """(gates (N, H, k) fp32, experts (N, H, k) as h * E + e): sigmoid scores from fp32 logits,
        the top-k of each head without renormalisation; the indices carry no gradient."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.reshape(-1, x.shape[-1]).float(), selector.weight.float())
        scores = logits.sigmoid().view(-1, self.n_head, self.n_experts)
        with torch.no_grad():
            chosen = scores.topk(self.top_k, dim=-1).indices
        first = torch.arange(self.n_head, device=x.device)[:, None] * self.n_experts
        return scores.gather(-1, chosen), chosen + first

    def experts(self, rows: Tensor, copies: int, w: Tensor, gates: Tensor, experts: Tensor):
        """gate x (row @ w[expert]) for each row's selections: rows (R, K), each taken `copies`
        times; gates, experts (R, copies). (R, copies, N_out); only the selected experts run."""
        order, inverse, offs = sort_by_expert(experts.flatten(), w.shape[0])
        rows = MixtureOfAttentionHeads.compute_dtype(rows)
        out = grouped_mm(gather_rows(rows, order // copies, inverse, copies), w, offs)
        out = gather_rows(out, inverse, order).view(-1, copies, out.shape[-1])
        return out * gates.unsqueeze(-1).to(out.dtype)

    def values(self, x: Tensor) -> Tensor:
        """Each source token's V heads, mixed by its own selection: (B, H, T, head_dim)."""
        b, t, d = x.shape
        h, k = self.n_head, self.top_k
        gates, experts = self.select(self.sel_v, x)
        # row n of x serves its H x k (head, slot) assignments; each head sums its own k
        v = self.experts(x.reshape(-1, d), h * k, self.v, gates.flatten(1), experts.flatten(1))
        return v.view(b, t, h, k, self.head_dim).sum(3).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None):
        """(y, None). With a cache (`self.kv_cache`, while the model decodes), the new tokens' K and
        mixed V are written and attended over."""
        if context is not None:
            raise ValueError(
                "switchhead is a self-attention (model.cross.name picks the cross-attention)"
            )
        b, t, d = x.shape
        q, k = self.qk(x).split(self.n_head * self.head_dim, dim=-1)
        q, k = rotate_qk(self, split_heads(q, self.n_head), split_heads(k, self.n_head))
        v = self.values(x)
        cache = self.kv_cache
        if cache is not None:
            u = cache.update(q, k, v)
        else:
            u = sdpa(q, k, v, mask, self.causal, self.dropout if self.training else 0.0)
        gates, experts = self.select(self.sel_o, x)
        # row (n, h) of u serves head h's k slots of token n
        heads = u.transpose(1, 2).reshape(-1, self.head_dim)
        y = self.experts(heads, self.top_k, self.o, gates.flatten(0, 1), experts.flatten(0, 1))
        y = y.view(b, t, self.n_head * self.top_k, d).sum(2)
        return self.resid_dropout(y), None

    def matmul_params_per_token(self) -> int:
        """Q, K and both selectors for every token; V and O of the k selected experts per head."""
        d, h = self.qk.in_features, self.n_head
        dense = self.qk.weight.numel() + self.sel_v.weight.numel() + self.sel_o.weight.numel()
        return dense + 2 * self.top_k * h * d * self.head_dim

    # 6 x matmul parameters + 12 x (query heads x head_dim x T), as MHA counts them
    flops_per_token = MultiHeadAttention.flops_per_token

    def kv_layout(self) -> tuple:
        """(heads cached, head_dim): each token's K and its expert-mixed V, per head."""
        return self.n_head, self.head_dim

    def kv_cache_elems_per_token(self) -> int:
        return 2 * self.n_head * self.head_dim
