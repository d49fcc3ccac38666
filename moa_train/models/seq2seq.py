"""Encoder-decoder Transformer for translation whose attention comes from the same registry as the
LM.

Encoder self-attention, decoder self-attention and decoder cross-attention are registry modules
(cross-attention is `model.cross`'s variant, by default the model's own; a self-attention scheme
such as MoAS names its `cross_default`). Pre-LN (default) or post-LN, learned or sinusoidal
positions, one shared embedding for source, target and output (joint vocabulary). `forward` returns
logits and one routing record per attention site, named `enc.layer<i>.self`, `dec.layer<i>.self`,
`dec.layer<i>.cross`, each carrying the mask of its real (non-pad) tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from moa_train.models.kv_cache import CacheHolder, KVCache, can_cache
from moa_train.models.lm import MLP
from moa_train.models.registry import build_attention, model_config
from moa_train.models.roles import EMBEDDING, NO_DECAY


def sinusoids(n_pos: int, dim: int) -> Tensor:
    """The Transformer's fixed sinusoidal position table (n_pos, dim)."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_pos, dim)
    table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return table


# fairseq numbers positions from padding_idx + 1, and its padding_idx is 1
FAIRSEQ_FIRST_POSITION = 2


def sinusoids_fairseq(n_pos: int, dim: int) -> Tensor:
    """fairseq's sinusoidal rows for the positions 0..n_pos-1 of a sequence (n_pos, dim): [sin |
    cos] concatenated (not interleaved), frequencies exp(-log(10000) * i / (half - 1)) for i < half
    = dim // 2, and the first token at fairseq's position 2; an odd dim ends in a zero column, as
    there."""
    half = dim // 2
    freq = torch.exp(
        torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / max(half - 1, 1))
    )
    pos = torch.arange(FAIRSEQ_FIRST_POSITION, n_pos + FAIRSEQ_FIRST_POSITION, dtype=torch.float32)[
        :, None
    ]
    table = torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=1)
    return torch.cat([table, torch.zeros(n_pos, dim % 2)], dim=1)


class Sublayer(nn.Module):
    """x + f(norm(x)) (pre-LN) or norm(x + f(x)) (post-LN), for f an attention or the MLP."""

    PARAM_ROLES: ClassVar[dict] = {"norm": NO_DECAY}

    def __init__(self, d_model: int, bias: bool, norm_first: bool):
        super().__init__()
        self.norm, self.norm_first = nn.LayerNorm(d_model, bias=bias), norm_first

    def forward(self, x: Tensor, f) -> tuple:
        out = f(self.norm(x) if self.norm_first else x)
        y, routing = out if isinstance(out, tuple) else (out, None)
        return (x + y, routing) if self.norm_first else (self.norm(x + y), routing)


def zero_pad_queries(out, query_mask: Tensor | None):
    """An attention's (y, routing) with y zero at the pad queries (query_mask False), as the MoA
    layer gives them (no expert routed); None: unchanged."""
    if query_mask is None:
        return out
    y, routing = out
    return y * query_mask[..., None].to(y.dtype), routing


