"""MLA (models/attention/mla.py): naive == absorbed, a cache of the latent and the rotary key only
(measured bytes == the analytic count), the counters, decoding == full forward, refusals."""

from __future__ import annotations

import pytest
import torch

from conftest import compose_train
from moa_train import config
from moa_train.models.attention.mla import LatentCache, MLAAttention, MLAConfig
from moa_train.models.conformance import check_decoding, tiny_config
from moa_train.models.kv_cache import kv_bytes_per_token
from moa_train.models.lm import LanguageModel

KEYS = {"kv_lora_rank": 12, "qk_nope_head_dim": 6, "qk_rope_head_dim": 4, "v_head_dim": 5}


def module(**keys) -> MLAAttention:
    torch.manual_seed(0)
    attn = MLAAttention.from_config(tiny_config("mla", **{**KEYS, **keys})).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    return attn


@pytest.mark.parametrize("q_lora_rank", [None, 8])
def test_naive_and_absorbed_forms_agree(q_lora_rank):
    attn = module(q_lora_rank=q_lora_rank)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        q_nope, q_pe, c, k_pe = attn.project(x)
        naive = attn.naive(q_nope, q_pe, c, k_pe, None)
        absorbed = attn.absorbed(q_nope, q_pe, torch.cat([c[:, None], k_pe], -1), None)
    assert naive.shape == absorbed.shape == (2, 4, 9, KEYS["v_head_dim"])
    torch.testing.assert_close(absorbed, naive, atol=1e-5, rtol=1e-5)


def test_shapes_and_parameter_count():
    m = tiny_config("mla", **KEYS, q_lora_rank=8)
    attn = MLAAttention.from_config(m)
    assert attn.wq_b.weight.shape == (4 * (6 + 4), 8)
    assert attn.wkv_a.weight.shape == (12 + 4, 32)  # the latent and the ONE rotary key
    assert attn.wkv_b.weight.shape == (4 * (6 + 5), 12)
    assert sum(p.numel() for p in attn.parameters()) == MLAConfig.attention_params(m)
    y, routing = attn(torch.randn(3, 7, 32))
    assert y.shape == (3, 7, 32) and routing is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_kv_bytes_equal_the_analytic_count(dtype):
    """kv_lora_rank + qk_rope_head_dim values per token and layer, whatever the head count."""
    m = tiny_config("mla", **KEYS)
    lm = LanguageModel(m, 50).eval()
    cache = lm.init_cache(2, 16, dtype=dtype)
    assert all(isinstance(c, LatentCache) for c in cache.self_layers())
    analytic = m.n_layer * (12 + 4) * dtype.itemsize
    assert kv_bytes_per_token(lm, dtype) == analytic
    assert cache.nbytes() == 2 * 16 * analytic
    with torch.no_grad():
        lm.prefill(torch.randint(0, 50, (2, 5)), torch.tensor([5, 3]), cache)
        lm.decode_step(torch.tensor([1, 2]), cache)
    assert cache.realised_bytes_per_token() == analytic
    assert int(cache.lengths.sum()) == 10


def test_flop_counters_count_what_runs():
    attn = module()
    h, r, n, p, v, d = 4, 12, 6, 4, 5, 32
    params = d * h * (n + p) + d * (r + p) + r * h * (n + v) + h * v * d
    assert attn.matmul_params_per_token() == params
    assert attn.flops_per_token(100) == 6 * params + 6 * h * (n + p + v) * 100
    # absorbed decode step: W_q, W_kv_a, W_o, the absorptions, scores over r + p, sums over r
    proj = d * h * (n + p) + d * (r + p) + h * v * d + h * r * (n + v)
    assert attn.absorbed_flops_per_token(50) == 2 * proj + 2 * h * (2 * r + p) * 50
    assert attn.kv_cache_elems_per_token() == r + p


@pytest.mark.parametrize("keys", [{}, {"q_lora_rank": 16}, {"rope_base": 500.0}])
def test_cached_decoding_equals_the_full_forward(keys):
    assert check_decoding("mla", **keys) == {"lm": "cached", "seq2seq": "cached"}


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["model.positions=learned"],
            r"^model.positions: model=mla is defined with rotary positions: needs rope",
        ),
        (["model.rope_fraction=0.5"], r"^model.rope_fraction: model=mla rotates all"),
        (["model.qk_rope_head_dim=5"], r"^model.qk_rope_head_dim: must be a positive even"),
        (["model.kv_lora_rank=0"], r"^model.kv_lora_rank: must be a positive integer"),
        (["model.q_lora_rank=0"], r"^model.q_lora_rank: must be positive or null"),
    ],
)
def test_bad_keys_are_refused_in_one_line(overrides, match):
    cfg = compose_train("model=mla", *overrides)
    with pytest.raises(config.ConfigError, match=match):
        config.validate(cfg)


def test_the_preset_validates_and_sets_rope():
    cfg = compose_train("model=mla")
    config.validate(cfg)
    assert cfg.model.positions == "rope"
