"""Attention registry: name -> (module class, config class).

A new attention variant is one module (its attention class with `from_config(model_config, causal)`
and its config class, a ModelConfig subclass), one YAML in configs/model/ and one `register` line;
one outside the package is a module named in MOA_PLUGINS (moa_train.plugins loads them: `moa-train`
and `load_run` do), which calls `register` with its YAML's path.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from moa_train.config import VARIANTS, cross_config, register_variant, variant_config
from moa_train.models.attention.mha import MHAConfig, MultiHeadAttention
from moa_train.models.attention.moa import MixtureOfAttentionHeads, MoAConfig
from moa_train.models.attention.moas import MoASAttention, MoASDynamicConfig, MoASStaticConfig
from moa_train.models.attention.moas_kv import MoASKVAttention, MoASKVConfig

ATTENTION: dict = {}  # name -> attention module class


def register(name: str, cls: type, config: type, yaml: str | Path | None = None) -> None:
    """Variant `name`: module `cls` built from a `config` node; `yaml` (a plugin's
    configs/model/<name>.yaml, which lists `_schema_<name>` in its defaults) makes `model=<name>`
    choosable without a file in configs/."""
    ATTENTION[name] = cls
    register_variant(name, config, yaml)


register("mha", MultiHeadAttention, MHAConfig)
register("gqa", MultiHeadAttention, MHAConfig)  # configs/model/gqa.yaml sets n_kv_heads
register("mqa", MultiHeadAttention, MHAConfig)  # configs/model/mqa.yaml sets n_kv_heads: 1
register("moas_static", MoASAttention, MoASStaticConfig)
register("moas_dynamic", MoASAttention, MoASDynamicConfig)
register("moa", MixtureOfAttentionHeads, MoAConfig)
register("moas_kv", MoASKVAttention, MoASKVConfig)


def model_config(m):
    """A model config typed by its variant; a saved one (configs written before variants owned their
    keys) is read leniently: other variants' keys dropped, `cross_attention` mapped to
    `cross.name`."""
    if OmegaConf.is_config(m) and OmegaConf.get_type(m) is VARIANTS.get(m.get("name")):
        return m
    return variant_config(m, lenient=True)


def build_attention(m, causal: bool = True, cross: bool = False):
    """The attention module of model config `m` (its decoder cross-attention with `cross`)."""
    m = cross_config(m) if cross else m
    return ATTENTION[m.name].from_config(m, causal=causal)
