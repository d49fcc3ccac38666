"""Every attention family: shapes, gradients, causality, routers, and MoAS fused == plain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moa_train.config import applicable
from moa_train.models import build_model
from moa_train.models.attention.moa import MixtureOfAttentionHeads
from moa_train.models.attention.moas import MoASAttention
from moa_train.models.routing import aux_losses, weighted_aux

VOCAB, B, T = 50, 2, 16

# name -> overrides on top of debug=tiny (d_model 32, 2 layers, n_experts 4)
VARIANTS = {
    "mha": ["model=mha"],
    "gqa": ["model=gqa"],
    "mqa": ["model=mqa"],
    "moas_static": ["model=moas_static"],
    "moas_dynamic": ["model=moas_dynamic"],
    "moa_topk": ["model=moa", "model.top_k=2"],
    "moa_all": ["model=moa", "model.top_k=4"],
    "moa_topk_softmax": ["model=moa", "model.top_k=2", "model.gating=topk_softmax"],
    "moa_kv2": ["model=moa", "model.top_k=2", "model.n_kv_heads=2", "model.head_dim=4"],
    "mha_bias": ["model=mha", "model.bias=true"],
    "moas_dynamic_bias": ["model=moas_dynamic", "model.bias=true"],
    "moa_bias": ["model=moa", "model.bias=true"],
    "moas_kv": ["model=moas_kv", "model.kv_budget=2"],
    "moas_kv_bias": ["model=moas_kv", "model.bias=true"],
}
ROUTED = {
    "moas_dynamic",
    "moa_topk",
    "moa_all",
    "moa_topk_softmax",
    "moa_kv2",
    "moas_dynamic_bias",
    "moa_bias",
    "moas_kv",
    "moas_kv_bias",
}
# aux terms beyond balance, z and cv: moas_kv's stored heads, and its budget loss where a budget is
# set
KV_AUX = {"moas_kv": {"kv_heads", "kv_budget"}, "moas_kv_bias": {"kv_heads"}}


@pytest.fixture(scope="module")
def variant_cfgs(make_cfg):
    common = ["model.n_head=4", "model.dropout=0.0", "model.gate_dropout=0.0"]
    return {
        v: make_cfg(*applicable(o[0].partition("=")[2], common), *o) for v, o in VARIANTS.items()
    }


def build(cfg, seed: int = 0, randomize_routers: bool = False):
    torch.manual_seed(seed)
    lm = build_model(cfg.model, VOCAB)
    # the MoA router starts at zero (all ties): give it a real preference per token
    if randomize_routers:
        for name, p in lm.named_parameters():
            if ".router." in name:
                torch.nn.init.normal_(p, std=0.5)
    return lm


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_backward(variant_cfgs, variant):
    cfg = variant_cfgs[variant]
    lm = build(cfg).train()
    x, y = tokens(1), tokens(2)
    logits, routings = lm(x)
    assert logits.shape == (B, T, VOCAB)
    assert len(routings) == cfg.model.n_layer
    assert all((r is not None) == (variant in ROUTED) for r in routings)
    aux = aux_losses(routings, cfg.model.aux)
    assert set(aux) == (
        {"balance", "z", "cv"} | KV_AUX.get(variant, set()) if variant in ROUTED else set()
    )
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()) + weighted_aux(aux, cfg.model.aux)
    loss.backward()
    for name, p in lm.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_moa_router_starts_at_zero_and_still_learns(variant_cfgs):
    lm = build(variant_cfgs["moa_topk"])
    routers = [b.attn.router.weight for b in lm.blocks]
    assert all(torch.count_nonzero(w) == 0 for w in routers)
    logits, _ = lm(tokens())
    # no aux term: the gradient reaches the router through the gates alone
    logits.square().mean().backward()
    assert all(w.grad.abs().sum() > 0 for w in routers)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("t", [1, 7, T - 1])
def test_causal(variant_cfgs, variant, t):
    lm = build(variant_cfgs[variant], randomize_routers=True).eval()
    x = tokens(3)
    x2 = x.clone()
    x2[:, t:] = (x[:, t:] + 1 + torch.arange(T - t)) % VOCAB  # every later token changes
    with torch.no_grad():
        a, _ = lm(x)
        b, _ = lm(x2)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-5)
    # the change is visible where it should be
    assert not torch.allclose(a[:, t:], b[:, t:], atol=1e-5)


# --- routers --------------------------------------------------------------------------------------

D = 32


def rand_x(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


def test_moas_dynamic_probs_are_distributions():
    torch.manual_seed(0)
    attn = MoASAttention(D, 4, gqa_kv_heads=2, dynamic=True)
    y, routing = attn(rand_x())
    assert y.shape == (B, T, D)
    assert routing.probs.shape == (B * T, 3) and routing.choice_names == ("mha", "gqa", "mqa")
    assert routing.chosen is None
    assert torch.allclose(routing.probs.sum(-1), torch.ones(B * T), atol=1e-6)
    assert (routing.probs > 0).all()
    assert routing.logits.shape == (B * T, 3)
    assert torch.allclose(routing.logits.softmax(-1), routing.probs, atol=1e-6)


def test_moas_static_has_no_router():
    attn = MoASAttention(D, 4, gqa_kv_heads=2, dynamic=False)
    _, routing = attn(rand_x())
    assert routing is None
    assert not any("router" in n for n, _ in attn.named_parameters())


def moa(gating: str, k: int, e: int = 6) -> MixtureOfAttentionHeads:
    torch.manual_seed(0)
    m = MixtureOfAttentionHeads(D, e, k, head_dim=8, gating=gating)
    torch.nn.init.normal_(m.router.weight, std=0.2)
    return m


@pytest.mark.parametrize("gating", ["softmax_all", "topk_softmax"])
@pytest.mark.parametrize("k", [1, 2, 6])
def test_moa_chooses_k_distinct_experts(gating, k):
    gates, chosen, routing = moa(gating, k).route(rand_x())
    assert chosen.shape == gates.shape == (B * T, k)
    assert all(len(set(row.tolist())) == k for row in chosen)
    assert ((chosen >= 0) & (chosen < 6)).all()
    assert torch.equal(routing.chosen, chosen)
    assert torch.allclose(routing.probs.sum(-1), torch.ones(B * T), atol=1e-6)
    # the chosen experts are the k most probable ones
    kth_best = routing.probs.topk(k, -1).values[:, -1:]
    assert (routing.probs.gather(1, chosen) >= kth_best - 1e-7).all()


def test_moa_topk_softmax_gates_sum_to_one():
    gates, chosen, routing = moa("topk_softmax", 2).route(rand_x())
    assert torch.allclose(gates.sum(-1), torch.ones(B * T), atol=1e-6)
    top = routing.probs.gather(1, chosen)
    assert torch.allclose(gates, top / top.sum(-1, keepdim=True), atol=1e-6)


def test_moa_softmax_all_gates_are_topk_probabilities():
    gates, chosen, routing = moa("softmax_all", 2).route(rand_x())
    assert torch.allclose(gates, routing.probs.gather(1, chosen), atol=1e-7)
    assert (gates.sum(-1) < 1 - 1e-4).all()  # not renormalised


# --- MoAS fused vs plain --------------------------------------------------------------------------


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_moas_fused_matches_plain(dynamic, bias):
    kwargs = {
        "d_model": D,
        "n_head": 4,
        "gqa_kv_heads": 2,
        "dropout": 0.0,
        "bias": bias,
        "dynamic": dynamic,
    }
    torch.manual_seed(0)
    fused = MoASAttention(fused=True, **kwargs)
    with torch.no_grad():  # non-trivial biases, so a mis-mixed bias would show
        for p in fused.parameters():
            if p.dim() == 1 or p is fused.o_bias:
                p.normal_(std=0.1)
    plain = MoASAttention(fused=False, **kwargs)
    plain.load_state_dict(fused.state_dict())
    assert fused.state_dict().keys() == plain.state_dict().keys()

    x = rand_x(5)
    xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf, rf = fused(xf)
    yp, rp = plain(xp)
    assert torch.allclose(yf, yp, atol=1e-5)
    if dynamic:
        assert torch.allclose(rf.probs, rp.probs)
    w = torch.randn_like(yf)
    (yf * w).sum().backward()
    (yp * w).sum().backward()
    assert torch.allclose(xf.grad, xp.grad, atol=1e-5)
    grads_p = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.allclose(p.grad, grads_p[name].grad, atol=1e-5), name


def test_moas_parameters_equal_three_branches():
    """Fused layout holds exactly the parameters of separate MHA, GQA(2) and MQA branches (+
    router)."""
    d, h = 48, 6
    hd = d // h
    attn = MoASAttention(d, h, gqa_kv_heads=2, dynamic=False)
    branch = lambda kv: d * (d + 2 * kv * hd) + d * d  # noqa: E731 (Q, K, V, O)
    assert sum(p.numel() for p in attn.parameters()) == branch(h) + branch(2) + branch(1)
