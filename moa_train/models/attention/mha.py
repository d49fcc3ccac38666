"""Multi-head attention with n_kv_heads K/V heads: MHA (n_kv_heads = n_head), GQA (1 < n_kv_heads <
n_head), MQA (1).

Grouped K/V go to SDPA with `enable_gqa`, so repeated K/V heads are never materialised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from moa_train.models.roles import NO_DECAY, RESIDUAL
from moa_train.models.rope import Rotary, rotate_qk
from moa_train.schema import ModelConfig
from moa_train.validation import check, divisors


@dataclass
class MHAConfig(ModelConfig):
    """mha, gqa and mqa: the same module, told apart by n_kv_heads."""

    # K/V heads, dividing n_head: null = n_head (mha); gqa: 2; mqa: 1
    n_kv_heads: int | None = None

    @classmethod
    def validate(cls, m, cfg) -> None:
        super().validate(m, cfg)
        cls.check_heads(m)
        kv = m.n_kv_heads
        check(
            kv is None or (kv > 0 and m.n_head % kv == 0),
            "model.n_kv_heads",
            f"{kv} does not divide model.n_head={m.n_head}; valid: {divisors(m.n_head)}",
        )

    @classmethod
    def attention_params(cls, m) -> int:
        """c_attn (Q and the K/V heads) and c_proj of MultiHeadAttention."""
        head_dim = m.d_model // m.n_head
        qkv = (m.n_head + 2 * (m.n_kv_heads or m.n_head)) * head_dim
        out = m.n_head * head_dim
        return (m.d_model + m.bias) * qkv + (out + m.bias) * m.d_model


def attention_mask(mask: Tensor | None, causal: bool, t_q: int, t_k: int, device) -> tuple:
    """SDPA (attn_mask, is_causal) from a key-padding mask (B, S; True = real token) and
    causality."""
    if mask is None:
        return None, causal
    keep = mask[:, None, None, :]  # (B, 1, 1, S)
    if causal:
        keep = keep & torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril()
    return keep, False


def sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, dropout: float
) -> Tensor:
    """q (B, Hq, T, D), k/v (B, Hkv, S, D) with Hkv dividing Hq; query head h reads K/V head h //
    (Hq/Hkv)."""
    attn_mask, is_causal = attention_mask(mask, causal, q.shape[2], k.shape[2], q.device)
    # enable_gqa as a plain bool: under dynamic shapes (a recompiled decode step) it is a SymBool,
    # refused
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=attn_mask,
        dropout_p=dropout,
        is_causal=is_causal,
        enable_gqa=bool(k.shape[1] != q.shape[1]),
    )


def split_heads(x: Tensor, n: int) -> Tensor:
    """(B, T, n*D) -> (B, n, T, D); D spelt out, since view cannot infer it for B = 0 (a
    data-parallel rank can get no sentence pair of a small translation batch)."""
    b, t, c = x.shape
    return x.view(b, t, n, c // n).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, n, T, D) -> (B, T, n*D)."""
    b, n, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, n * d)


def attention_settings(module: nn.Module, dropout: float, attn_dropout, causal: bool) -> None:
    """What every attention module here holds: `dropout`, the attention-probability dropout
    (`attn_dropout`, or `dropout` where that is None); `causal`; `resid_dropout` on its output;
    and `rope`, its Rotary with model.positions=rope (models/rope.py), None until from_config
    sets it."""
    module.dropout = dropout if attn_dropout is None else attn_dropout
    module.causal = causal
    module.resid_dropout = nn.Dropout(dropout)
    module.rope = None


