"""Attention registry: `register` puts a variant's module class and config class into the one
variant table (moa_train.models.variants: `ATTENTION` and `VARIANTS` are its two columns).

A new attention variant is one module (its attention class and its config class, a ModelConfig
subclass), one YAML in configs/model/ and one line in PACKAGE_VARIANTS (registered by
`register_package_variants`, which moa_train.registration.ensure_registered calls); one outside the
package is a module named in MOA_PLUGINS (loaded after the package's variants are registered:
`moa-train` and `load_run` do), which calls `register` with its YAML's path. `register` checks the
class against `AttentionVariant`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol, runtime_checkable

from omegaconf import OmegaConf

from moa_train.models.attention.mae import MAEConfig, MixtureOfAttentiveExperts
from moa_train.models.attention.mha import MHAConfig, MultiHeadAttention
from moa_train.models.attention.mla import MLAAttention, MLAConfig
from moa_train.models.attention.moa import MixtureOfAttentionHeads, MoAConfig
from moa_train.models.attention.moas import MoASAttention, MoASDynamicConfig, MoASStaticConfig
from moa_train.models.attention.moas_kv import MoASKVAttention, MoASKVConfig
from moa_train.models.attention.moh import MoHAttention, MoHConfig
from moa_train.models.attention.switchhead import SwitchHeadAttention, SwitchHeadConfig
from moa_train.models.variants import (
    ATTENTION,
    VARIANTS,
    cross_config,
    register_variant,
    variant_config,
)
from moa_train.plugins import once
from moa_train.validation import ConfigError


@runtime_checkable
class AttentionVariant(Protocol):
    """What an attention variant's module class provides (README, "Layout").

    - `from_config(model_config, causal) -> module`;
    - ONE `forward(x, context=None, mask=None) -> (y, Routing | None)`, which also decodes: while
      the model decodes, `self.kv_cache` holds the module's layer cache (models/kv_cache.py; None
      otherwise), and forward writes the new tokens' K/V into it and attends over it (a
      cross-attention: `kv_cache.fill` its context's K/V once);
    - its cache: `kv_layout() -> (K/V heads per token, head_dim)` for a StaticKV, or
      `make_cache(state, device, dtype) -> LayerCache` for one of its own; a class with neither
      declares it cannot cache (its models decode by full forwards);
    - `flops_per_token(seq_len)` counting what executes, `kv_cache_elems_per_token()`.
    """

    def forward(self, x, context=None, mask=None): ...

    def flops_per_token(self, seq_len: int) -> int: ...

    def kv_cache_elems_per_token(self) -> float: ...


def check_variant(name: str, cls: type) -> None:
    """TypeError (one line) unless `cls` provides AttentionVariant's methods."""
    missing = [
        m
        for m in ("from_config", "forward", "flops_per_token", "kv_cache_elems_per_token")
        if not callable(getattr(cls, m, None))
    ]
    if missing:
        raise TypeError(
            f"attention variant {name!r} ({cls.__name__}) lacks {', '.join(missing)}: see "
            "moa_train.models.registry.AttentionVariant"
        )


def register(name: str, cls: type, config: type, yaml: str | Path | None = None) -> None:
    """Variant `name`: module `cls` built from a `config` node; `yaml` (a plugin's
    configs/model/<name>.yaml, which lists `_schema_<name>` in its defaults) makes `model=<name>`
    choosable without a file in configs/. A class written for the earlier inference contract
    (`forward_cached(x, cache_k, cache_v, positions)`, `cross_kv`, `forward_cross`) still decodes,
    through an adapter, with a DeprecationWarning. The package's variants are registered first."""
    register_package_variants()
    check_variant(name, cls)
    if hasattr(cls, "forward_cached"):
        warnings.warn(
            f"attention variant {name!r}: forward_cached/cross_kv/forward_cross are deprecated; "
            "decode in forward through self.kv_cache (moa_train.models.registry.AttentionVariant)",
            DeprecationWarning,
            stacklevel=2,
        )
        cls = legacy_adapter(cls)
    register_variant(name, config, yaml, module=cls)


def legacy_adapter(cls: type) -> type:
    """A subclass of `cls` whose forward decodes through the earlier contract's methods while a
    cache is attached (a StaticKV of its kv_layout; a CrossKV of its cross_kv)."""

    def forward(self, x, context=None, mask=None):
        cache = getattr(self, "kv_cache", None)
        if cache is None:
            return cls.forward(self, x, context, mask)
        if context is None:
            positions = cache.state.positions(x.shape[1])
            y = self.forward_cached(x, cache.k, cache.v, positions)
            cache.mark_used()
            return y, None
        return self.forward_cross(x, cache.fill(lambda: self.cross_kv(context)), mask), None

    return type(cls.__name__, (cls,), {"forward": forward, "kv_cache": None})


# the package's variants, in registration order (VARIANTS' order: moa-bench's rows)
PACKAGE_VARIANTS = (
    ("mha", MultiHeadAttention, MHAConfig),
    ("gqa", MultiHeadAttention, MHAConfig),  # configs/model/gqa.yaml sets n_kv_heads
    ("mqa", MultiHeadAttention, MHAConfig),  # configs/model/mqa.yaml sets n_kv_heads: 1
    ("moas_static", MoASAttention, MoASStaticConfig),
    ("moas_dynamic", MoASAttention, MoASDynamicConfig),
    ("moa", MixtureOfAttentionHeads, MoAConfig),
    ("moas_kv", MoASKVAttention, MoASKVConfig),
    ("mae", MixtureOfAttentiveExperts, MAEConfig),
    ("moh", MoHAttention, MoHConfig),
    ("mla", MLAAttention, MLAConfig),
    ("switchhead", SwitchHeadAttention, SwitchHeadConfig),
)


@once
def register_package_variants() -> None:
    """Register PACKAGE_VARIANTS, once (a later call does nothing). `register` calls it first, so
    the package's variants precede any other in the table."""
    for name, cls, config in PACKAGE_VARIANTS:
        register(name, cls, config)


def model_config(m):
    """A model config typed by its variant (a saved one is first brought to the current layout by
    moa_train.train.tasks.saved_config, which every reader of a run's config applies). The
    package's variants are registered first: a model built without an entry point finds them."""
    register_package_variants()
    if OmegaConf.is_config(m) and OmegaConf.get_type(m) is VARIANTS.get(m.get("name")):
        return m
    return variant_config(m)


def build_attention(m, causal: bool = True, cross: bool = False):
    """The attention module of model config `m` (its decoder cross-attention with `cross`)."""
    m = cross_config(m) if cross else m
    attn = ATTENTION[m.name].from_config(m, causal=causal)
    if not cross and m.positions == "rope" and getattr(attn, "rope", None) is None:
        # a variant that took rope but built no rotary would train with no positions at all
        raise ConfigError(
            f"model.positions=rope: model={m.name}'s attention built no rotary (its from_config "
            "must set `attn.rope = Rotary.of(m, head_dim)`, models/rope.py); allowed for it: "
            "learned, sinusoidal, sinusoidal_fairseq"
        )
    return attn
