"""One variant table (moa_train.models.variants) holds each variant's config class and module class;
the config's public names stay importable from moa_train.config, the key checks from
moa_train.validation under public names (the old private ones as aliases)."""

from __future__ import annotations

import moa_train.config as config
from moa_train import validation
from moa_train.models import registry, variants


def test_config_and_module_classes_are_one_row_of_one_table():
    for name, row in variants.TABLE.items():
        assert variants.VARIANTS[name] is row.config
        assert variants.ATTENTION[name] is row.module
    assert registry.ATTENTION is variants.ATTENTION and config.VARIANTS is variants.VARIANTS
    assert list(variants.VARIANTS) == list(variants.ATTENTION)  # every variant has both


def test_register_fills_one_row_and_removing_it_empties_both_columns():
    mha = variants.TABLE["mha"]
    registry.register("toy_row", mha.module, mha.config)
    try:
        assert variants.TABLE["toy_row"] == variants.Variant(mha.config, mha.module)
        assert "toy_row" in variants.VARIANTS and "toy_row" in variants.ATTENTION
    finally:
        del variants.ATTENTION["toy_row"], variants.VARIANTS["toy_row"]
    assert "toy_row" not in variants.TABLE


def test_key_checks_are_public_with_the_old_names_as_aliases():
    for name in ("check", "one_of", "positive_or_null", "divisors"):
        assert getattr(validation, f"_{name}") is getattr(validation, name)
        assert getattr(config, f"_{name}") is getattr(validation, name)
    assert config.ConfigError is validation.ConfigError
