"""Multi-head Latent Attention (MLA, DeepSeek-V2/V3): keys and values of all heads come from one
shared latent per token, so decoding caches only that latent and one rotary key.

Per token x (DeepSeek-V3's released `inference/model.py`, class MLA):
- query: q = W_q x (model.q_lora_rank null) or W_q_b RMSNorm(W_q_a x) (low rank), split per head
  into q_nope (qk_nope_head_dim) and q_pe (qk_rope_head_dim), q_pe rotated;
- latent: [c ; k_pe] = W_kv_a x, c = RMSNorm(c) of kv_lora_rank channels; k_pe, the decoupled rotary
  key of qk_rope_head_dim channels, ONE for all heads, rotated;
- per head: [k_nope ; v] = W_kv_b c (qk_nope_head_dim and v_head_dim channels), the head's key
  [k_nope ; k_pe], softmax scale (qk_nope_head_dim + qk_rope_head_dim)^-0.5;
  y = W_o [heads' outputs].

Two forms of the same attention:
- naive (full forwards: training, evaluation): K and V of every head materialised, one SDPA call;
- absorbed (decoding, through `LatentCache`): W_kv_b's key half is folded into the query
  (q_nope W_uk: a query of kv_lora_rank channels per head) and its value half applied after the
  attention, so every head attends over the cached [c ; k_pe] directly, as one multi-query
  attention with key [c ; k_pe] and value c. The cache holds kv_lora_rank + qk_rope_head_dim values
  per token and layer, whatever the head count.

Rotary positions are part of MLA: the decoupled q_pe/k_pe are always fully rotated (rope_base as the
base), so the variant requires model.positions=rope (its YAML sets it) and model.rope_fraction=1.
Departures from the released code: rotate-half layout where DeepSeek rotates interleaved channel
pairs (a fixed permutation of the q_pe/k_pe channels: scripts/transplant_mla.py maps the weights);
no YaRN (context extension only); no biases (none in the released projections either).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from moa_train.models.attention.mha import attention_mask, merge_heads
from moa_train.models.kv_cache import DecodeState, LayerCache, write_kv
from moa_train.models.roles import NO_DECAY, RESIDUAL
from moa_train.models.rope import Rotary, rotate, token_positions
from moa_train.schema import ModelConfig
from moa_train.validation import check, positive_or_null


@dataclass
class MLAConfig(ModelConfig):
    """mla: a shared K/V latent plus one decoupled rotary key per token."""

    positions: str = "rope"  # mla requires rope (its decoupled key is rotary)
    q_lora_rank: int | None = None  # low-rank query of this rank (RMSNorm between); null: full W_q
    kv_lora_rank: int = 128  # rank of the shared K/V latent c (cached)
    qk_nope_head_dim: int = 64  # per-head query/key channels without positions
    qk_rope_head_dim: int = 32  # rotary query channels per head; the rotary key (cached) is shared
    v_head_dim: int = 64  # per-head value channels

    cross_attention_ok: ClassVar[bool] = False  # the decoupled key numbers self-attention positions
    cross_default: ClassVar[str | None] = "mha"
    rope_required: ClassVar[bool] = True  # the decoupled key is rotary

    @classmethod
    def validate(cls, m, cfg) -> None:
        super().validate(m, cfg)
        check(
            m.rope_fraction == 1.0,
            "model.rope_fraction",
            "model=mla rotates all model.qk_rope_head_dim channels and none other: leave it at 1.0",
        )
        positive_or_null(m.q_lora_rank, "model.q_lora_rank")
        for key in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            check(m[key] > 0, f"model.{key}", f"must be a positive integer, got {m[key]}")
        check(
            m.qk_rope_head_dim > 0 and m.qk_rope_head_dim % 2 == 0,
            "model.qk_rope_head_dim",
            f"must be a positive even integer (rotated in pairs), got {m.qk_rope_head_dim}",
        )

    @classmethod
    def attention_params(cls, m) -> int:
        """W_q (or W_q_a, its norm and W_q_b), W_kv_a, the latent's norm, W_kv_b and W_o."""
        h, d = m.n_head, m.d_model
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        r = m.kv_lora_rank
        q = d * h * qk if not m.q_lora_rank else m.q_lora_rank * (d + 1 + h * qk)
        kv = d * (r + m.qk_rope_head_dim) + r + r * h * (m.qk_nope_head_dim + m.v_head_dim)
        return q + kv + h * m.v_head_dim * d


