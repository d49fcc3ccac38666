"""Decoder-only Transformer LM (nanoGPT's GPT-2 layout) whose attention comes from the registry.

Pre-LN blocks, learned positions (model.positions=rope: rotary ones inside each attention and no
table), tied input/output embeddings, GELU MLP. `forward` returns the logits and one routing record
per layer (None for dense attention); the trainer turns them into losses and metrics.

Cached inference (models/kv_cache.py): `init_cache` gives every attention its layer cache, `prefill`
writes the (right-padded) prompts, then one `decode_step` per generated token runs the same blocks
and attention forwards as training, each attention through its cache; `release_cache` takes the
caches away. Call them in eval mode under torch.no_grad().
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from moa_train.models.kv_cache import CacheHolder, KVCache, can_cache
from moa_train.models.registry import build_attention, model_config
from moa_train.models.roles import EMBEDDING, NO_DECAY, RESIDUAL, params_with


class MLP(nn.Module):
    """Linear -> activation (GELU or ReLU) -> activation dropout -> Linear -> dropout."""

    PARAM_ROLES: ClassVar[dict] = {
        "c_proj.weight": RESIDUAL,
        "c_fc.bias": NO_DECAY,
        "c_proj.bias": NO_DECAY,
    }

    def __init__(
        self,
        d_model: int,
        hidden: int,
        dropout: float,
        bias: bool,
        activation: str = "gelu",
        activation_dropout: float = 0.0,
    ):
        super().__init__()
        self.c_fc = nn.Linear(d_model, hidden, bias=bias)
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.act_dropout = nn.Dropout(activation_dropout) if activation_dropout else nn.Identity()
        self.c_proj = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def from_config(cls, m, activation_dropout: float | None = None) -> MLP:
        """`activation_dropout`: another value than model.activation_dropout (null: that one)."""
        return cls(
            m.d_model,
            int(m.mlp_ratio * m.d_model),
            m.dropout,
            m.bias,
            m.activation,
            m.activation_dropout if activation_dropout is None else activation_dropout,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act_dropout(self.act(self.c_fc(x)))))


class Block(nn.Module):
    PARAM_ROLES: ClassVar[dict] = {"ln_1": NO_DECAY, "ln_2": NO_DECAY}

    def __init__(self, m, causal: bool = True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(m.d_model, bias=m.bias)
        self.attn = build_attention(m, causal=causal)
        self.ln_2 = nn.LayerNorm(m.d_model, bias=m.bias)
        self.mlp = MLP.from_config(m)

    def forward(self, x: Tensor, mask: Tensor | None = None):
        """`mask` (B, T; True = a real token): the keys attention may see (padding left out)."""
        a, routing = self.attn(self.ln_1(x), mask=mask)
        x = x + a
        return x + self.mlp(self.ln_2(x)), routing


def init_weights(model: nn.Module, n_layer: int) -> None:
    """GPT-2 init: N(0, 0.02) for Linear and Embedding, residual projections N(0, 0.02/sqrt(2
    n_layer)), zero biases; then each module's own `post_init` (the MoA router starts at zero:
    uniform routing)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    for p in params_with(model, RESIDUAL):
        nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
    for module in model.modules():
        if hasattr(module, "post_init"):
            module.post_init()


def build_trunk(model: nn.Module, m, vocab_size: int, causal: bool, table: bool) -> None:
    """Give `model` the layers of a decoder-only or encoder-only stack, in this order (the order of
    their random initialisation): token embedding `wte`, learned position table `wpe` (None without
    `table`: rope puts positions inside each attention, models/rope.py), dropout, m.n_layer blocks,
    final norm `ln_f` and an output head tied to the embedding; then GPT-2's init."""
    model.wte = nn.Embedding(vocab_size, m.d_model)
    model.wpe = nn.Embedding(m.max_seq_len, m.d_model) if table else None
    model.drop = nn.Dropout(m.dropout)
    model.blocks = nn.ModuleList(Block(m, causal=causal) for _ in range(m.n_layer))
    model.ln_f = nn.LayerNorm(m.d_model, bias=m.bias)
    model.lm_head = nn.Linear(m.d_model, vocab_size, bias=False)
    model.lm_head.weight = model.wte.weight  # tied
    init_weights(model, m.n_layer)
    model.sites = [f"layer{i}" for i in range(m.n_layer)]


