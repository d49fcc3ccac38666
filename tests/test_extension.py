"""A new attention variant from outside the package: one module (its config class with a new key,
its attention class, one `register` line) and one YAML in a temporary folder, named in MOA_PLUGINS,
trains through the CLI with that key overridden; no file of the package is edited."""

from __future__ import annotations

from omegaconf import OmegaConf

from conftest import read_jsonl, run_plugin_cli

MODULE = '''
"""Toy attention: multi-head attention whose output is divided by toy_key."""
from dataclasses import dataclass
from pathlib import Path

from moa_train.config import ConfigError, ModelConfig
from moa_train.models.attention.mha import MultiHeadAttention
from moa_train.models.registry import register


@dataclass
class ToyConfig(ModelConfig):
    toy_key: int = 1  # the attention output is divided by it

    @classmethod
    def validate(cls, m, cfg) -> None:
        super().validate(m, cfg)
        cls.check_heads(m)
        if m.toy_key < 1:
            raise ConfigError(f"model.toy_key: must be >= 1, got {m.toy_key}")


class ToyAttention(MultiHeadAttention):
    @classmethod
    def from_config(cls, m, causal: bool = True) -> "ToyAttention":
        attn = cls(m.d_model, m.n_head, None, m.dropout, m.bias, causal)
        attn.toy_key = m.toy_key
        return attn

    def forward(self, x, context=None, mask=None):
        y, routing = super().forward(x, context, mask)
        return y / self.toy_key, routing


register("toy", ToyAttention, ToyConfig, Path(__file__).with_name("toy.yaml"))
'''

YAML = """
# Toy attention (a plugin's preset).
defaults:
  - _schema_toy
  - _self_
name: toy
toy_key: 2
"""


def run(tmp_path, *overrides):
    return run_plugin_cli(
        tmp_path,
        {"toy_attention.py": MODULE, "toy.yaml": YAML},
        "toy_attention",
        ["model=toy", "trainer.log_interval=1", *overrides],
    )


def test_a_plugin_variant_trains_through_the_cli_with_its_key(tmp_path):
    proc = run(tmp_path, "model.toy_key=3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml")
    assert saved.model.name == "toy" and saved.model.toy_key == 3
    losses = [
        r["train/loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r
    ]
    assert len(losses) == 4


def test_a_plugin_variant_validates_its_own_key(tmp_path):
    proc = run(tmp_path, "model.toy_key=0")
    assert (
        proc.returncode == 2 and proc.stderr.strip() == "error: model.toy_key: must be >= 1, got 0"
    ), proc.stderr
    # a key of another variant is refused naming its owner
    proc = run(tmp_path, "model.n_experts=4")
    assert proc.returncode == 2 and "model.n_experts: belongs to moa" in proc.stderr, proc.stderr
