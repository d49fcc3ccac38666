"""The encoder-decoder: padding never changes outputs, the decoder is causal, routing sites and
masks."""

import re

import pytest
import torch
from omegaconf import OmegaConf

import moa_train.config as config
from conftest import REPO
from moa_train.models.seq2seq import Seq2Seq

V, PAD = 50, 0
VARIANTS = {
    "mha": {},
    "gqa": {"n_kv_heads": 2},
    "moa": {"n_experts": 4, "top_k": 2},
    "moas_dynamic": {},
    "mha_postln_sinusoidal": {"norm_first": False, "positions": "sinusoidal"},
}


def build(variant: str) -> Seq2Seq:
    name = variant.split("_postln")[0]
    m = OmegaConf.structured(
        config.VARIANTS[name](
            name=name,
            d_model=32,
            n_layer=2,
            n_encoder_layer=2,
            n_head=4,
            max_seq_len=32,
            dropout=0.0,
            **VARIANTS[variant],
        )
    )
    torch.manual_seed(0)
    model = Seq2Seq(m, V, PAD).eval()
    # leave the zero-initialised router: distinct routing per token makes the test stronger
    if name == "moa":
        for layer in [*model.encoder, *model.decoder]:
            for attn in (layer.self_attn, getattr(layer, "cross_attn", None)):
                if attn is not None and hasattr(attn, "router"):
                    torch.nn.init.normal_(attn.router.weight, std=0.5)
    return model


def ids(b: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(1, V, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_source_padding_changes_nothing(variant):
    model = build(variant)
    src, tgt = ids(2, 7, 1), ids(2, 5, 2)
    padded = torch.cat([src, torch.full((2, 4), PAD)], dim=1)
    a, _ = model(src, tgt)
    b, _ = model(padded, tgt)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_target_padding_leaves_real_positions_unchanged(variant):
    model = build(variant)
    src, tgt = ids(2, 7, 3), ids(2, 5, 4)
    padded = torch.cat([tgt, torch.full((2, 3), PAD)], dim=1)
    a, _ = model(src, tgt)
    b, _ = model(src, padded)
    assert torch.allclose(a, b[:, :5], atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decoder_is_causal(variant):
    model = build(variant)
    src, tgt = ids(1, 6, 5), ids(1, 8, 6)
    changed = tgt.clone()
    changed[:, 4:] = (changed[:, 4:] % (V - 1)) + 1
    a, _ = model(src, tgt)
    b, _ = model(src, changed)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-5)
    assert not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-5)


def test_routing_sites_and_masks():
    model = build("moa")
    src = torch.cat([ids(2, 5, 7), torch.full((2, 2), PAD)], dim=1)
    tgt = ids(2, 4, 8)
    _, routings = model(src, tgt)
    assert model.sites == [
        "enc.layer0.self",
        "enc.layer1.self",
        "dec.layer0.self",
        "dec.layer0.cross",
        "dec.layer1.self",
        "dec.layer1.cross",
    ]
    assert len(routings) == len(model.sites)
    # encoder: real source tokens
    assert routings[0].mask.sum() == 10 and routings[0].mask.numel() == 14
    # cross: routed per target token
    assert routings[3].mask.numel() == 8 and routings[3].mask.all()


def test_moas_cross_attention_is_mha():
    model = build("moas_dynamic")
    assert type(model.decoder[0].cross_attn).__name__ == "MultiHeadAttention"
    assert type(model.decoder[0].self_attn).__name__ == "MoASAttention"


def test_flops_count_selected_experts_only():
    sparse, dense = (
        build("moa"),
        Seq2Seq(
            OmegaConf.structured(
                config.VARIANTS["moa"](
                    name="moa",
                    d_model=32,
                    n_layer=2,
                    n_head=4,
                    max_seq_len=32,
                    n_experts=4,
                    top_k=4,
                )
            ),
            V,
            PAD,
        ),
    )
    assert sparse.flops_per_token(10) < dense.flops_per_token(10)


@pytest.mark.parametrize("variant", ["mha", "moa"])
def test_beam_one_equals_greedy_on_the_real_model(variant):
    from moa_train.models.search import beam_search, greedy_search

    model = build(variant)
    src = torch.cat([ids(3, 6, 9), torch.full((3, 2), PAD)], dim=1)
    mask = src != PAD
    greedy = greedy_search(model, src, mask, bos_id=1, eos_id=2, pad_id=PAD, max_len=10)
    assert greedy == beam_search(
        model, src, mask, bos_id=1, eos_id=2, pad_id=PAD, max_len=10, beam=1
    )
    assert all(len(h) <= 10 and PAD not in h and 1 not in h for h in greedy)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decode_last_only_is_the_last_position_of_decode(variant):
    model = build(variant)
    src = torch.cat([ids(3, 6, 10), torch.full((3, 2), PAD)], dim=1)
    src_mask = src != PAD
    memory = model.encode(src, src_mask)
    for t in (1, 5):
        tgt = ids(3, t, 11 + t)
        full = model.decode(tgt, memory, src_mask)
        last = model.decode(tgt, memory, src_mask, last_only=True)
        assert last.shape == (3, 1, V)
        torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=0)
        logits, routings = model.decode_with_routing(tgt, memory, src_mask, last_only=True)
        assert torch.equal(logits, last) and len(routings) == 2 * len(model.decoder)