class MultiHeadAttention(nn.Module):
    """One module for MHA, GQA and MQA. Self-attention projects Q, K, V in one matmul;
    cross-attention (context given) applies the same weights' Q rows to x and K/V rows to the
    context."""

    PARAM_ROLES: ClassVar[dict] = {
        "c_proj.weight": RESIDUAL,
        "c_attn.bias": NO_DECAY,
        "c_proj.bias": NO_DECAY,
    }
    kv_cache = None  # its LayerCache while the model decodes (models/kv_cache.py)

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_heads: int | None = None,
        dropout: float = 0.0,
        bias: bool = False,
        causal: bool = True,
        attn_dropout: float | None = None,
    ):
        super().__init__()
        self.n_head, self.n_kv = n_head, n_kv_heads or n_head
        self.head_dim = d_model // n_head
        self.q_size = n_head * self.head_dim
        self.c_attn = nn.Linear(d_model, self.q_size + 2 * self.n_kv * self.head_dim, bias=bias)
        self.c_proj = nn.Linear(self.q_size, d_model, bias=bias)
        attention_settings(self, dropout, attn_dropout, causal)

    @classmethod
    def from_config(cls, m, causal: bool = True) -> MultiHeadAttention:
        attn = cls(
            m.d_model, m.n_head, m.n_kv_heads, m.dropout, m.bias, causal, ModelConfig.attn_p(m)
        )
        attn.rope = Rotary.of(m, attn.head_dim)
        return attn

    @torch.no_grad()
    def init_fairseq(self) -> None:
        """fairseq's MultiheadAttention init (model.init=fairseq): Q, K and V each Xavier-uniform
        with gain 1/sqrt(2) over its own rows (fairseq has separate q/k/v projections; a GQA/MQA K
        or V block is Xavier over its own, smaller, shape), their biases PyTorch's Linear default
        U(+-1/sqrt(d)); the output projection Xavier-uniform with gain 1 and a zero bias."""
        kv = self.n_kv * self.head_dim
        for block in self.c_attn.weight.split([self.q_size, kv, kv]):
            nn.init.xavier_uniform_(block, gain=2**-0.5)
        if self.c_attn.bias is not None:
            bound = self.c_attn.in_features**-0.5
            nn.init.uniform_(self.c_attn.bias, -bound, bound)
        nn.init.xavier_uniform_(self.c_proj.weight)
        if self.c_proj.bias is not None:
            nn.init.zeros_(self.c_proj.bias)

    def project(self, x: Tensor, context: Tensor | None) -> tuple:
        """Q of x and K, V of the context (of x itself when None) as heads."""
        if context is None:
            kv_size = self.n_kv * self.head_dim
            q, k, v = self.c_attn(x).split([self.q_size, kv_size, kv_size], dim=-1)
            return split_heads(q, self.n_head), split_heads(k, self.n_kv), split_heads(v, self.n_kv)
        return self.project_q(x), *self.project_kv(context)

    def project_q(self, x: Tensor) -> Tensor:
        bias = self.c_attn.bias
        w = self.c_attn.weight[: self.q_size]
        q = F.linear(x, w, None if bias is None else bias[: self.q_size])
        return split_heads(q, self.n_head)

    def project_kv(self, context: Tensor) -> tuple:
        """K, V of a context (B, S, d) as heads (B, n_kv, S, head_dim)."""
        kv_size = self.n_kv * self.head_dim
        bias = self.c_attn.bias
        k, v = F.linear(
            context,
            self.c_attn.weight[self.q_size :],
            None if bias is None else bias[self.q_size :],
        ).split([kv_size, kv_size], dim=-1)
        return split_heads(k, self.n_kv), split_heads(v, self.n_kv)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None):
        """(y, None). With a cache (`self.kv_cache`, set while the model decodes): self-attention
        writes the new tokens' n_kv_heads K/V heads and attends over the cache; cross-attention
        computes the context's K/V at the first step and reuses them."""
        y = self.attend(x, context, mask)[1]
        return self.resid_dropout(self.c_proj(merge_heads(y))), None

    def attend(self, x: Tensor, context: Tensor | None, mask: Tensor | None) -> tuple:
        """(queries, per-head outputs), both (B, n_head, T, head_dim), before the output
        projection: through the cache while the model decodes (see forward)."""
        cache = self.kv_cache
        if cache is not None and context is not None:
            q = self.project_q(x)
            k, v = cache.fill(lambda: self.project_kv(context))
            return q, sdpa(q, k, v, mask, False, 0.0)
        q, k, v = self.project(x, context)
        if context is None:
            q, k = rotate_qk(self, q, k)
        if cache is not None:
            return q, cache.update(q, k, v)
        causal = self.causal and context is None
        return q, sdpa(q, k, v, mask, causal, self.dropout if self.training else 0.0)

    def matmul_params_per_token(self) -> int:
        return self.c_attn.weight.numel() + self.c_proj.weight.numel()

    def flops_per_token(self, seq_len: int) -> int:
        """6 x matmul parameters + 12 x (query heads x head_dim x T): forward and backward."""
        return 6 * self.matmul_params_per_token() + 12 * self.n_head * self.head_dim * seq_len

    def kv_layout(self) -> tuple:
        """(K/V heads cached, head_dim): mha n_head, gqa n_kv_heads, mqa 1."""
        return self.n_kv, self.head_dim

    def kv_cache_elems_per_token(self) -> int:
        return 2 * self.n_kv * self.head_dim
