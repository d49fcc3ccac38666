"""Mixture of Attention Heads (MoA, Zhang et al. 2022): each token picks k of E experts; an expert
is a query projection and an output projection of n_kv_heads x head_dim; K and V are shared by all
experts (n_kv_heads groups, default 1, as in the released code). The k selected query heads of every
token attend in one SDPA call.

Gating: `softmax_all` (released code) takes the top-k of a softmax over all E and does not
renormalise; `topk_softmax` renormalises over the k selected. The router starts at zero (uniform),
as in the released code.

Expert projections (`expert_matmul`):
- `dense` computes all E experts' queries in one matmul and gathers the k selected; the output side
  scatters the gated heads into an E-slot buffer and applies all experts' O in one matmul. Exact,
  and fast when k is close to E.
- `grouped` sorts the N*k (token, expert) assignments by expert and runs Q and O as grouped matmuls
  over the sorted rows (models/attention/grouped.py): no Python loop over experts and no compute for
  unselected experts.
- `auto` (default) takes `grouped` when k < E and the grouped kernel runs (bf16 on an H100-class
  GPU), else `dense`.
The FLOP counter counts only the k selected experts, whichever path runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from moa_train.models.attention.grouped import gather_rows, grouped_kernel_available, grouped_mm
from moa_train.models.attention.mha import attention_settings, sdpa, split_heads
from moa_train.models.roles import NO_DECAY, RESIDUAL, ROUTER
from moa_train.models.rope import Rotary, rotate_qk
from moa_train.models.routing import Routing
from moa_train.schema import ModelConfig
from moa_train.validation import check, check_experts, one_of, positive_or_null


@dataclass
class MoAConfig(ModelConfig):
    """moa: each token picks top_k of n_experts attention heads."""

    n_experts: int = 8  # E
    top_k: int = 2  # k experts per token, 1..E
    head_dim: int | None = None  # expert head size; null = d_model // n_head
    n_kv_heads: int | None = None  # shared K/V groups; null = 1, as in the released MoA code
    # softmax_all (released MoA code) | topk_softmax (renormalised over the k)
    gating: str = "softmax_all"
    # dense (all E experts, gather) | grouped (sorted by expert, selected only) | auto
    expert_matmul: str = "auto"
    # biases of the expert Q/O and shared K/V; null = model.bias (MoA code: none)
    proj_bias: bool | None = None

    @classmethod
    def validate(cls, m, cfg) -> None:
        super().validate(m, cfg)
        check_experts(m)
        one_of(m.gating, "model.gating", ("softmax_all", "topk_softmax"))
        one_of(m.expert_matmul, "model.expert_matmul", ("auto", "dense", "grouped"))
        t = cfg.trainer
        check(
            not (m.expert_matmul == "grouped" and t.cuda_graphs and t.precision != "bf16"),
            "model.expert_matmul",
            "grouped in fp32 runs the reference, which reads group sizes on the host and so cannot "
            "be captured (trainer.cuda_graphs=true); use auto, dense, or trainer.precision=bf16",
        )
        if m.head_dim is None:
            check(
                m.d_model % m.n_head == 0,
                "model.head_dim",
                f"null needs model.n_head={m.n_head} to divide model.d_model={m.d_model}; set "
                "model.head_dim",
            )
        positive_or_null(m.head_dim, "model.head_dim")
        positive_or_null(m.n_kv_heads, "model.n_kv_heads")

    @classmethod
    def attention_params(cls, m) -> int:
        """The router, each expert's Q and O, the shared K/V of MixtureOfAttentionHeads."""
        expert_dim = (m.n_kv_heads or 1) * (m.head_dim or m.d_model // m.n_head)
        bias = m.bias if m.proj_bias is None else m.proj_bias
        experts = m.n_experts * expert_dim
        return (
            m.d_model * m.n_experts
            + (m.d_model + bias) * (experts + 2 * expert_dim)
            + (experts + bias) * m.d_model
        )


class MixtureOfAttentionHeads(nn.Module):
    PARAM_ROLES: ClassVar[dict] = {
        "router": ROUTER,
        "c_proj.weight": RESIDUAL,
        "q_proj.bias": NO_DECAY,
        "kv_proj.bias": NO_DECAY,
        "c_proj.bias": NO_DECAY,
    }
    kv_cache = None  # its LayerCache while the model decodes (models/kv_cache.py)

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        head_dim: int,
        n_kv_heads: int | None = None,
        gating: str = "softmax_all",
        expert_matmul: str = "auto",
        dropout: float = 0.0,
        bias: bool = False,
        causal: bool = True,
        attn_dropout: float | None = None,
    ):
        super().__init__()
        self.n_experts, self.top_k, self.head_dim = n_experts, top_k, head_dim
        self.n_kv = n_kv_heads or 1
        self.expert_dim = self.n_kv * head_dim  # one query head per K/V group per expert
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.q_proj = nn.Linear(d_model, n_experts * self.expert_dim, bias=bias)
        self.kv_proj = nn.Linear(d_model, 2 * self.expert_dim, bias=bias)
        self.c_proj = nn.Linear(n_experts * self.expert_dim, d_model, bias=bias)
        self.gating, self.expert_matmul = gating, expert_matmul
        attention_settings(self, dropout, attn_dropout, causal)
        self.choice_names = tuple(str(i) for i in range(n_experts))

    @classmethod
    def from_config(cls, m, causal: bool = True) -> MixtureOfAttentionHeads:
        head_dim = m.head_dim or m.d_model // m.n_head
        bias = m.bias if m.proj_bias is None else m.proj_bias
        attn = cls(
            m.d_model,
            m.n_experts,
            m.top_k,
            head_dim,
            m.n_kv_heads,
            m.gating,
            m.expert_matmul,
            m.dropout,
            bias,
            causal,
            ModelConfig.attn_p(m),
        )
        attn.rope = Rotary.of(m, head_dim)
        return attn

    def post_init(self) -> None:
        nn.init.zeros_(self.router.weight)

    @torch.no_grad()
    def init_fairseq(self) -> None:
        """The released MoA layer's init (model.init=fairseq): each expert's Q (d -> n_kv*head_dim)
        and O (n_kv*head_dim -> d) Xavier-uniform over that expert's own matrix (not over all E
        experts' rows at once: the bound then follows d + head_dim, as in its per-expert parameter
        tensor); the shared K and V each Xavier-uniform with gain 1/sqrt(2), as fairseq's attention
        does; biases (the released layer has none) zero. The router stays at zero (post_init)."""
        e, ed = self.n_experts, self.expert_dim
        for i in range(e):
            nn.init.xavier_uniform_(self.q_proj.weight[i * ed : (i + 1) * ed])
            nn.init.xavier_uniform_(self.c_proj.weight[:, i * ed : (i + 1) * ed])
        for block in self.kv_proj.weight.split(ed):
            nn.init.xavier_uniform_(block, gain=2**-0.5)
        for layer in (self.q_proj, self.kv_proj, self.c_proj):
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

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

    def grouped(self, x: Tensor) -> bool:
        """Whether this call runs the grouped path (see the module docstring)."""
        if self.expert_matmul == "auto":
            dtype = (
                torch.get_autocast_dtype(x.device.type)
                if torch.is_autocast_enabled(x.device.type)
                else x.dtype
            )
            # (k = E never sorts: forward passes chosen=None)
            return grouped_kernel_available(x.device, dtype)
        return self.expert_matmul == "grouped"

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None):
        """(y, Routing). With a cache (`self.kv_cache`, while the model decodes): self-attention
        writes the new tokens' shared K/V (n_kv_heads heads of head_dim, whatever the experts) and
        attends over the cache; cross-attention computes the context's K/V at the first step and
        reuses them. Decoding routes each token top-k as training does, on the dense expert path."""
        cache, kv = self.kv_cache, None
        if cache is not None and context is None:
            attend = cache.update
        else:
            causal = self.causal and context is None
            p = self.dropout if self.training else 0.0

            def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                return sdpa(q, k, v, mask, causal, p)

            if cache is not None:
                kv = cache.fill(lambda: self.cross_kv(context))
        if context is None and self.rope is not None:
            unrotated = attend

            def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                return unrotated(*rotate_qk(self, q, k), v)

        source = x if context is None else context
        y, routing = self.mix(x, source, attend, cache is None and self.grouped(x), kv)
        return self.resid_dropout(y), routing

    def cross_kv(self, context: Tensor) -> tuple:
        """The shared K, V of a context (B, S, d) as heads (B, n_kv, S, head_dim)."""
        k, v = self.kv_proj(context).split(self.expert_dim, dim=-1)
        return split_heads(k, self.n_kv), split_heads(v, self.n_kv)

    def mix(
        self, x: Tensor, source: Tensor | None, attend, grouped: bool, kv: tuple | None = None
    ) -> tuple:
        """(y before residual dropout (B, T, d), Routing): the routed queries of x attend
        (`attend(q, k, v)` on heads) to the shared K/V of `source` (or the heads `kv` given, from
        `cross_kv`); the gated expert outputs summed."""
        b, t, _ = x.shape
        e, k, g, dh = self.n_experts, self.top_k, self.n_kv, self.head_dim
        gates, chosen, routing = self.route(x)
        # every expert selected: take them in expert order, so no gather and no scatter is needed
        if k == e:
            # either gating gives expert i its probability when k = E
            gates, chosen = routing.probs, None
        sort = self.sorted_by_expert(chosen) if chosen is not None and grouped else None
        # queries of the selected experts (B*T, k, g*dh), then heads ordered group-major (B, g*k, T,
        # dh)
        q = (
            self.dense_queries(x, chosen)
            if sort is None
            else self.grouped_queries(x, chosen, *sort)
        )
        q = q.view(b, t, k, g, dh).permute(0, 3, 2, 1, 4).reshape(b, g * k, t, dh)
        o = attend(q, *(self.cross_kv(source) if kv is None else kv))
        o = o.view(b, g, k, t, dh).permute(0, 3, 2, 1, 4).reshape(b * t, k, self.expert_dim)
        o = o * gates.to(o.dtype).unsqueeze(-1)
        y = self.dense_output(o, chosen) if sort is None else self.grouped_output(o, *sort)
        return y.view(b, t, y.shape[-1]), routing

    def dense_queries(self, x: Tensor, chosen: Tensor | None) -> Tensor:
        q_all = self.q_proj(x).view(-1, self.n_experts, self.expert_dim)
        return (
            q_all
            if chosen is None
            else q_all.gather(1, chosen.unsqueeze(-1).expand(-1, -1, self.expert_dim))
        )

    def dense_output(self, o: Tensor, chosen: Tensor | None) -> Tensor:
        if chosen is not None:
            o = o.new_zeros(o.shape[0], self.n_experts, self.expert_dim).scatter(
                1, chosen.unsqueeze(-1).expand_as(o), o
            )
        return self.c_proj(o.flatten(1))

    def sorted_by_expert(self, chosen: Tensor) -> tuple:
        """(order, inverse, offs): assignment a = token * k + slot; `order` lists the assignments
        sorted by expert, inverse[a] is a's place in that list, and offs[i] counts the assignments
        to experts 0..i (the grouped matmul's group ends). Fixed shapes and no host sync, so it
        compiles and graph-captures."""
        experts = chosen.flatten()
        # 8-bit keys where they fit: a radix sort makes one pass per key byte (8 for int64 indices)
        keys = experts.to(torch.uint8) if self.n_experts <= 256 else experts.to(torch.int32)
        order = keys.argsort(stable=True)
        inverse = torch.empty_like(order).scatter_(
            0, order, torch.arange(order.numel(), device=order.device)
        )
        offs = torch.searchsorted(
            keys[order],
            torch.arange(self.n_experts, device=chosen.device, dtype=keys.dtype),
            right=True,
        )
        return order, inverse, offs.to(torch.int32)

    def grouped_queries(
        self, x: Tensor, chosen: Tensor, order: Tensor, inverse: Tensor, offs: Tensor
    ) -> Tensor:
        d, e, ed = x.shape[-1], self.n_experts, self.expert_dim
        # each token k times, cast first (grouped_mm is not an autocast op): k copies in bf16, not
        # in fp32
        x_sorted = gather_rows(
            self.compute_dtype(x).reshape(-1, d), order // self.top_k, inverse, self.top_k
        )
        w_q = self.q_proj.weight.view(e, ed, d).transpose(1, 2)  # (E, d, ed): each expert's W_q^T
        q_sorted = grouped_mm(x_sorted, w_q, offs)
        # back to (token, slot) order
        q = gather_rows(q_sorted, inverse, order).view(-1, self.top_k, ed)
        if self.q_proj.bias is not None:
            q = q + self.q_proj.bias.view(e, ed)[chosen].to(q.dtype)
        return q

    def grouped_output(self, o: Tensor, order: Tensor, inverse: Tensor, offs: Tensor) -> Tensor:
        d, e, ed = self.c_proj.out_features, self.n_experts, self.expert_dim
        w_o = self.c_proj.weight.view(d, e, ed).permute(1, 2, 0)  # (E, ed, d): each expert's W_o^T
        y_sorted = grouped_mm(gather_rows(o.flatten(0, 1), order, inverse), w_o, offs)
        # back to (token, slot) order and summed over the k slots (fp32 accumulation, deterministic)
        y = gather_rows(y_sorted, inverse, order).view(-1, self.top_k, d).sum(1)
        return y if self.c_proj.bias is None else y + self.c_proj.bias.to(y.dtype)

    @staticmethod
    def compute_dtype(x: Tensor) -> Tensor:
        """`x` in autocast's dtype where autocast is on (grouped_mm is not an autocast op)."""
        if torch.is_autocast_enabled(x.device.type):
            return x.to(torch.get_autocast_dtype(x.device.type))
        return x

    def matmul_params_per_token(self) -> int:
        """Router and shared K/V for every token; Q and O of the k selected experts only."""
        d = self.router.in_features
        return d * self.n_experts + 2 * d * self.expert_dim + 2 * self.top_k * d * self.expert_dim

    def flops_per_token(self, seq_len: int) -> int:
        return (
            6 * self.matmul_params_per_token()
            + 12 * self.top_k * self.n_kv * self.head_dim * seq_len
        )

    def kv_layout(self) -> tuple:
        """(K/V heads cached, head_dim): the shared n_kv_heads groups, whatever the number of
        experts."""
        return self.n_kv, self.head_dim

    def kv_cache_elems_per_token(self) -> int:
        return 2 * self.expert_dim
