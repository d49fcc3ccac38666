"""Mixture of Attention Schemes (MoAS): an MHA, a GQA and an MQA branch, each with its own Q, K, V
and O, mixed by a constant 1/3 (static) or per token by a router (dynamic).

Fused layout (the default): the three branches' Q/K/V weights are rows of one `c_attn` matmul, their
3*n_head query heads go through ONE SDPA call (each branch's K/V heads repeated for its query
heads), and their output projections are the column blocks of one `c_proj` matmul whose input is the
gate-scaled concatenation of branch outputs:
    y = sum_b g_b * (o_b @ W_b^T + c_b)
      = concat_b(g_b * o_b) @ [W_mha | W_gqa | W_mqa]^T + g @ [c_mha; c_gqa; c_mqa].
Parameter counts equal three separate branches exactly. `fused=False` runs the same parameters
branch by branch (the plain path the fused one is tested against).

Residual dropout (`resid_dropout`):
- `mixed` (the default): one dropout on y after the mix, as MHA has.
- `per_branch` (the MoAS paper's released code, compare_moas.py: each branch ends in its own c_proj
  and dropout): each branch's projected output, bias included, is dropped out on its own before the
  gates mix them,
      y = sum_b g_b * dropout(o_b @ W_b^T + c_b),
  so an element of y is zero only where all three branches dropped it (p^3, against p for `mixed`).
  While training with dropout > 0 the fused path computes the three projections as one batched
  matmul over the branches into a (3, B, T, d) tensor, drops it out in one call and takes the
  gate-weighted sum (the plain path stacks its branch outputs in the same layout, so both draw the
  same mask). Where dropout is inactive (eval, or dropout 0) the two modes are the same function and
  run the fused layout above at the same cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor

from moa_train.models.attention.mha import attention_settings, merge_heads, sdpa, split_heads
from moa_train.models.kv_cache import cached_sdpa
from moa_train.models.roles import NO_DECAY, RESIDUAL, ROUTER
from moa_train.models.rope import Rotary, rotate_qk
from moa_train.models.routing import Routing
from moa_train.schema import ModelConfig
from moa_train.validation import check, divisors, one_of, positive_or_null

BRANCHES = ("mha", "gqa", "mqa")
RESID_DROPOUT = ("mixed", "per_branch")


def check_gqa_heads(m) -> None:
    """model.n_head divides model.d_model, and model.gqa_kv_heads divides model.n_head (moas_*)."""
    ModelConfig.check_heads(m)
    check(
        m.gqa_kv_heads > 0 and m.n_head % m.gqa_kv_heads == 0,
        "model.gqa_kv_heads",
        f"{m.gqa_kv_heads} does not divide model.n_head={m.n_head}; valid: {divisors(m.n_head)}",
    )


@dataclass
class MoASStaticConfig(ModelConfig):
    """moas_static: the three branches mixed by a constant 1/3."""

    gqa_kv_heads: int = 2  # K/V heads of the GQA branch, dividing n_head
    # one QKV matmul, one SDPA call and one output matmul for all branches (same parameters)
    fused: bool = True
    # mixed: one residual dropout after the gates mix the branches | per_branch: each branch's
    # projected output dropped out on its own before the mix (the MoAS paper's released code)
    resid_dropout: str = "mixed"

    dynamic: ClassVar[bool] = False  # true: a router mixes the branches per token (else 1/3 each)
    cross_attention_ok: ClassVar[bool] = False  # the branches mix self-attention schemes
    cross_default: ClassVar[str | None] = "mha"

    @classmethod
    def validate(cls, m, cfg) -> None:
        super().validate(m, cfg)
        check_gqa_heads(m)
        one_of(m.resid_dropout, "model.resid_dropout", RESID_DROPOUT)

    @classmethod
    def attention_params(cls, m) -> int:
        """c_attn (the three branches' Q, K and V), c_proj and the output biases of MoASAttention;
        the dynamic variant's router too."""
        d, head_dim = m.d_model, m.d_model // m.n_head
        kv = (m.n_head + m.gqa_kv_heads + 1) * head_dim
        params = (d + m.bias) * (3 * d + 2 * kv) + 3 * d * d + 3 * d * m.bias
        if cls.dynamic:
            hidden = m.router_hidden or d // 4
            params += (d + m.bias) * hidden + (hidden + m.bias) * len(BRANCHES)
        return params


@dataclass
class MoASDynamicConfig(MoASStaticConfig):
    """moas_dynamic: the branches mixed per token by a router."""

    router_hidden: int | None = None  # hidden width of the router; null = d_model // 4
    gate_dropout: float = 0.0  # dropout on the router's gates after softmax (MoAS paper: 0.1)
    # soft: inference mixes the branches as training does | top1: at inference (eval forward, cached
    # decoding) only the router's argmax branch, gate 1.0; training is always soft
    inference_routing: str = "soft"

    dynamic: ClassVar[bool] = True

    @classmethod
    def validate(cls, m, cfg) -> None:
        super().validate(m, cfg)
        positive_or_null(m.router_hidden, "model.router_hidden")
        check(
            0.0 <= m.gate_dropout < 1.0,
            "model.gate_dropout",
            f"must be in [0, 1), got {m.gate_dropout}",
        )
        one_of(m.inference_routing, "model.inference_routing", ("soft", "top1"))


class MoASAttention(nn.Module):
    PARAM_ROLES: ClassVar[dict] = {
        "router": ROUTER,
        "c_proj.weight": RESIDUAL,
        "c_attn.bias": NO_DECAY,
        "router.0.bias": NO_DECAY,
        "router.2.bias": NO_DECAY,
        # three 1-D biases stacked, (3, d): no decay, as the MoAS code decays no bias
        "o_bias": NO_DECAY,
    }
    # the inference_routing values moa-generate can choose for a module with a router (moas_dynamic)
    INFERENCE_ROUTINGS: ClassVar[tuple] = ("soft", "top1")
    kv_cache = None  # its LayerCache while the model decodes (models/kv_cache.py)

    def __init__(
        self,
        d_model: int,
        n_head: int,
        gqa_kv_heads: int = 2,
        dropout: float = 0.0,
        bias: bool = False,
        dynamic: bool = True,
        router_hidden: int | None = None,
        gate_dropout: float = 0.0,
        fused: bool = True,
        causal: bool = True,
        resid_dropout: str = "mixed",
        attn_dropout: float | None = None,
        inference_routing: str = "soft",
    ):
        super().__init__()
        self.n_head, self.head_dim, self.d_model = n_head, d_model // n_head, d_model
        self.kv_heads = (n_head, gqa_kv_heads, 1)
        self.inference_routing = inference_routing
        kv_total = sum(self.kv_heads) * self.head_dim
        # rows: [q_mha q_gqa q_mqa | k_mha k_gqa k_mqa | v_mha v_gqa v_mqa]
        self.c_attn = nn.Linear(d_model, 3 * d_model + 2 * kv_total, bias=bias)
        # columns: [o_mha | o_gqa | o_mqa]; each branch's output bias is mixed by the gates like its
        # output
        self.c_proj = nn.Linear(3 * d_model, d_model, bias=False)
        self.o_bias = nn.Parameter(torch.zeros(3, d_model)) if bias else None
        self.dynamic, self.fused = dynamic, fused
        attention_settings(self, dropout, attn_dropout, causal)
        self.gate_dropout = gate_dropout
        self.per_branch = resid_dropout == "per_branch"
        if dynamic:
            hidden = router_hidden or d_model // 4
            self.router = nn.Sequential(
                nn.Linear(d_model, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, 3, bias=bias)
            )

    @classmethod
    def from_config(cls, m, causal: bool = True) -> MoASAttention:
        dynamic = OmegaConf.get_type(m).dynamic
        # the router's keys belong to moas_dynamic only
        router = (
            {
                "router_hidden": m.router_hidden,
                "gate_dropout": m.gate_dropout,
                "inference_routing": m.inference_routing,
            }
            if dynamic
            else {}
        )
        attn = cls(
            m.d_model,
            m.n_head,
            m.gqa_kv_heads,
            m.dropout,
            m.bias,
            dynamic,
            fused=m.fused,
            causal=causal,
            resid_dropout=m.resid_dropout,
            attn_dropout=ModelConfig.attn_p(m),
            **router,
        )
        attn.rope = Rotary.of(m, attn.head_dim)
        return attn

    def gates(self, x: Tensor, top1: bool = False) -> tuple:
        """(gates used for mixing (B, T, 3), Routing or None); top1: the one-hot of the router's
        argmax."""
        b, t, _ = x.shape
        if not self.dynamic:
            return x.new_full((b, t, 3), 1.0 / 3), None
        hidden, out, pad = self.router[:2](x), self.router[2], 8 - len(BRANCHES)
        # the 3 logit columns padded to 8: a 3-wide bf16 GEMM is misaligned and cuBLAS falls back to
        # a slow kernel (0.45 of 2.6 ms per Table 1 step, docs/results/bench.md); the padding rows
        # are zeros and get no update
        bias = None if out.bias is None else F.pad(out.bias, (0, pad))
        logits = F.linear(hidden, F.pad(out.weight, (0, 0, 0, pad)), bias)[
            ..., : len(BRANCHES)
        ].float()
        probs = logits.softmax(-1)
        routing = Routing(probs.view(-1, 3), BRANCHES, None, logits.view(-1, 3))
        if top1:
            gates = F.one_hot(probs.argmax(-1), len(BRANCHES)).to(probs.dtype)
        else:
            gates = (
                F.dropout(probs, self.gate_dropout, self.training) if self.gate_dropout else probs
            )
        return gates.to(x.dtype), routing

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None):
        """(y, Routing or None). With a cache (`self.kv_cache`, while the model decodes): see
        `through_cache`."""
        if context is not None:
            raise NotImplementedError(
                "MoAS is a self-attention scheme; use mha or moa for cross-attention"
            )
        if self.kv_cache is not None:
            return self.through_cache(x, self.kv_cache)
        gates, routing = self.gates(x, top1=self.inference_routing == "top1" and not self.training)
        p = self.dropout if self.training else 0.0
        per_branch = self.per_branch and self.training and self.resid_dropout.p > 0
        if self.fused:

            def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                q, k = rotate_qk(self, q, k)
                return sdpa(q, self.repeat_kv(k), self.repeat_kv(v), mask, self.causal, p)

            out = self.fused_mix(x, gates, attend, per_branch)
        else:
            out = self.plain_mix(x, gates, mask, p, per_branch)
        if per_branch:
            return self.mix_per_branch(out, gates), routing
        return self.resid_dropout(self.add_bias(out, gates)), routing

    def fused_mix(self, x: Tensor, gates: Tensor, attend, per_branch: bool) -> Tensor:
        """The fused layout: `attend(q, k, v)` takes the 3 n_head query heads and the branches'
        sum(kv_heads) K/V heads. Returns the gate-mixed projection without output bias (B, T, d), or
        with per_branch the branch projections (3, B, T, d)."""
        d, n_kv = self.d_model, sum(self.kv_heads)
        q, k, v = self.c_attn(x).split([3 * d, n_kv * self.head_dim, n_kv * self.head_dim], dim=-1)
        o = merge_heads(
            attend(split_heads(q, 3 * self.n_head), split_heads(k, n_kv), split_heads(v, n_kv))
        )
        o = o.view(*o.shape[:2], 3, d)  # (B, T, 3, d) = [o_mha | o_gqa | o_mqa]
        if per_branch:  # branch b's o_b @ W_b^T: one batched matmul over the branches, (3, B*T, d)
            outs = torch.bmm(
                o.flatten(0, 1).transpose(0, 1), self.c_proj.weight.view(d, 3, d).permute(1, 2, 0)
            )
            return outs.view(3, *o.shape[:2], d)
        return self.c_proj((o * gates.unsqueeze(-1)).flatten(2))

    def plain_mix(
        self, x: Tensor, gates: Tensor, mask: Tensor | None, p: float, per_branch: bool
    ) -> Tensor:
        """`fused_mix`, branch by branch (fused=false)."""
        d, kv = self.d_model, [n * self.head_dim for n in self.kv_heads]
        q, k, v = self.c_attn(x).split([3 * d, sum(kv), sum(kv)], dim=-1)
        qs, ks, vs = q.split(d, -1), k.split(kv, -1), v.split(kv, -1)
        ws = self.c_proj.weight.split(d, dim=1)
        outs = []
        for i, n_kv in enumerate(self.kv_heads):
            q_i, k_i = rotate_qk(self, split_heads(qs[i], self.n_head), split_heads(ks[i], n_kv))
            o = sdpa(q_i, k_i, split_heads(vs[i], n_kv), mask, self.causal, p)
            outs.append(F.linear(merge_heads(o), ws[i]))
        if per_branch:
            return torch.stack(outs)
        return sum(gates[..., i : i + 1] * out for i, out in enumerate(outs))

    def add_bias(self, y: Tensor, gates: Tensor) -> Tensor:
        """y + each branch's output bias mixed by the gates."""
        return y if self.o_bias is None else y + gates @ self.o_bias.to(y.dtype)

    def through_cache(self, x: Tensor, cache) -> tuple:
        """Through the cache (a StaticKV), fused layout whatever `fused` says (same parameters). The
        cache holds EVERY branch's K/V: n_head + gqa_kv_heads + 1 heads per token and layer, since a
        later token, routed to any branch, reads every earlier token's K/V of that branch.

        soft: exactly the trained computation (static: 1/3 each). top1 (moas_dynamic,
        model.inference_routing): the router's argmax branch alone with gate 1.0, not its
        probability, so a one-hot router gives soft's result. A one-token step (decode) then runs
        only that branch's query rows and its output block, and attends with its n_head query heads
        (against each branch's cache heads, keeping its own branch's result): it saves the Q and O
        projections (FLOPs and weight reads) of 2 of the 3 branches. It does not save the K/V
        projections of all branches nor the cache of n_head + gqa_kv_heads + 1 heads: every token
        still writes every branch's K/V. Prefill (T > 1) computes all branches and mixes them with
        the one-hot gates (same result)."""
        top1 = self.inference_routing == "top1"
        if top1 and x.shape[1] == 1:
            return self.decode_top1(x, cache)
        gates, routing = self.gates(x, top1)

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            q, k = rotate_qk(self, q, k)
            positions = cache.write(k, v)
            qs = q.split(self.n_head, dim=1)
            return torch.cat(self.branch_attention(qs, cache, positions), dim=1)

        return self.add_bias(self.fused_mix(x, gates, attend, per_branch=False), gates), routing

    def branch_attention(self, qs, cache, positions: Tensor) -> list:
        """Per branch, its n_head query heads (qs[b]: (B, n_head, T, D)) against its own cache
        heads, GQA done by SDPA: expanding the cache to 3 n_head heads first (repeat_kv) copied all
        of it at every decode step (docs/results/inference.md)."""
        ks, vs = cache.k.split(self.kv_heads, dim=1), cache.v.split(self.kv_heads, dim=1)
        span = cache.state.span
        return [cached_sdpa(q, k, v, positions, span) for q, k, v in zip(qs, ks, vs, strict=True)]

    def decode_top1(self, x: Tensor, cache) -> tuple:
        """One token per row (x (B, 1, d)), top1: see `through_cache`. Per row, the chosen branch's
        W_q block and W_o block are gathered ((B, d, d) each: only the chosen branch's weights are
        read)."""
        b, d, h, dh, n_kv = x.shape[0], self.d_model, self.n_head, self.head_dim, sum(self.kv_heads)
        _, routing = self.gates(x)
        c = routing.probs.argmax(-1)  # (B,) the chosen branch
        w, bias, xs = self.c_attn.weight, self.c_attn.bias, x[:, 0]
        k, v = F.linear(xs, w[3 * d :], None if bias is None else bias[3 * d :]).split(
            n_kv * dh, dim=-1
        )
        q = torch.bmm(w[: 3 * d].view(3, d, d)[c], xs.unsqueeze(-1)).squeeze(-1)
        if bias is not None:
            q = q + bias[: 3 * d].view(3, d)[c]
        # each row's query against every branch's cache heads, the chosen branch's output kept: this
        # reads the n_head + gqa_kv_heads + 1 cached heads once, where gathering each row's branch
        # heads (expanded to n_head) copied the cache first and read more in all
        q, k = rotate_qk(self, q.view(b, h, 1, dh), k.view(b, n_kv, 1, dh))
        positions = cache.write(k, v.view(b, n_kv, 1, dh))
        # (3, B, n_head, 1, D)
        outs = torch.stack(self.branch_attention((q, q, q), cache, positions))
        o = outs[c, torch.arange(b, device=x.device)]
        # (B, d, d): the branch's output block
        w_o = self.c_proj.weight.view(d, 3, d).transpose(0, 1)[c]
        y = torch.bmm(w_o, o.reshape(b, d, 1)).squeeze(-1)
        if self.o_bias is not None:
            y = y + self.o_bias[c]
        return y.unsqueeze(1), routing

    def mix_per_branch(self, outs: Tensor, gates: Tensor) -> Tensor:
        """resid_dropout=per_branch while training: branch outputs (3, B, T, d) -> sum_b g_b *
        dropout(out_b + c_b). One dropout call over the contiguous (3, B, T, d) tensor: the fused
        and the plain path draw the same mask."""
        if self.o_bias is not None:
            outs = outs + self.o_bias.to(outs.dtype)[:, None, None]
        return (self.resid_dropout(outs) * gates.permute(2, 0, 1).unsqueeze(-1)).sum(0)

    def repeat_kv(self, x: Tensor) -> Tensor:
        """(B, sum of K/V heads, T, D) -> (B, 3 n_head, T, D): query head h of branch b reads that
        branch's K/V head h // (n_head / kv_b). Built by expand + reshape per branch, whose backward
        is a sum over the copies; an index_select would do the same forward but scatter-add
        (atomics) in its backward: a sixth of a GPT-2-size step when measured
        (docs/results/bench.md)."""
        b, _, t, d = x.shape
        parts = [
            part.unsqueeze(2).expand(b, kv, self.n_head // kv, t, d).reshape(b, self.n_head, t, d)
            for part, kv in zip(x.split(self.kv_heads, dim=1), self.kv_heads, strict=True)
        ]
        return torch.cat(parts, dim=1)

    def matmul_params_per_token(self) -> int:
        router = (
            self.router[0].weight.numel() + self.router[2].weight.numel() if self.dynamic else 0
        )
        return self.c_attn.weight.numel() + self.c_proj.weight.numel() + router

    def flops_per_token(self, seq_len: int) -> int:
        return 6 * self.matmul_params_per_token() + 12 * 3 * self.n_head * self.head_dim * seq_len

    def kv_layout(self) -> tuple:
        """(K/V heads cached, head_dim): every branch's, n_head + gqa_kv_heads + 1 (see
        `through_cache`)."""
        return sum(self.kv_heads), self.head_dim

    def kv_cache_elems_per_token(self) -> int:
        return 2 * sum(self.kv_heads) * self.head_dim
