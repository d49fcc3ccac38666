"""Rotary positions (model.positions=rope, models/rope.py): the rotation itself, positions carried
through the decoding cache for every variant that takes them, no position table, and the one-line
refusals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_train
from moa_train import config
from moa_train.config import bench_presets
from moa_train.models.attention.mha import MHAConfig
from moa_train.models.conformance import check_decoding, tiny_config
from moa_train.models.lm import LanguageModel
from moa_train.models.rope import Rotary

# every registered variant and preset (a new one is covered without editing this list)
ROPE_VARIANTS = bench_presets()


def test_rotation_keeps_norms_and_scores_depend_on_the_offset_only():
    rope = Rotary(16, fraction=1.0, base=10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g)

    def score(i: int, j: int) -> torch.Tensor:
        qi = rope(q, torch.tensor([i]))
        kj = rope(k, torch.tensor([j]))
        return (qi * kj).sum(-1)

    torch.testing.assert_close(rope(q, torch.tensor([7])).norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(score(5, 2), score(13, 10), atol=1e-5, rtol=0)
    assert (score(5, 2) - score(5, 4)).abs().max() > 1e-3


def test_rotate_half_layout_and_fraction():
    """Channel i pairs with i + n_rot/2 at frequency base^(-2i/n_rot); channels past n_rot pass."""
    rope = Rotary(8, fraction=0.5, base=100.0)
    assert rope.n_rot == 4
    x = torch.arange(1.0, 9.0).view(1, 1, 1, 8)
    y = rope(x, torch.tensor([3]))
    a0, a1 = 3.0, 3.0 * 100.0 ** (-0.5)
    want = torch.tensor(
        [
            1 * torch.cos(torch.tensor(a0)) - 3 * torch.sin(torch.tensor(a0)),
            2 * torch.cos(torch.tensor(a1)) - 4 * torch.sin(torch.tensor(a1)),
            3 * torch.cos(torch.tensor(a0)) + 1 * torch.sin(torch.tensor(a0)),
            4 * torch.cos(torch.tensor(a1)) + 2 * torch.sin(torch.tensor(a1)),
            5,
            6,
            7,
            8,
        ]
    )
    torch.testing.assert_close(y.flatten(), want)
    assert Rotary(10, fraction=0.5).n_rot == 4  # 5 rounded down to whole pairs


@pytest.mark.parametrize("preset", ROPE_VARIANTS)
def test_cached_decoding_with_rope_equals_the_full_forward(preset):
    """Prompts of different lengths: each row's new tokens sit at its own positions."""
    keys = {} if preset in ("mla", "switchhead") else {"positions": "rope", "rope_fraction": 0.5}
    assert check_decoding(preset, **keys) == {"lm": "cached", "seq2seq": "cached"}


def test_rope_lm_has_no_position_table_and_still_tells_order():
    """Without any positions one causal layer is order-blind over the prefix: swapping two earlier
    tokens would leave the last logits unchanged. With rope they change, and no wpe exists."""
    torch.manual_seed(0)
    lm = LanguageModel(tiny_config("mha", positions="rope", n_layer=1), 50).eval()
    assert lm.wpe is None
    assert lm.num_params() == lm.num_params(non_embedding=False)
    idx = torch.tensor([[5, 9, 13, 21, 7]])
    swapped = torch.tensor([[9, 5, 13, 21, 7]])
    with torch.no_grad():
        a, _ = lm(idx)
        b, _ = lm(swapped)
    assert (a[0, -1] - b[0, -1]).abs().max() > 1e-4
    learned = LanguageModel(tiny_config("mha"), 50)
    assert learned.wpe is not None


@pytest.mark.parametrize(
    "keys", [{"inference_routing": "top1"}, {"fused": False}, {"resid_dropout": "per_branch"}]
)
def test_every_moas_dynamic_path_rotates(keys):
    """The fused, per-branch and one-hot decode paths each rotate their own Q and K."""
    keys = {"positions": "rope", "rope_fraction": 0.5, **keys}
    assert check_decoding("moas_dynamic", **keys)["lm"] == "cached"


def test_a_variant_that_cannot_rotate_refuses_rope():
    """`rope_ok = False` on a variant's config class (a plugin whose attention does not rotate)."""

    @dataclass
    class NoRope(MHAConfig):
        rope_ok: ClassVar[bool] = False

    m = OmegaConf.structured(NoRope(name="norope", d_model=32, n_head=4, positions="rope"))
    with pytest.raises(config.ConfigError, match=r"^model.positions: model=norope does not take"):
        NoRope.validate(m, None)
    NoRope.validate(OmegaConf.structured(NoRope(name="norope", d_model=32, n_head=4)), None)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.rope_fraction=0.0", r"^model.rope_fraction: must be in \(0, 1\]"),
        ("model.rope_fraction=1.5", r"^model.rope_fraction: must be in \(0, 1\]"),
        ("model.rope_base=1.0", r"^model.rope_base: must be > 1"),
        ("model.positions=alibi", r"^model.positions: got 'alibi'; allowed: .*rope"),
    ],
)
def test_bad_rope_keys_are_refused_in_one_line(override, match):
    cfg = compose_train("model=mha", "model.positions=rope", override)
    with pytest.raises(config.ConfigError, match=match):
        config.validate(cfg)


def test_encoder_decoder_takes_rope_without_a_table():
    from moa_train.models.seq2seq import Seq2Seq

    model = Seq2Seq(tiny_config("mha", positions="rope", n_encoder_layer=1), 50, 0)
    assert model.pos_table is None and not hasattr(model, "pos")


@pytest.mark.parametrize("preset", ROPE_VARIANTS)
def test_rope_reaches_every_variants_attention(preset):
    """Without positions, one causal attention layer reads the earlier tokens as a set: swapping
    tokens 0 and 1 leaves the last position's logits unchanged (with more layers the causal mask
    alone tells order). A variant that really rotates q and k tells the
    order (a variant that built a rotary and never applied it would not)."""
    import torch

    from moa_train.models.conformance import _spread_weights

    keys = {} if preset in ("mla", "switchhead") else {"positions": "rope"}
    torch.manual_seed(0)
    lm = LanguageModel(tiny_config(preset, n_layer=1, **keys), 50).eval()
    _spread_weights(lm, 0)  # weights large enough that position effects are far above rounding
    idx = torch.randint(2, 50, (1, 8), generator=torch.Generator().manual_seed(1))
    swapped = idx[:, [1, 0, *range(2, 8)]]
    with torch.no_grad():
        a, b = lm(idx)[0][0, -1], lm(swapped)[0][0, -1]
    assert (a - b).abs().max() > 1e-3, preset


def test_a_variant_that_builds_no_rotary_is_refused():
    """A plugin whose from_config forgets `attn.rope` would train with no positions: refused."""
    from moa_train.models import registry
    from moa_train.models.conformance import tiny_config

    class Forgets(registry.ATTENTION["mha"]):
        @classmethod
        def from_config(cls, m, causal=True):
            attn = super().from_config(m, causal)
            attn.rope = None
            return attn

    m = tiny_config("mha", positions="rope")
    saved = registry.ATTENTION["mha"]
    registry.ATTENTION["mha"] = Forgets
    try:
        with pytest.raises(
            config.ConfigError, match=r"^model.positions=rope: model=mha's attention"
        ):
            registry.build_attention(m)
    finally:
        registry.ATTENTION["mha"] = saved
