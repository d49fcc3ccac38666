"""Mixture of Attentive Experts (MAE; Peng, Schwartz, Li, Smith, ACL 2020, "A Mixture of h-1 Heads
is Better than h Heads"). No code was released (docs/fidelity.md says what is the paper's and what
was decided here).

Expert i is MHA with head i dropped and the other h-1 heads rescaled by h/(h-1):
f_i(x) = h/(h-1) * sum_{j != i} H_j(x) W_O^j. Responsibilities g(x) (a softmax over the h experts)
come from a tanh MLP over the mean of the sequence, MAE(x) = sum_i g_i f_i(x). Since
sum_i g_i [j != i] = 1 - g_j, the mixture is ONE multi-head attention whose head j is scaled by

    w_j = h/(h-1) * (1 - g_j)        (0 <= w_j <= h/(h-1), sum_j w_j = h)

before the output projection: the module costs one MHA plus the gate, never h experts. A uniform
gate (g_i = 1/h, the gate's zero-initialised output layer) gives w_j = 1: MHA exactly.

Gate input: the encoder (non-causal) takes the mean over the real tokens of the sequence, as the
paper; a causal decoder takes the causal prefix mean (x_1..x_t for the token at t), since the
sequence mean would read the future (a declared departure). As the gate's first layer is linear,
the prefix mean of x through it equals the prefix mean of W_1 x, so decoding keeps the running sums
of W_1 x (gate_hidden values per token, fp32) next to MHA's K/V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from moa_train.models.attention.mha import (
    MHAConfig,
    MultiHeadAttention,
    merge_heads,
    sdpa,
)
from moa_train.models.kv_cache import DecodeState, StaticKV
from moa_train.models.roles import NO_DECAY, ROUTER
from moa_train.models.rope import Rotary, rotate_qk
from moa_train.models.routing import Routing
from moa_train.schema import ModelConfig
from moa_train.validation import check, one_of, positive_or_null


@dataclass
class MAEConfig(MHAConfig):
    """mae: MHA whose heads are weighted by a mixture over the h drop-one-head experts."""

    # hidden units of the gate's tanh MLP (d_model -> gate_hidden -> n_head); null = d_model
    gate_hidden: int | None = None
    # bcd: the paper's block coordinate descent (the gate on its own plain SGD, in gate phases, with
    # the experts fixed; train/bcd.py) | joint: the gate trains with the experts under the main
    # optimizer (its router role: optim.router_lr_mult, optim.router_weight_decay)
    gate_training: str = "bcd"
    gate_lr: float = 0.1  # the gate's SGD learning rate (constant), bcd only
    # bcd: each cycle of gate_every optimizer steps ends with gate_steps gate steps
    gate_every: int = 500
    gate_steps: int = 50

    cross_attention_ok: ClassVar[bool] = False  # the gate reads the query side's own sequence
    cross_default: ClassVar[str | None] = "mha"

    @classmethod
    def validate(cls, m, cfg) -> None:
        super().validate(m, cfg)
        check(
            m.n_head >= 2,
            "model.n_head",
            f"mae needs at least 2 heads (an expert drops one), got {m.n_head}",
        )
        positive_or_null(m.gate_hidden, "model.gate_hidden")
        one_of(m.gate_training, "model.gate_training", ("bcd", "joint"))
        check(m.gate_lr > 0, "model.gate_lr", f"must be > 0, got {m.gate_lr}")
        check(
            0 < m.gate_steps < m.gate_every,
            "model.gate_steps",
            f"must lie in 1..model.gate_every-1={m.gate_every - 1} (gate steps per cycle of "
            f"gate_every steps; the rest train the experts), got {m.gate_steps}",
        )

    @classmethod
    def attention_params(cls, m) -> int:
        """MultiHeadAttention's plus the gate MLP (with biases)."""
        hidden = m.gate_hidden or m.d_model
        return super().attention_params(m) + (m.d_model + 1) * hidden + (hidden + 1) * m.n_head