class EncoderLayer(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.self_attn = build_attention(m, causal=False)
        self.mlp = MLP.from_config(m)
        self.sub_attn, self.sub_mlp = (Sublayer(m.d_model, m.bias, m.norm_first) for _ in range(2))

    def forward(self, x: Tensor, src_mask: Tensor, query_mask: Tensor | None = None) -> tuple:
        """`query_mask`: the real positions whose attention output is kept (model.pad_positions=
        zeroed); None: every position's."""
        x, routing = self.sub_attn(
            x, lambda h: zero_pad_queries(self.self_attn(h, mask=src_mask), query_mask)
        )
        x, _ = self.sub_mlp(x, self.mlp)
        return x, routing


class DecoderLayer(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.self_attn = build_attention(m, causal=True)
        self.cross_attn = build_attention(m, causal=False, cross=True)
        self.mlp = MLP.from_config(m, m.decoder_activation_dropout)
        self.sub_self, self.sub_cross, self.sub_mlp = (
            Sublayer(m.d_model, m.bias, m.norm_first) for _ in range(3)
        )

    def forward(
        self, x: Tensor, memory: Tensor, src_mask: Tensor, query_mask: Tensor | None = None
    ) -> tuple:
        # target padding sits after the real tokens, so causal masking alone keeps real positions
        # from seeing it
        x, r_self = self.sub_self(x, lambda h: zero_pad_queries(self.self_attn(h), query_mask))
        x, r_cross = self.sub_cross(
            x,
            lambda h: zero_pad_queries(
                self.cross_attn(h, context=memory, mask=src_mask), query_mask
            ),
        )
        x, _ = self.sub_mlp(x, self.mlp)
        return x, r_self, r_cross


class Seq2Seq(CacheHolder, nn.Module):
    PARAM_ROLES: ClassVar[dict] = {
        "embed": EMBEDDING,
        "tgt_embed": EMBEDDING,
        "pos": EMBEDDING,
        "enc_norm": NO_DECAY,
        "dec_norm": NO_DECAY,
    }

    def __init__(self, m, vocab_size: int, pad_id: int):
        super().__init__()
        m = model_config(m)
        self.config, self.vocab_size, self.pad_id = m, vocab_size, pad_id
        d, n_enc = m.d_model, m.n_encoder_layer or m.n_layer
        self.embed = nn.Embedding(vocab_size, d, padding_idx=pad_id)
        self.tgt_embed = (
            self.embed if m.share_embeddings else nn.Embedding(vocab_size, d, padding_idx=pad_id)
        )
        self.embed_scale = math.sqrt(d)
        if m.positions == "learned":
            self.pos = nn.Embedding(m.max_seq_len, d)
        elif m.positions == "rope":  # inside the self-attentions (models/rope.py); none on cross
            self.pos_table = None
        else:
            table = sinusoids if m.positions == "sinusoidal" else sinusoids_fairseq
            self.register_buffer("pos_table", table(m.max_seq_len, d), persistent=False)
        self.drop = nn.Dropout(m.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(m) for _ in range(n_enc))
        self.decoder = nn.ModuleList(DecoderLayer(m) for _ in range(m.n_layer))
        # pre-LN stacks end in a norm; post-LN layers already end in one
        self.enc_norm = nn.LayerNorm(d, bias=m.bias) if m.norm_first else nn.Identity()
        self.dec_norm = nn.LayerNorm(d, bias=m.bias) if m.norm_first else nn.Identity()
        self.out = nn.Linear(d, vocab_size, bias=False)
        self.out.weight = self.tgt_embed.weight
        self._init(m.init)
        self.sites = [f"enc.layer{i}.self" for i in range(n_enc)] + [
            f"dec.layer{i}.{kind}" for i in range(m.n_layer) for kind in ("self", "cross")
        ]

    def _init(self, kind: str) -> None:
        """`standard`: every linear layer Xavier-uniform with zero biases (it scales with the width:
        GPT-2's fixed N(0, 0.02) is far below 1/sqrt(d) at translation widths, and cross-attention
        then learns to align very slowly). `fairseq`: each module as the released fairseq code
        initialises it: the FFN's Linear layers keep PyTorch's default (Kaiming-uniform,
        U(+-1/sqrt(fan_in)) biases), each attention module its own `init_fairseq`. Both: embeddings
        N(0, d^-0.5) since they are scaled by sqrt(d), the pad row zero, then the modules' own
        post_init (the MoA router starts uniform)."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not self.out:
                if kind == "fairseq":
                    module.reset_parameters()
                    continue
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if kind == "fairseq":
            for module in self.modules():
                if hasattr(module, "init_fairseq"):
                    module.init_fairseq()
        for emb in {self.embed, self.tgt_embed}:
            nn.init.normal_(emb.weight, std=emb.embedding_dim**-0.5)
            with torch.no_grad():
                emb.weight[self.pad_id].zero_()
        if hasattr(self, "pos"):
            nn.init.normal_(self.pos.weight, std=0.02)
        for module in self.modules():
            if hasattr(module, "post_init"):
                module.post_init()

    def _embed(self, emb: nn.Embedding, ids: Tensor, positions: Tensor | None = None) -> Tensor:
        """Scaled token embeddings plus positions: 0..T-1 (a slice of the table), or per row
        (`positions`, (B, T))."""
        table = self.pos.weight if hasattr(self, "pos") else self.pos_table
        x = emb(ids) * self.embed_scale
        if table is None:  # rope
            return self.drop(x)
        return self.drop(x + (table[: ids.shape[1]] if positions is None else table[positions]))

    def _pads_zeroed(self, x: Tensor, mask: Tensor) -> tuple:
        """(inputs, query mask) of a padded side: with model.pad_positions=zeroed the pad positions'
        inputs are zero (fairseq: the pad embedding and position rows are zero, and its encoder
        multiplies them out) and `mask` is returned to zero their attention outputs; kept: as
        given, no query mask."""
        if self.config.pad_positions != "zeroed":
            return x, None
        return x * mask[..., None].to(x.dtype), mask

    def encode_with_routing(self, src: Tensor, src_mask: Tensor) -> tuple:
        x, query_mask = self._pads_zeroed(self._embed(self.embed, src), src_mask)
        routings = []
        for layer in self.encoder:
            x, r = layer(x, src_mask, query_mask)
            routings.append(r)
        return self.enc_norm(x), routings

    def decode_with_routing(
        self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor, last_only: bool = False
    ) -> tuple:
        """(logits (B, T, V), routing records); last_only: the logits of the last position only, (B,
        1, V), with the final norm and the output projection applied to that position alone (what
        search needs at each step)."""
        x, query_mask = self._pads_zeroed(
            self._embed(self.tgt_embed, tgt_in), tgt_in != self.pad_id
        )
        routings = []
        for layer in self.decoder:
            x, r_self, r_cross = layer(x, memory, src_mask, query_mask)
            routings += [r_self, r_cross]
        if last_only:
            x = x[:, -1:]
        return self.out(self.dec_norm(x)), routings

    def cached_decoding_ok(self) -> bool:
        """Whether every decoder attention can decode through a cache (models/kv_cache.can_cache);
        a plugin's variant that declares none is decoded by recomputing the prefix."""
        return all(
            can_cache(layer.self_attn) and can_cache(layer.cross_attn) for layer in self.decoder
        )

    def init_cache(self, memory: Tensor, src_mask: Tensor, max_len: int) -> KVCache:
        """Empty caches for the sentences of `memory` (B, S, d) with key-padding mask src_mask (B,
        S), of up to `max_len` target positions, attached to the decoder's attentions until
        `release_cache`: each self-attention its K/V cache, each cross-attention the source's K/V,
        computed at the first step."""
        modules = []
        for layer in self.decoder:
            modules += [(layer.self_attn, False), (layer.cross_attn, True)]
        cache = KVCache.allocate(
            modules,
            memory.shape[0],
            max_len,
            memory.device,
            memory.dtype,
            memory=memory,
            src_mask=src_mask,
        )
        self.attach_cache(cache)
        return cache

    def decode_step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """Logits (B, V) of the token after `tokens` (B,), each at its row's next position
        (cache.lengths), which then advances by one; the same layers and attention forwards as
        training, each attention through its cache."""
        if cache is not self.cache:
            self.attach_cache(cache)
        first = not cache.layers[0][1].used
        positions = cache.state.positions(1)
        x = self._embed(self.tgt_embed, tokens[:, None], positions)
        for layer in self.decoder:
            x, _, _ = layer(x, cache.memory, cache.src_mask)
        if first:
            cache.check_used()
        cache.lengths.add_(1)
        return self.out(self.dec_norm(x))[:, 0]

    def encode(self, src: Tensor, src_mask: Tensor) -> Tensor:
        return self.encode_with_routing(src, src_mask)[0]

    def decode(
        self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor, last_only: bool = False
    ) -> Tensor:
        """Logits (B, T, V), or (B, 1, V) for the last position only with last_only."""
        return self.decode_with_routing(tgt_in, memory, src_mask, last_only)[0]

    def forward(self, src: Tensor, tgt_in: Tensor) -> tuple:
        """(logits (B, T, V), routing records in `self.sites` order, each with the mask of its real
        tokens)."""
        src_mask, tgt_mask = src != self.pad_id, tgt_in != self.pad_id
        # training never holds a cache: no context manager for torch.compile to trace there
        with self.cache_set_aside() if self.cache is not None else contextlib.nullcontext():
            memory, enc_routings = self.encode_with_routing(src, src_mask)
            logits, dec_routings = self.decode_with_routing(tgt_in, memory, src_mask)
        # one flattened tensor per side, shared by its sites: aux_losses stacks the sites of one
        # mask object (a few batched kernels, and under torchrun a few all-reduces, instead of some
        # per site)
        masks = [src_mask.flatten()] * len(enc_routings) + [tgt_mask.flatten()] * len(dec_routings)
        routings = [
            None if r is None else dataclasses.replace(r, mask=m)
            for r, m in zip(enc_routings + dec_routings, masks, strict=True)
        ]
        return logits, routings

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos.weight.numel() if non_embedding and hasattr(self, "pos") else n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs for one source token plus one target token at length seq_len: encoder
        layer, decoder layer (self + cross), MLPs and the output projection, from the attention
        modules' own counters."""
        mlp = sum(
            6 * (layer.mlp.c_fc.weight.numel() + layer.mlp.c_proj.weight.numel())
            for layer in [*self.encoder, *self.decoder]
        )
        attn = sum(layer.self_attn.flops_per_token(seq_len) for layer in self.encoder)
        attn += sum(
            layer.self_attn.flops_per_token(seq_len) + layer.cross_attn.flops_per_token(seq_len)
            for layer in self.decoder
        )
        return mlp + attn + 6 * self.out.weight.numel()
