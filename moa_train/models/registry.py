"""Attention registry: name -> builder(model_config, causal) -> module.

A new attention variant is one file in models/attention/, one YAML in configs/model/ and one line here.
"""
from __future__ import annotations

from functools import partial

from moa_train.models.attention.mha import MultiHeadAttention
from moa_train.models.attention.moa import MixtureOfAttentionHeads
from moa_train.models.attention.moas import MoASAttention

ATTENTION = {
    "mha": MultiHeadAttention.from_config,
    "gqa": MultiHeadAttention.from_config,  # configs/model/gqa.yaml sets n_kv_heads
    "mqa": MultiHeadAttention.from_config,  # configs/model/mqa.yaml sets n_kv_heads: 1
    "moas_static": partial(MoASAttention.from_config, dynamic=False),
    "moas_dynamic": partial(MoASAttention.from_config, dynamic=True),
    "moa": MixtureOfAttentionHeads.from_config,
}


def build_attention(model_cfg, causal: bool = True, name: str | None = None):
    """The attention module `name` (default model.name) with the model config's sizes."""
    name = name or model_cfg.name
    try:
        builder = ATTENTION[name]
    except KeyError:
        raise ValueError(f"model.name: unknown attention {name!r}; allowed: {', '.join(sorted(ATTENTION))}") from None
    return builder(model_cfg, causal=causal)