class MLAAttention(nn.Module):
    PARAM_ROLES: ClassVar[dict] = {"wo.weight": RESIDUAL, "q_norm": NO_DECAY, "kv_norm": NO_DECAY}
    kv_cache = None  # its LatentCache while the model decodes

    def __init__(
        self,
        d_model: int,
        n_head: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        q_lora_rank: int | None = None,
        dropout: float = 0.0,
        causal: bool = True,
        attn_dropout: float | None = None,
        rope_base: float = 10000.0,
    ):
        super().__init__()
        self.n_head, self.rank = n_head, kv_lora_rank
        self.nope, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        qk = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank:
            self.wq_a = nn.Linear(d_model, q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(q_lora_rank, eps=1e-6)
            self.wq_b = nn.Linear(q_lora_rank, n_head * qk, bias=False)
        else:
            self.wq = nn.Linear(d_model, n_head * qk, bias=False)
        self.wkv_a = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_norm = nn.RMSNorm(kv_lora_rank, eps=1e-6)
        self.wkv_b = nn.Linear(kv_lora_rank, n_head * (qk_nope_head_dim + v_head_dim), bias=False)
        self.wo = nn.Linear(n_head * v_head_dim, d_model, bias=False)
        self.rope = Rotary(qk_rope_head_dim, 1.0, rope_base)
        self.scale = qk**-0.5
        self.dropout = dropout if attn_dropout is None else attn_dropout
        self.causal = causal
        self.resid_dropout = nn.Dropout(dropout)

    @classmethod
    def from_config(cls, m, causal: bool = True) -> MLAAttention:
        return cls(
            m.d_model,
            m.n_head,
            m.kv_lora_rank,
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim,
            m.q_lora_rank,
            m.dropout,
            causal,
            ModelConfig.attn_p(m),
            m.rope_base,
        )

    def project(self, x: Tensor) -> tuple:
        """(q_nope (B, H, T, nope), q_pe (B, H, T, rope), c (B, T, rank), k_pe (B, 1, T, rope)),
        q_pe and k_pe rotated at the tokens' positions."""
        b, t, _ = x.shape
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(b, t, self.n_head, -1).transpose(1, 2)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        c, k_pe = self.wkv_a(x).split([self.rank, self.rope_dim], dim=-1)
        cos, sin = self.rope.cos_sin(token_positions(self, t, x.device))
        q_pe = rotate(q_pe, cos, sin, self.rope_dim)
        k_pe = rotate(k_pe[:, None], cos, sin, self.rope_dim)
        return q_nope, q_pe, self.kv_norm(c), k_pe

    def up_weights(self) -> tuple:
        """(W_uk (H, nope, rank), W_uv (H, v, rank)): W_kv_b's key and value halves per head."""
        w = self.wkv_b.weight.view(self.n_head, self.nope + self.v_dim, self.rank)
        return w[:, : self.nope], w[:, self.nope :]

    def naive(self, q_nope, q_pe, c, k_pe, mask: Tensor | None) -> Tensor:
        """Every head's K and V materialised from the latent; (B, H, T, v)."""
        b, t, _ = c.shape
        kv = self.wkv_b(c).view(b, t, self.n_head, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, self.n_head, -1, -1)], dim=-1)
        attn_mask, is_causal = attention_mask(mask, self.causal, t, t, q.device)
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal, scale=self.scale
        )

    def absorbed(self, q_nope, q_pe, latent: Tensor, keep: Tensor | None) -> Tensor:
        """Every head against the latents [c ; k_pe] (B, 1, L, rank + rope) themselves: W_uk folded
        into the query, W_uv applied to the attended latent; (B, H, T, v). keep: (B, 1, T, L) or
        None (causal over T = L)."""
        w_uk, w_uv = self.up_weights()
        q = torch.cat([torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk), q_pe], dim=-1)
        o = F.scaled_dot_product_attention(
            q,
            latent,
            latent[..., : self.rank],
            attn_mask=keep,
            is_causal=keep is None,
            scale=self.scale,
            enable_gqa=True,
        )
        return torch.einsum("bhtr,hvr->bhtv", o, w_uv)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None):
        """(y, None). Full forwards run the naive form; while the model decodes (`self.kv_cache`, a
        LatentCache) the new tokens' [c ; k_pe] are written and the absorbed form attends over the
        cache."""
        if context is not None:
            raise ValueError("mla is a self-attention (model.cross.name picks the cross-attention)")
        q_nope, q_pe, c, k_pe = self.project(x)
        cache = self.kv_cache
        if cache is None:
            o = self.naive(q_nope, q_pe, c, k_pe, mask)
        else:
            latent, keep = cache.update(torch.cat([c[:, None], k_pe], dim=-1))
            o = self.absorbed(q_nope, q_pe, latent, keep)
        return self.resid_dropout(self.wo(merge_heads(o))), None

    def matmul_params_per_token(self) -> int:
        q = (
            self.wq.weight.numel()
            if hasattr(self, "wq")
            else self.wq_a.weight.numel() + self.wq_b.weight.numel()
        )
        return q + self.wkv_a.weight.numel() + self.wkv_b.weight.numel() + self.wo.weight.numel()

    def flops_per_token(self, seq_len: int) -> int:
        """Training (the naive form runs): 6 x matmul parameters + 6 x H x (qk + v channels) x T
        (QK^T over nope + rope channels, AV over v; MHA's 12 x H x head_dim x T when they are
        equal)."""
        per_head = self.nope + self.rope_dim + self.v_dim
        return 6 * self.matmul_params_per_token() + 6 * self.n_head * per_head * seq_len

    def absorbed_flops_per_token(self, context: int) -> int:
        """Forward FLOPs of one decoded token at `context` cached tokens (the absorbed form): the
        projections W_q, W_kv_a and W_o, the per-head absorptions q_nope W_uk and o W_uv (H x rank
        x (nope + v)), scores over rank + rope channels and the latent sum over rank channels."""
        h, r = self.n_head, self.rank
        q = self.matmul_params_per_token() - self.wkv_b.weight.numel() - self.wkv_a.weight.numel()
        proj = q + self.wkv_a.weight.numel() + h * r * (self.nope + self.v_dim)
        return 2 * proj + 2 * h * (2 * r + self.rope_dim) * context

    def make_cache(self, state: DecodeState, device, dtype) -> LatentCache:
        return LatentCache.allocate(self.rank + self.rope_dim, state, device, dtype)

    def kv_cache_elems_per_token(self) -> int:
        """kv_lora_rank + qk_rope_head_dim: the latent and the shared rotary key."""
        return self.rank + self.rope_dim


