"""The decoding conformance check (moa_train.models.conformance) over every registered variant and
preset, the README's toy plugin (a subclass that overrides only `forward`) in a fresh process, and
the cases it must catch: a forward that ignores its cache, one that decodes differently, and a
plugin written for the earlier contract (forward_cached), which still decodes with a deprecation
warning."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from conftest import REPO
from moa_train.config import bench_presets
from moa_train.models import registry
from moa_train.models.attention.mha import MHAConfig, MultiHeadAttention
from moa_train.models.conformance import check_decoding, check_lm
from test_extension import MODULE, YAML


@pytest.mark.parametrize("preset", bench_presets())
def test_every_registered_variant_decodes_as_it_computes(preset):
    report = check_decoding(preset)
    assert report == {"lm": "cached", "seq2seq": "cached"}


@pytest.mark.parametrize("keys", [{"inference_routing": "top1"}, {"fused": False, "bias": True}])
def test_moas_dynamic_settings_decode_as_they_compute(keys):
    assert check_decoding("moas_dynamic", **keys)["lm"] == "cached"


def test_the_toy_plugin_decodes_through_the_cache(tmp_path):
    """The README's toy (MultiHeadAttention with forward overridden to divide by toy_key): its
    inherited cache is used by its own forward, so decoding equals its full forward at toy_key=3,
    where the earlier contract (an inherited forward_cached) decoded it wrongly."""
    (tmp_path / "toy_attention.py").write_text(textwrap.dedent(MODULE))
    (tmp_path / "toy.yaml").write_text(textwrap.dedent(YAML))
    code = (
        "import toy_attention\n"
        "from moa_train.models.conformance import check_decoding\n"
        "print(check_decoding('toy', toy_key=3))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{'lm': 'cached', 'seq2seq': 'cached'}"


class IgnoresCache(MultiHeadAttention):
    """Overrides forward with its own attention and never touches self.kv_cache."""

    def forward(self, x, context=None, mask=None):
        q, k, v = self.project(x, context)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=context is None)
        b, h, t, d = y.shape
        return self.c_proj(y.transpose(1, 2).reshape(b, t, h * d)), None


class DecodesDifferently(MultiHeadAttention):
    """Uses its cache, but adds something only while decoding."""

    def forward(self, x, context=None, mask=None):
        y, routing = super().forward(x, context, mask)
        return (y * 1.1 if self.kv_cache is not None else y), routing


@pytest.fixture
def variant(tmp_path):
    """Register a test variant (MHA's keys) under a temporary name; removed after."""
    names = []

    def add(name, cls):
        yaml = tmp_path / f"{name}.yaml"
        yaml.write_text(f"defaults:\n  - _schema_{name}\n  - _self_\nname: {name}\n")
        registry.register(name, cls, MHAConfig, yaml)
        names.append(name)

    yield add
    from moa_train import config

    for name in names:
        registry.ATTENTION.pop(name, None)
        config.VARIANTS.pop(name, None)
        config.PLUGIN_PRESETS.pop(name, None)


def test_a_forward_that_ignores_its_cache_is_caught_and_never_decodes_wrongly(variant):
    variant("ignores_cache", IgnoresCache)
    with pytest.raises(AssertionError, match="IgnoresCache: forward ignored its KV cache"):
        check_lm("ignores_cache")
    # generation notices at prefill and goes on by full forwards: the right tokens, a warning
    from moa_train.models.conformance import VOCAB, tiny_config
    from moa_train.models.decoding import Recompute, open_steps
    from moa_train.models.lm import LanguageModel

    lm = LanguageModel(tiny_config("ignores_cache"), VOCAB).eval()
    idx, lengths, notes = torch.randint(2, VOCAB, (2, 5)), torch.tensor([5, 5]), []
    with torch.no_grad():
        with open_steps(lm, 2, 8, "cpu", warn=notes.append) as steps:
            got = steps.prefill(idx, lengths)
            got = torch.stack([got, steps.step(got.argmax(-1))])
        with Recompute(lm, 2, 8, "cpu") as full:
            want = full.prefill(idx, lengths)
            want = torch.stack([want, full.step(want.argmax(-1))])
    assert len(notes) == 1 and "decoding by full forwards instead" in notes[0]
    torch.testing.assert_close(got, want)


def test_a_forward_that_decodes_differently_is_caught(variant):
    variant("decodes_differently", DecodesDifferently)
    with pytest.raises(AssertionError, match=r"decodes_differently: cached decoding .* differs"):
        check_decoding("decodes_differently")


class OldStyle(MultiHeadAttention):
    """A plugin written for the earlier contract: forward never uses a cache; decoding goes through
    forward_cached / cross_kv / forward_cross."""

    kv_cache = None

    def forward(self, x, context=None, mask=None):
        q, k, v = self.project(x, context)
        from moa_train.models.attention.mha import merge_heads, sdpa

        y = sdpa(q, k, v, mask, self.causal and context is None, 0.0)
        return self.c_proj(merge_heads(y)) * 0.5, None

    def forward_cached(self, x, cache_k, cache_v, positions):
        from moa_train.models.attention.mha import merge_heads
        from moa_train.models.kv_cache import cached_sdpa, write_kv

        q, k, v = self.project(x, None)
        write_kv(cache_k, k, positions)
        write_kv(cache_v, v, positions)
        return self.c_proj(merge_heads(cached_sdpa(q, cache_k, cache_v, positions))) * 0.5

    def cross_kv(self, context):
        return self.project_kv(context)

    def forward_cross(self, x, kv, mask):
        from moa_train.models.attention.mha import merge_heads, sdpa

        return self.c_proj(merge_heads(sdpa(self.project_q(x), *kv, mask, False, 0.0))) * 0.5


def test_a_plugin_of_the_earlier_contract_still_decodes_with_a_warning(variant):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        variant("old_style", OldStyle)
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(messages) == 1 and "forward_cached" in messages[0] and "\n" not in messages[0]
    assert check_decoding("old_style") == {"lm": "cached", "seq2seq": "cached"}


def test_registration_names_what_a_variant_lacks():
    class NoFlops(torch.nn.Module):
        @classmethod
        def from_config(cls, m, causal=True):
            return cls()

        def forward(self, x, context=None, mask=None):
            return x, None

    with pytest.raises(TypeError, match=r"'broken' .* lacks flops_per_token, kv_cache_elems"):
        registry.register("broken", NoFlops, MHAConfig)
    assert "broken" not in registry.ATTENTION