class MixtureOfAttentiveExperts(MultiHeadAttention):
    PARAM_ROLES: ClassVar[dict] = {
        **MultiHeadAttention.PARAM_ROLES,
        "gate_in": ROUTER,
        "gate_out": ROUTER,
        "gate_in.bias": NO_DECAY,
        "gate_out.bias": NO_DECAY,
    }

    def __init__(self, d_model: int, n_head: int, gate_hidden: int, **mha):
        super().__init__(d_model, n_head, **mha)
        # the gate's first layer, applied before the mean (linear: mean(W x) = W mean(x))
        self.gate_in = nn.Linear(d_model, gate_hidden)
        self.gate_out = nn.Linear(gate_hidden, n_head)
        self.choice_names = tuple(str(i) for i in range(n_head))

    @classmethod
    def from_config(cls, m, causal: bool = True) -> MixtureOfAttentiveExperts:
        attn = cls(
            m.d_model,
            m.n_head,
            m.gate_hidden or m.d_model,
            n_kv_heads=m.n_kv_heads,
            dropout=m.dropout,
            bias=m.bias,
            causal=causal,
            attn_dropout=ModelConfig.attn_p(m),
        )
        attn.rope = Rotary.of(m, attn.head_dim)
        return attn

    def post_init(self) -> None:
        """A zero output layer: uniform responsibilities, so training starts from MHA."""
        nn.init.zeros_(self.gate_out.weight)
        nn.init.zeros_(self.gate_out.bias)

    def init_fairseq(self) -> None:
        super().init_fairseq()
        self.post_init()

    def gate_mean(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """(B, T, gate_hidden) fp32: W_1 x averaged over the sequence (non-causal: its real tokens)
        or over each token's causal prefix (through the cache's running sums while decoding)."""
        z = F.linear(x, self.gate_in.weight).float()
        if self.kv_cache is not None:
            sums, count = self.kv_cache.prefix_sums(z)
            return sums / count
        keep = None if mask is None else mask[..., None].to(z.dtype)
        if keep is not None:
            z = z * keep
        if self.causal:
            count = (
                torch.arange(1, z.shape[1] + 1, device=z.device, dtype=z.dtype)[:, None]
                if keep is None
                else keep.cumsum(1).clamp_min(1.0)
            )
            return z.cumsum(1) / count
        count = z.shape[1] if keep is None else keep.sum(1, keepdim=True).clamp_min(1.0)
        return z.sum(1, keepdim=True).expand_as(z) / count

    def responsibilities(self, x: Tensor, mask: Tensor | None) -> tuple:
        """(g, logits), each (B, T, h) fp32: the gate's softmax over the h experts."""
        hidden = torch.tanh(self.gate_mean(x, mask) + self.gate_in.bias.float())
        logits = hidden @ self.gate_out.weight.float().t() + self.gate_out.bias.float()
        return logits.softmax(-1), logits

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None):
        """(y, Routing over the h experts). With a cache (while the model decodes) the new tokens'
        K/V and running gate sums are written and attention reads the cache, as MHA's."""
        if context is not None:
            raise ValueError("mae is a self-attention variant: its cross-attention is model.cross")
        h = self.n_head
        g, logits = self.responsibilities(x, mask)
        q, k, v = self.project(x, None)
        q, k = rotate_qk(self, q, k)
        if self.kv_cache is not None:
            y = self.kv_cache.update(q, k, v)
        else:
            y = sdpa(q, k, v, mask, self.causal, self.dropout if self.training else 0.0)
        w = (1.0 - g) * (h / (h - 1))  # (B, T, h): head j's weight, the drop-one mixture's sum
        y = y * w.transpose(1, 2).unsqueeze(-1).to(y.dtype)
        routing = Routing(g.flatten(0, 1), self.choice_names, None, logits.flatten(0, 1))
        return self.resid_dropout(self.c_proj(merge_heads(y))), routing

    def make_cache(self, state: DecodeState, device, dtype) -> PrefixSumKV:
        return PrefixSumKV.allocate(
            self.kv_layout(), self.gate_in.out_features, state, device, dtype
        )

    def matmul_params_per_token(self) -> int:
        return (
            super().matmul_params_per_token()
            + self.gate_in.weight.numel()
            + self.gate_out.weight.numel()
        )

    def kv_cache_elems_per_token(self) -> int:
        """MHA's K/V plus the running gate sums (gate_hidden values, stored in fp32)."""
        return super().kv_cache_elems_per_token() + self.gate_in.out_features


class PrefixSumKV(StaticKV):
    """MHA's K/V plus, per position, the running sum of the gate's W_1 x over the row's tokens up to
    it (fp32). Kept per position rather than as one sum per row: a right-padded prefill writes
    padding past a row's length, which the next token then overwrites, as it does its K/V."""

    def __init__(self, k: Tensor, v: Tensor, sums: Tensor, state: DecodeState):
        super().__init__(k, v, state)
        self.sums = sums

    @classmethod
    def allocate(cls, layout: tuple, width: int, state, device, dtype) -> PrefixSumKV:
        kv = StaticKV.allocate(layout, state, device, dtype)
        shape = (state.lengths.shape[0], state.max_len, width)
        return cls(kv.k, kv.v, torch.zeros(shape, device=device, dtype=torch.float32), state)

    def prefix_sums(self, z: Tensor) -> tuple:
        """z (B, T, width) of the new tokens -> (their prefix sums (B, T, width), counts (B, T, 1)),
        the sums written at their positions."""
        positions = self.state.positions(z.shape[1])
        rows = torch.arange(z.shape[0], device=z.device)
        before = positions[:, 0] - 1
        base = self.sums[rows, before.clamp_min(0)] * (before >= 0)[:, None]
        sums = base[:, None] + z.cumsum(1)
        self.sums[rows[:, None].expand_as(positions), positions] = sums
        return sums, (positions + 1)[..., None].to(sums.dtype)

    def select(self, rows: Tensor) -> None:
        super().select(rows)
        self.sums = self.sums.index_select(0, rows)

    def nbytes(self) -> int:
        return super().nbytes() + self.sums.numel() * self.sums.element_size()

    def realised_bytes(self) -> Tensor:
        per_token = self.sums.shape[2] * self.sums.element_size()
        return super().realised_bytes() + self.state.lengths.sum() * per_token
