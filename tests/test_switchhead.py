"""SwitchHead (models/attention/switchhead.py): the selected-experts computation against a dense
reference of the released definition, non-competitive gates, fp32 selection, the counters at the
MoAS size, the cache, decoding == full forward, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_train
from moa_train import config
from moa_train.models.attention.switchhead import SwitchHeadAttention, SwitchHeadConfig
from moa_train.models.conformance import check_decoding, tiny_config
from moa_train.models.kv_cache import StaticKV
from moa_train.models.lm import LanguageModel
from moa_train.models.rope import Rotary


def module(**keys) -> SwitchHeadAttention:
    torch.manual_seed(0)
    m = tiny_config("switchhead", **{"n_head": 2, "head_dim": 8, **keys})
    attn = SwitchHeadAttention.from_config(m).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.5)
    return attn


def reference(attn: SwitchHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """The released definition with every expert computed (einsum), then the top-k by sigmoid
    score kept, unrenormalised: V by the source token, O by the destination token."""
    b, t, d = x.shape
    h, e, k, dh = attn.n_head, attn.n_experts, attn.top_k, attn.head_dim

    def gate_matrix(sel):
        scores = (x @ sel.weight.T).sigmoid().view(b, t, h, e)
        keep = torch.zeros_like(scores).scatter(-1, scores.topk(k, -1).indices, 1.0)
        return scores * keep  # (B, T, H, E): zero for unselected experts

    q, kk = (x @ attn.qk.weight.T).split(h * dh, -1)
    q, kk = (z.view(b, t, h, dh).transpose(1, 2) for z in (q, kk))
    if attn.rope is not None:
        pos = torch.arange(t)
        q, kk = attn.rope(q, pos), attn.rope(kk, pos)
    v_all = torch.einsum("btd,hedf->bthef", x, attn.v.view(h, e, d, dh))
    v = (v_all * gate_matrix(attn.sel_v)[..., None]).sum(3).transpose(1, 2)
    u = F.scaled_dot_product_attention(q, kk, v, is_causal=True)  # (B, H, T, dh)
    o_all = torch.einsum("bhtf,hefd->bthed", u, attn.o.view(h, e, dh, d))
    return (o_all * gate_matrix(attn.sel_o)[..., None]).sum((2, 3))


@pytest.mark.parametrize("keys", [{}, {"top_k": 1}, {"top_k": 5}, {"positions": "learned"}])
def test_selected_experts_equal_the_dense_reference(keys):
    attn = module(**keys)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        y, routing = attn(x)
    assert routing is None  # no aux loss, no routing record
    torch.testing.assert_close(y, reference(attn, x), atol=1e-4, rtol=1e-4)


def test_gates_are_sigmoid_scores_not_renormalised_and_only_they_carry_gradient():
    attn = module(top_k=2)
    x = torch.randn(1, 4, 32)
    gates, experts = attn.select(attn.sel_v, x)
    scores = (x.reshape(4, 32) @ attn.sel_v.weight.T).sigmoid().view(4, 2, 5)
    torch.testing.assert_close(gates, scores.topk(2, -1).values)
    assert not torch.allclose(gates.sum(-1), torch.ones(4, 2))
    assert experts.min() >= 0 and experts.max() < 2 * 5
    assert (experts[:, 1] >= 5).all()  # head 1's experts are 5..9
    y, _ = attn(torch.randn(2, 6, 32))
    y.sum().backward()
    for p in (attn.sel_v.weight, attn.sel_o.weight, attn.v, attn.o, attn.qk.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_selection_logits_are_fp32_under_autocast():
    attn = module()
    x = torch.randn(1, 3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gates, _ = attn.select(attn.sel_o, x)
    assert gates.dtype == torch.float32


def test_counters_at_the_moas_size():
    """d 384, 2 heads of 64, E 5, k 2 (the preset): 597,504 attention parameters (6-head MHA:
    589,824), 302,592 matmul parameters per token, 256 cached values per token and layer."""
    m = compose_train("model=switchhead", "~experiment").model
    attn = SwitchHeadAttention.from_config(m)
    assert sum(p.numel() for p in attn.parameters()) == SwitchHeadConfig.attention_params(m)
    assert SwitchHeadConfig.attention_params(m) == 597_504
    assert attn.matmul_params_per_token() == 302_592
    assert attn.flops_per_token(256) == 6 * 302_592 + 12 * 2 * 64 * 256
    assert attn.kv_cache_elems_per_token() == 256
    assert isinstance(attn.rope, Rotary) and attn.rope.n_rot == 32 and attn.rope.base == 10000.0


def test_the_cache_holds_k_and_the_mixed_v_of_each_head():
    lm = LanguageModel(tiny_config("switchhead", n_head=2, head_dim=8), 50).eval()
    cache = lm.init_cache(2, 12)
    layer = cache.self_layers()[0]
    assert isinstance(layer, StaticKV) and layer.k.shape == (2, 2, 12, 8)
    assert cache.nbytes() == 2 * 12 * 2 * (2 * 2 * 8) * 4


@pytest.mark.parametrize("keys", [{}, {"n_experts": 3, "top_k": 3}, {"positions": "learned"}])
def test_cached_decoding_equals_the_full_forward(keys):
    assert check_decoding("switchhead", **keys) == {"lm": "cached", "seq2seq": "cached"}


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model.top_k=6"], r"^model.top_k: 6 is larger than model.n_experts=5"),
        (["model.n_experts=0"], r"^model.n_experts: must be a positive integer"),
        (["model.head_dim=null", "model.n_head=5"], r"^model.n_head: 5 does not divide"),
        (
            ["trainer.cuda_graphs=true", "trainer.precision=fp32"],
            r"^trainer.cuda_graphs: switchhead's expert matmuls outside bf16",
        ),
    ],
)
def test_bad_keys_are_refused_in_one_line(overrides, match):
    cfg = compose_train("model=switchhead", *overrides)
    with pytest.raises(config.ConfigError, match=match):
        config.validate(cfg)