class LatentCache(LayerCache):
    """MLA's cache: per row and position the latent [c ; k_pe] (B, 1, max_len, rank + rope), and
    nothing per head."""

    def __init__(self, latent: Tensor, state: DecodeState):
        self.latent, self.state = latent, state

    @classmethod
    def allocate(cls, width: int, state: DecodeState, device, dtype) -> LatentCache:
        shape = (state.lengths.shape[0], 1, state.max_len, width)
        return cls(torch.zeros(shape, device=device, dtype=dtype), state)

    def update(self, new: Tensor) -> tuple:
        """Write the new tokens' latents (B, 1, T, width) at their positions; returns (the cache's
        first `span` positions in the new tokens' dtype, keep mask (B, 1, T, L): each token sees
        the positions up to its own)."""
        positions = self.state.positions(new.shape[2])
        write_kv(self.latent, new, positions)
        self.mark_used()
        latent = self.latent if self.state.span is None else self.latent[:, :, : self.state.span]
        keep = torch.arange(latent.shape[2], device=new.device) <= positions[:, None, :, None]
        return latent.to(new.dtype), keep

    @property
    def k(self) -> Tensor:
        """The cached latents (KVCache.k's inspection view)."""
        return self.latent

    @property
    def v(self) -> Tensor:
        return self.latent

    @property
    def max_heads(self) -> int:
        return 1

    def select(self, rows: Tensor) -> None:
        self.latent = self.latent.index_select(0, rows)

    def nbytes(self) -> int:
        return self.latent.numel() * self.latent.element_size()

    def realised_bytes(self) -> Tensor:
        return self.state.lengths.sum() * self.latent.shape[-1] * self.latent.element_size()
