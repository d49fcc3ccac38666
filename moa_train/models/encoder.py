"""Encoder-only Transformer for masked language modelling (BERT/RoBERTa's layout with pre-LN
blocks): the decoder-only LM's blocks (models/lm.py) built bidirectional, so every position attends
to every real token of its sequence, padding masked out of attention and of routing statistics.
Learned positions, a tied output head; attention from the registry like every model here.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from moa_train.models.lm import build_trunk
from moa_train.models.registry import model_config
from moa_train.models.roles import EMBEDDING, NO_DECAY


class MaskedLM(nn.Module):
    PARAM_ROLES: ClassVar[dict] = {"wte": EMBEDDING, "wpe": EMBEDDING, "ln_f": NO_DECAY}

    def __init__(self, m, vocab_size: int, pad_id: int | None = None):
        super().__init__()
        m = model_config(m)
        self.config, self.vocab_size, self.pad_id = m, vocab_size, pad_id
        build_trunk(self, m, vocab_size, causal=False, table=True)

    def forward(self, idx: Tensor):
        """(logits (B, T, V), one routing record per layer, each with the mask of its real tokens
        where the model pads)."""
        mask = None if self.pad_id is None else idx != self.pad_id
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device)))
        routings = []
        for block in self.blocks:
            x, routing = block(x, mask)
            routings.append(routing)
        if mask is not None:
            routings = [
                r if r is None else dataclasses.replace(r, mask=mask.flatten()) for r in routings
            ]
        return self.lm_head(self.ln_f(x)), routings

    def num_params(self, non_embedding: bool = True) -> int:
        """Every parameter once (the tied embedding once), minus position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, counted as the LM counts them (models/lm.py): 6 x matmul
        parameters used + each attention's own count at seq_len."""
        mlp = sum(b.mlp.c_fc.weight.numel() + b.mlp.c_proj.weight.numel() for b in self.blocks)
        attn = sum(b.attn.flops_per_token(seq_len) for b in self.blocks)
        return 6 * (mlp + self.lm_head.weight.numel()) + attn
