"""The variant table: attention variant name -> its config class and its module class, in one
registry, with the model presets (configs/model/*.yaml and plugins') and the cross-attention
helpers.

`register_variant` stores a variant's config class as the schema `_schema_<name>` of the model
group (its YAMLs list it first in their defaults); moa_train.models.registry registers the
package's variants with their module classes (`register`). `VARIANTS` (name -> config class) and
`ATTENTION` (name -> module class) are two views of the one table. This module imports no torch.
"""

from __future__ import annotations

import difflib
from collections.abc import MutableMapping
from dataclasses import dataclass, fields
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from moa_train.paths import config_dir
from moa_train.schema import ModelConfig, variant_keys
from moa_train.validation import ConfigError, check, one_of


@dataclass
class Variant:
    """One attention variant: its config class (a ModelConfig subclass) and its module class (None
    until one is registered)."""

    config: type | None = None
    module: type | None = None


class Column(MutableMapping):
    """One column of the variant table as a dict (name -> that column's class), in registration
    order; setting a name sets that column of its row, deleting clears it (and a row with neither
    class goes)."""

    def __init__(self, table: dict, column: str):
        self.table, self.column = table, column

    def __getitem__(self, name):
        value = getattr(self.table[name], self.column) if name in self.table else None
        if value is None:
            raise KeyError(name)
        return value

    def __setitem__(self, name, value):
        setattr(self.table.setdefault(name, Variant()), self.column, value)

    def __delitem__(self, name):
        self[name]  # KeyError where unset
        setattr(self.table[name], self.column, None)
        if self.table[name].config is None and self.table[name].module is None:
            del self.table[name]

    def __iter__(self):
        return (name for name, row in list(self.table.items()) if getattr(row, self.column))

    def __len__(self):
        return sum(1 for _ in self)

    def __repr__(self):
        return repr(dict(self))


# attention variant name -> Variant(config class, module class): the one registry
TABLE: dict = {}
# name -> its config class (a ModelConfig subclass); filled by register_variant
VARIANTS = Column(TABLE, "config")
# name -> its attention module class; filled by moa_train.models.registry.register
ATTENTION = Column(TABLE, "module")
# preset name -> YAML path, for variants registered from outside the package
PLUGIN_PRESETS: dict = {}


def register_variant(
    name: str, config: type, yaml: str | Path | None = None, module: type | None = None
) -> None:
    """Make `config` the schema of variant `name`: its YAMLs name it as `_schema_<name>` in their
    defaults. `yaml`: a preset from outside configs/model/ (a plugin's), choosable as
    model=<name>; `module`: its attention module class."""
    TABLE[name] = Variant(config, module)
    ConfigStore.instance().store(group="model", name=f"_schema_{name}", node=config)
    if yaml is not None:
        ConfigStore.instance().store(group="model", name=name, node=OmegaConf.load(yaml))
        PLUGIN_PRESETS[name] = Path(yaml)


def presets() -> list:
    """Every choice of the model group: configs/model/*.yaml (variants and their named presets) and
    plugins'."""
    return sorted(
        {p.stem for p in config_dir().joinpath("model").glob("*.yaml")} | set(PLUGIN_PRESETS)
    )


def bench_presets() -> list:
    """The model choices in registration order, a variant with named presets represented by them
    (moa by moa_dense and moa_sparse): moa-bench's rows."""
    choices = presets()
    built_on = {preset_variant(p) for p in choices if preset_variant(p) != p}
    return [
        p for name in VARIANTS for p in choices if preset_variant(p) == name and p not in built_on
    ]


def preset_variant(preset: str) -> str:
    """The variant a preset configures: its `name`, or that of the first preset in its defaults."""
    path = PLUGIN_PRESETS.get(preset, config_dir() / "model" / f"{preset}.yaml")
    node = OmegaConf.load(path)
    if "name" in node:
        return node.name
    return preset_variant(next(d for d in node.defaults if not str(d).startswith("_")))