# --- the cross-attention's own config node --------------------------------------------------------


def test_cross_attention_takes_its_own_variant_and_keys(compose_cfg):
    from moa_train.train.tasks import validate

    cfg = compose_cfg(
        "experiment=multi30k/mha",
        "debug=tiny",
        "model.cross.name=moa",
        "+model.cross.n_experts=4",
        "+model.cross.top_k=3",
    )
    validate(cfg)
    layer = Seq2Seq(cfg.model, V, PAD).decoder[0]
    assert type(layer.self_attn).__name__ == "MultiHeadAttention"
    assert type(layer.cross_attn).__name__ == "MixtureOfAttentionHeads"
    assert (
        layer.cross_attn.n_experts,
        layer.cross_attn.top_k,
        layer.cross_attn.router.in_features,
    ) == (4, 3, 32)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["model.cross.name=moas_static"],
            "model.cross.name: 'moas_static' is not a cross-attention variant",
        ),
        (["+model.cross.top_k=2"], "model.cross: keys top_k need model.cross.name"),
        (["model.cross.name=moa", "+model.cross.top_k=9"], "model.cross.top_k: 9 is larger than"),
        (["model.cross.name=mha", "+model.cross.top_k=2"], "model.cross.top_k: belongs to moa"),
    ],
)
def test_cross_attention_keys_are_checked_as_its_variant_s(compose_cfg, overrides, message):
    from moa_train.config import ConfigError
    from moa_train.train.tasks import validate

    cfg = compose_cfg("experiment=multi30k/mha", *overrides)
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        validate(cfg)


@pytest.mark.parametrize("run", ["moa_sparse-seed0", "mha-seed0"])
def test_configs_saved_with_cross_attention_still_build(run):
    """Run records from before model.cross (every variant's keys in the model node,
    model.cross_attention) load: the configs of the 2026-11-23 Multi30k records, kept in
    tests/fixtures/old_configs/ since those records were re-run."""
    from moa_train.train.tasks import saved_config

    old = OmegaConf.load(REPO / "tests/fixtures/old_configs" / f"translation_{run}.yaml")
    assert "cross_attention" in old.model
    saved = OmegaConf.create(saved_config(OmegaConf.to_container(old))).model  # as load_run reads
    model = Seq2Seq(saved, V, PAD)
    assert type(model.decoder[0].cross_attn) is type(model.decoder[0].self_attn)
    assert model.config.cross.name is None and "cross_attention" not in model.config
