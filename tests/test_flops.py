"""The FLOP counter against hand counts (bias=False, mlp_ratio 4, tied lm_head counted once)."""

from __future__ import annotations

import pytest
import torch

from moa_train.models import build_model

V = 283


def build(make_cfg, *overrides):
    cfg = make_cfg("model.bias=false", "model.mlp_ratio=4.0", *overrides)
    with torch.device("meta"):
        return build_model(cfg.model, V), cfg.model


def mlp_and_head(d: int, n_layer: int) -> int:
    return 6 * (n_layer * 2 * d * 4 * d + V * d)


@pytest.mark.parametrize("d,n_layer,n_head,t", [(32, 2, 2, 32), (64, 2, 4, 16), (384, 4, 6, 256)])
def test_mha_flops_hand_count(make_cfg, d, n_layer, n_head, t):
    lm, _ = build(
        make_cfg,
        "model=mha",
        f"model.d_model={d}",
        f"model.n_layer={n_layer}",
        f"model.n_head={n_head}",
        f"model.max_seq_len={max(t, 32)}",
    )
    expected = (
        6 * (n_layer * (4 * d * d + 2 * d * 4 * d) + V * d)
        + 12 * n_layer * n_head * (d // n_head) * t
    )
    assert lm.flops_per_token(t) == expected


def test_mha_flops_is_6n_plus_attention(make_cfg):
    """nanoGPT's estimate: 6 x (non-embedding params - norms + tied head) + 12 L H Q T."""
    lm, m = build(make_cfg, "model=mha", "model.d_model=64", "model.n_head=4")
    norms = sum(p.numel() for n, p in lm.named_parameters() if "ln_" in n)
    n_matmul = lm.num_params() - norms  # wte counted once = the tied lm_head
    assert lm.flops_per_token(32) == 6 * n_matmul + 12 * m.n_layer * m.d_model * 32


@pytest.mark.parametrize("n_kv", [1, 2])
def test_gqa_flops_count_fewer_kv_projections(make_cfg, n_kv):
    d, n_layer, t = 64, 2, 32
    lm, _ = build(
        make_cfg, "model=gqa", f"model.d_model={d}", "model.n_head=4", f"model.n_kv_heads={n_kv}"
    )
    hd = d // 4
    attn = 2 * d * d + 2 * d * n_kv * hd  # Q, O full; K, V of n_kv heads
    assert (
        lm.flops_per_token(t)
        == 6 * n_layer * attn + mlp_and_head(d, n_layer) + 12 * n_layer * 4 * hd * t
    )


@pytest.mark.parametrize("e,k,dh", [(4, 2, 16), (8, 2, 8), (8, 8, 8), (6, 1, 32)])
def test_moa_flops_hand_count(make_cfg, e, k, dh):
    d, n_layer, t = 64, 2, 32
    lm, _ = build(
        make_cfg,
        "model=moa",
        f"model.d_model={d}",
        f"model.n_experts={e}",
        f"model.top_k={k}",
        f"model.head_dim={dh}",
    )
    per_layer = 6 * (d * e + 2 * d * dh + 2 * k * d * dh) + 12 * k * dh * t
    assert lm.flops_per_token(t) == n_layer * per_layer + mlp_and_head(d, n_layer)


def test_moa_flops_with_kv_groups(make_cfg):
    d, n_layer, t, e, k, dh, g = 64, 2, 32, 4, 2, 8, 2
    lm, _ = build(
        make_cfg,
        "model=moa",
        f"model.d_model={d}",
        f"model.n_experts={e}",
        f"model.top_k={k}",
        f"model.head_dim={dh}",
        f"model.n_kv_heads={g}",
    )
    per_layer = 6 * (d * e + 2 * d * g * dh + 2 * k * d * g * dh) + 12 * k * g * dh * t
    assert lm.flops_per_token(t) == n_layer * per_layer + mlp_and_head(d, n_layer)


def test_moa_flops_grow_with_top_k(make_cfg):
    flops = [
        build(make_cfg, "model=moa", "model.n_experts=8", f"model.top_k={k}")[0].flops_per_token(32)
        for k in (1, 2, 8)
    ]
    assert flops[0] < flops[1] < flops[2]
    # but the parameters are the same: all experts exist whatever k is
    params = {
        build(make_cfg, "model=moa", "model.n_experts=8", f"model.top_k={k}")[0].num_params()
        for k in (1, 8)
    }
    assert len(params) == 1


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dynamic", [False, True])
def test_moas_flops_hand_count(make_cfg, dynamic, bias):
    """Matmul weights only: biases (the router's too, with model.bias) are not matmul parameters."""
    d, h, g, n_layer, t = 64, 4, 2, 2, 32
    name = "moas_dynamic" if dynamic else "moas_static"
    lm, _ = build(
        make_cfg,
        f"model={name}",
        f"model.d_model={d}",
        f"model.n_head={h}",
        f"model.gqa_kv_heads={g}",
        f"model.bias={bias}",
    )
    hd = d // h
    # three query sets; K/V of the MHA, GQA, MQA branches
    qkv = 3 * d * d + 2 * d * (h + g + 1) * hd
    out = 3 * d * d
    router = (d * (d // 4) + (d // 4) * 3) if dynamic else 0
    expected = (
        6 * n_layer * (qkv + out + router)
        + mlp_and_head(d, n_layer)
        + 12 * n_layer * 3 * h * hd * t
    )
    assert lm.flops_per_token(t) == expected


def test_flops_grow_linearly_with_sequence_length(make_cfg):
    lm, m = build(make_cfg, "model=mha", "model.d_model=64", "model.n_head=4")
    f16, f32 = lm.flops_per_token(16), lm.flops_per_token(32)
    assert f32 - f16 == 12 * m.n_layer * m.d_model * 16


@pytest.mark.parametrize("content", ['{"cpu', "[1, 2]", '{"KEY": "fast"}'])
def test_damaged_peak_flops_cache_is_measured_again(tmp_path, monkeypatch, caplog, content):
    from moa_train.metrics import flops

    device = torch.device("cpu")
    key = f"{flops.device_name(device)}|fp32|torch {torch.__version__}"
    (tmp_path / "peak_flops.json").write_text(content.replace("KEY", key))
    monkeypatch.setattr(flops, "measure_matmul_flops", lambda device, kind: 1.5e9)
    assert flops.peak_flops(device, "fp32", tmp_path / "peak_flops.json") == 1.5e9
    assert flops.read_table(tmp_path / "peak_flops.json")[key] == 1.5e9  # the file is whole again
    # a bad value alone is just measured again
    assert ("is damaged" in caplog.text) == ("KEY" not in content)


def test_moas_kv_flops_are_mha_plus_the_router(make_cfg):
    """moas_kv runs MHA's projections and n_head query heads whatever the schemes; the router is
    Linear(d, 3)."""
    d, h, n_layer, t = 64, 4, 2, 32
    kv, _ = build(
        make_cfg, "model=moas_kv", f"model.d_model={d}", f"model.n_head={h}", "model.kv_budget=2"
    )
    mha, _ = build(make_cfg, "model=mha", f"model.d_model={d}", f"model.n_head={h}")
    assert kv.flops_per_token(t) == mha.flops_per_token(t) + 6 * n_layer * 3 * d
    assert kv.num_params() == mha.num_params() + n_layer * 3 * d