class LanguageModel(CacheHolder, nn.Module):
    PARAM_ROLES: ClassVar[dict] = {"wte": EMBEDDING, "wpe": EMBEDDING, "ln_f": NO_DECAY}

    def __init__(self, m, vocab_size: int):
        super().__init__()
        m = model_config(m)
        self.config, self.vocab_size = m, vocab_size
        build_trunk(self, m, vocab_size, causal=True, table=m.positions != "rope")

    def forward(self, idx: Tensor):
        """(logits (B, T, V), one routing record per layer) of a full forward from position 0; an
        attached decoding cache is not used (nor changed)."""
        positions = torch.arange(idx.shape[1], device=idx.device)
        if self.cache is None:
            h, routings = self.hidden(idx, positions)
        else:
            with self.cache_set_aside():
                h, routings = self.hidden(idx, positions)
        return self.lm_head(h), routings

    def hidden(self, idx: Tensor, positions: Tensor) -> tuple:
        """(final hidden states (B, T, d), routings) of tokens idx at positions (T,) or (B, T),
        through each attention's cache where one is attached."""
        x = self.wte(idx)
        x = self.drop(x if self.wpe is None else x + self.wpe(positions))
        routings = []
        for block in self.blocks:
            x, routing = block(x)
            routings.append(routing)
        return self.ln_f(x), routings

    def cached_decoding_ok(self) -> bool:
        """Whether every block's attention can decode through a cache (models/kv_cache.can_cache);
        a plugin's variant that declares none is generated by full forwards."""
        return all(can_cache(block.attn) for block in self.blocks)

    def init_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        """Empty caches for `batch_size` rows of up to `max_len` tokens (prompt and generated),
        attached to the attentions (replacing any earlier ones) until `release_cache`; device and
        dtype default to the parameters'."""
        if max_len > self.config.max_seq_len:
            raise ValueError(
                f"max_len={max_len} is longer than model.max_seq_len={self.config.max_seq_len}"
            )
        w = self.wte.weight
        modules = [(block.attn, False) for block in self.blocks]
        cache = KVCache.allocate(modules, batch_size, max_len, device or w.device, dtype or w.dtype)
        self.attach_cache(cache)
        return cache

    def prefill(self, idx: Tensor, lengths: Tensor, cache: KVCache) -> Tensor:
        """idx (B, T) right-padded prompts of `lengths` (B,) real tokens (1..T) written into the
        cache from position 0; cache.lengths becomes `lengths`. Returns the logits (B, V) at each
        row's last real token. Padding positions write K/V past a row's length that are never
        attended and overwritten by the next token. CacheNotUsed where an attention's forward
        ignored its cache (its decoding would be wrong)."""
        t = idx.shape[1]
        if t > cache.max_len:
            raise ValueError(
                f"prompt of {t} tokens is longer than the cache's max_len={cache.max_len}"
            )
        lengths = lengths.to(device=idx.device, dtype=torch.int64)
        if bool(((lengths < 1) | (lengths > t)).any()):
            raise ValueError(f"prefill lengths must lie in 1..{t} (the prompt width)")
        if cache is not self.cache:
            self.attach_cache(cache)
        cache.lengths.zero_()
        cache.span = None
        h, _ = self.hidden(idx, cache.state.positions(t))
        cache.check_used()
        cache.lengths.copy_(lengths)
        last = h.gather(1, (lengths - 1)[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0]
        return self.lm_head(last)

    def decode_step(self, tokens: Tensor, cache: KVCache, span: int | None = None) -> Tensor:
        """tokens (B,): one per row, at position cache.lengths; returns the logits (B, V) after it
        and advances cache.lengths by one. Fixed shapes and no host sync (it compiles with
        fullgraph=True); positions past cache.max_len are not checked.

        span: attend over the cache's first `span` positions only, not all max_len of them (the
        caller, who counts the steps on the host, promises that every row's position is below it;
        unchecked, as a check would sync). The same results, less K/V read. A compiled or
        graph-captured step has fixed shapes per span, so callers round spans up to buckets."""
        if cache is not self.cache:
            self.attach_cache(cache)
        cache.span = span
        h, _ = self.hidden(tokens[:, None], cache.state.positions(1))
        cache.lengths.add_(1)
        return self.lm_head(h[:, 0])

    def num_params(self, non_embedding: bool = True) -> int:
        """nanoGPT's count: every parameter once (the tied embedding once), minus position
        embeddings."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding and self.wpe is not None else n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 x matmul parameters used (selected experts only, tied head
        once) + 12 x query heads x head_dim x T per attention call. For MHA this is nanoGPT's 6N +
        12*L*H*Q*T up to the norm and bias parameters, which are not matmuls."""
        mlp = sum(b.mlp.c_fc.weight.numel() + b.mlp.c_proj.weight.numel() for b in self.blocks)
        attn = sum(b.attn.flops_per_token(seq_len) for b in self.blocks)
        return 6 * (mlp + self.lm_head.weight.numel()) + attn


def build_model(model_cfg, vocab_size: int) -> LanguageModel:
    return LanguageModel(model_cfg, vocab_size)
