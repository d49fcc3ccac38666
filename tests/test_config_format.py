"""Saved configs are versioned (config_format) and an older layout is brought to the current one in
one place (moa_train/config_format.py) as a run's config is read: a model config written before
variants owned their keys loses the other variants' keys there, so the models read one layout."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from moa_train.config import VARIANTS, ConfigError, variant_keys
from moa_train.config_format import CONFIG_FORMAT, upgrade
from moa_train.models.registry import model_config
from moa_train.train.tasks import saved_config

# a run's config as written before variants owned their keys (and before config_format): every
# variant's keys in model, the decoder's cross-attention variant in model.cross_attention
OLD = {
    "model": {
        "name": "mha",
        "d_model": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_kv_heads": None,
        "max_seq_len": 32,
        "dropout": 0.1,
        "gqa_kv_heads": 2,
        "router_hidden": None,
        "gate_dropout": 0.0,
        "fused": True,
        "n_experts": 8,
        "top_k": 2,
        "gating": "softmax_all",
        "cross_attention": None,
    },
    "data": {"name": "wikitext2_char", "tokenizer": "char"},
    "trainer": {"max_steps": 3},
}
FOREIGN = {"gqa_kv_heads", "router_hidden", "gate_dropout", "fused", "n_experts", "top_k", "gating"}


def test_an_old_model_node_keeps_its_variant_s_keys_only():
    new = saved_config(OLD)
    assert new["config_format"] == CONFIG_FORMAT
    expected = {k: v for k, v in OLD["model"].items() if k not in FOREIGN | {"cross_attention"}}
    assert new["model"] == {**expected, "cross": {"name": None}}
    assert set(new["model"]) <= variant_keys(VARIANTS["mha"])
    assert OmegaConf.get_type(model_config(new["model"])) is VARIANTS["mha"]
    assert "n_experts" in OLD["model"]  # not changed in place


def test_the_model_step_takes_the_variant_s_keys_from_the_caller():
    """config_format knows no variant (it imports no models): the caller names a variant's keys."""
    old = {
        "model": {"name": "toy", "a": 1, "b": 2, "cross_attention": "mha"},
        "data": {"name": "x"},
    }
    new = upgrade(old, model_keys=lambda name: {"name", "a", "cross"} if name == "toy" else None)
    assert new["model"] == {"name": "toy", "a": 1, "cross": {"name": "mha"}}
    # a variant this process does not know (a plugin's not loaded) keeps its keys
    assert upgrade(old)["model"] == {"name": "toy", "a": 1, "b": 2, "cross": {"name": "mha"}}


def test_a_current_config_round_trips_unchanged(compose_cfg):
    for overrides in ((), ("model=moa",), ("data=multi30k_en_de",)):
        current = OmegaConf.to_container(compose_cfg(*overrides), resolve=True)
        assert saved_config(current) == current


def test_a_plain_model_config_with_another_variant_s_key_is_refused():
    """Only saved configs had other variants' keys, and the migration drops them: model_config is
    strict, and names the key's owners."""
    with pytest.raises(
        ConfigError, match=r"^model\.gqa_kv_heads: belongs to moas_static, .*, not mha"
    ):
        model_config({k: v for k, v in OLD["model"].items() if k != "cross_attention"})


def test_an_old_translation_config_with_its_task_interpolation_unresolved_keeps_its_task_keys():
    """Format-1 translation runs saved `task: {name: ${data.task}}` unresolved beside data.task;
    the step reads the task from data, so their keys move under task.* (the multi30k records of
    2026-12-01 are such configs)."""
    old = {
        "model": {"name": "mha", "d_model": 64, "n_layer": 2, "n_head": 4},
        "data": {"name": "multi30k_en_de", "task": "translation", "src": "en", "max_tokens": 8192},
        "task": {"name": "${data.task}"},
        "trainer": {"max_steps": 3, "label_smoothing": 0.1},
    }
    new = upgrade(old)
    assert new["task"] == {
        "name": "translation",
        "label_smoothing": 0.1,
        "max_tokens": 8192,
        "src": "en",
    }
    assert "max_tokens" not in new["data"] and new["data"]["tasks"] == ["translation"]