def applicable(preset: str, overrides) -> list:
    """`overrides` less those of model keys that only other variants own: one list of settings for
    every model (moa-bench's GPT-2 size: model.gate_dropout=0.0 applies to the variants that have a
    gate dropout)."""
    foreign = set().union(*map(variant_keys, VARIANTS.values())) - variant_keys(
        VARIANTS[preset_variant(preset)]
    )
    return [
        o for o in overrides if not (o.startswith("model.") and o[6:].partition("=")[0] in foreign)
    ]


def owners(key: str) -> list:
    """The variants whose config class has `key`."""
    return [name for name, config in VARIANTS.items() if key in variant_keys(config)]


def _with_presets(name: str) -> str:
    named = [p for p in presets() if p != name and preset_variant(p) == name]
    return f"{name} (and its presets {', '.join(named)})" if named else name


def foreign_key(key: str, config: type) -> str:
    """The one line for a model key that variant config `config` does not have: the variants (and
    their presets) that own it."""
    mine = "/".join(name for name, c in VARIANTS.items() if c is config) or config.__name__
    found = [_with_presets(name) for name in owners(key.rpartition(".")[2])]
    if not found:
        allowed = sorted(variant_keys(config))
        near = difflib.get_close_matches(key.rpartition(".")[2], allowed, n=1, cutoff=0.75)
        hint = f"did you mean model.{near[0]}? " if near else ""
        return f"{key}: not a key of {mine}; {hint}allowed: {', '.join(allowed)}"
    return f"{key}: belongs to {', '.join(found)}, not {mine}"


def variant_config(node):
    """`node` (a model or cross-attention config: a dict or DictConfig holding `name`) typed by its
    variant's config class; a key the variant does not own is a ConfigError naming its owners."""
    data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    one_of(data.get("name"), "model.name", tuple(sorted(VARIANTS)))
    config = VARIANTS[data["name"]]
    try:
        return OmegaConf.merge(OmegaConf.structured(config), data)
    except ConfigKeyError as exc:
        raise ConfigError(foreign_key(f"model.{exc.key}", config)) from None


def cross_config(m):
    """The typed config of the decoder's cross-attention: model.cross.name's variant (null: the
    model's own, or its cross_default) with the model's common keys and model.cross's keys."""
    own = OmegaConf.get_type(m)
    name = m.cross.name or own.cross_default
    if name is None:
        return m
    common = {f.name: m[f.name] for f in fields(ModelConfig) if f.name not in ("name", "cross")}
    return variant_config({**common, **OmegaConf.to_container(m.cross, resolve=True), "name": name})


def check_cross(m, cfg) -> None:
    """model.cross names a variant that can attend to a context, and its keys are that variant's."""
    allowed = tuple(sorted(name for name, config in VARIANTS.items() if config.cross_attention_ok))
    name = m.cross.name
    check(
        name is None or name in allowed,
        "model.cross.name",
        f"{name!r} is not a cross-attention variant; allowed: null (the model's own), "
        f"{', '.join(allowed)}",
    )
    check(
        name is not None or set(m.cross) == {"name"},
        "model.cross",
        f"keys {', '.join(sorted(set(m.cross) - {'name'}))} need model.cross.name (the variant "
        "that owns them)",
    )
    try:
        cross = cross_config(m)
        OmegaConf.get_type(cross).validate(cross, cfg)
    # the variant names its own keys model.<key>: here they are model.cross.<key>
    except ConfigError as exc:
        key, _, rest = str(exc).partition(": ")
        if key.removeprefix("model.") in variant_keys(ModelConfig):
            raise
        raise ConfigError(f"model.cross.{key.removeprefix('model.')}: {rest}") from None


def layer_params(m, cross: bool = False) -> int:
    """The parameters of one block of model config `m`: its attention (as the variant counts it)
    and the MLP; `cross`: a decoder block's cross-attention too. Norms are left out (a lower
    bound)."""
    hidden = int(m.mlp_ratio * m.d_model)
    mlp = 2 * m.d_model * hidden + (hidden + m.d_model if m.bias else 0)
    attention = OmegaConf.get_type(m).attention_params(m)
    if cross:
        other = cross_config(m)
        attention += OmegaConf.get_type(other).attention_params(other)
    return attention + mlp
