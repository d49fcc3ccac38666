"""Routing statistics and auxiliary losses on hand-made router outputs."""

from __future__ import annotations

import math

import pytest
import torch

from moa_train.config import AuxConfig
from moa_train.models.routing import (
    Routing,
    aux_losses,
    balance_mse,
    balance_switch,
    cv_squared,
    dispatch_fraction,
    entropy,
    routing_metrics,
    utilisation,
    weighted_aux,
    z_loss,
)

C, N = 3, 12


def uniform(n: int = N, c: int = C) -> torch.Tensor:
    return torch.full((n, c), 1.0 / c)


def collapsed(n: int = N, c: int = C) -> torch.Tensor:
    """Every token sends everything to choice 0."""
    p = torch.zeros(n, c)
    p[:, 0] = 1.0
    return p


def spread_chosen(n: int = N, c: int = C, k: int = 1) -> torch.Tensor:
    """Selections spread evenly over the c choices (token i picks i, i+1, ... mod c)."""
    return (torch.arange(n)[:, None] + torch.arange(k)[None, :]) % c


# --- statistics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [2, 3, 8])
def test_entropy_uniform_is_log_c(c):
    assert entropy(uniform(c=c)).item() == pytest.approx(math.log(c), abs=1e-6)


def test_entropy_one_hot_is_zero():
    assert entropy(collapsed()).item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_is_mean_over_tokens():
    probs = torch.cat([uniform(2), collapsed(2)])
    assert entropy(probs).item() == pytest.approx(math.log(C) / 2, abs=1e-6)


def test_entropy_mask_counts_only_real_tokens():
    probs = torch.cat([uniform(2), collapsed(2)])
    mask = torch.tensor([True, True, False, False])
    assert entropy(probs, mask).item() == pytest.approx(math.log(C), abs=1e-6)


def test_soft_utilisation_is_column_mean():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.4, 0.4, 0.2]])
    util = utilisation(probs, None)
    assert torch.allclose(util, probs.mean(0))
    assert util.sum().item() == pytest.approx(1.0)


def test_topk_utilisation_counts_selections():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.2, 0.3]])
    chosen = torch.tensor([[0, 1], [0, 2]])
    util = utilisation(probs, chosen)
    assert util.tolist() == pytest.approx([0.5, 0.25, 0.25])


def test_topk_utilisation_sums_to_one():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(50, 8, generator=gen).softmax(-1)
    chosen = probs.topk(3, -1).indices
    util = utilisation(probs, chosen)
    counts = torch.bincount(chosen.flatten(), minlength=8).float()
    assert torch.allclose(util, counts / (50 * 3))
    assert util.sum().item() == pytest.approx(1.0)


def test_dispatch_fraction_of_soft_router_is_argmax_share():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.4, 0.1], [0.3, 0.3, 0.4]])
    assert dispatch_fraction(probs, None).tolist() == pytest.approx([0.5, 0.25, 0.25])


def test_routing_metrics_keys_and_values():
    soft = Routing(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]), ("mha", "gqa", "mqa"))
    topk = Routing(
        torch.full((2, 3), 1 / 3), ("0", "1", "2"), chosen=torch.tensor([[0, 1], [0, 2]])
    )
    out = routing_metrics(["layer0", "layer1", "layer2"], [soft, None, topk])
    assert set(out) == {
        "routing/entropy/layer0",
        "routing/util/layer0/mha",
        "routing/util/layer0/gqa",
        "routing/util/layer0/mqa",
        "routing/entropy/layer2",
        "routing/util/layer2/0",
        "routing/util/layer2/1",
        "routing/util/layer2/2",
    }
    assert out["routing/util/layer0/mha"].item() == pytest.approx(0.5)
    assert out["routing/util/layer2/0"].item() == pytest.approx(0.5)
    assert out["routing/util/layer2/2"].item() == pytest.approx(0.25)
    assert out["routing/entropy/layer2"].item() == pytest.approx(math.log(3), abs=1e-6)


# --- auxiliary losses -----------------------------------------------------------------------------


def test_balance_mse():
    assert balance_mse(uniform()).item() == pytest.approx(0.0, abs=1e-9)
    expected = ((1 - 1 / 3) ** 2 + 2 * (1 / 3) ** 2) / 3
    assert balance_mse(collapsed()).item() == pytest.approx(expected, rel=1e-6)


def test_balance_mse_uses_batch_mean_not_per_token():
    # every token is one-hot, but on different choices: the batch mean is uniform
    probs = torch.eye(C).repeat(4, 1)
    assert balance_mse(probs).item() == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("c", [3, 8])
@pytest.mark.parametrize("k", [1, 2])
def test_balance_switch(c, k):
    n = 4 * c  # a multiple of c: the spread selections are exactly even
    assert balance_switch(uniform(n, c), spread_chosen(n, c, k)).item() == pytest.approx(
        1.0, rel=1e-6
    )
    all_to_zero = torch.zeros(n, 1, dtype=torch.long)
    assert balance_switch(collapsed(n, c), all_to_zero).item() == pytest.approx(c, rel=1e-6)


def test_balance_switch_soft_router_uses_argmax():
    assert balance_switch(collapsed(), None).item() == pytest.approx(C, rel=1e-6)


def test_balance_switch_gradient_flows_through_probs_only():
    logits = torch.randn(N, C, requires_grad=True)
    probs = logits.softmax(-1)
    balance_switch(probs, probs.argmax(-1, keepdim=True)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("c", [2, 3, 8])
def test_z_loss_of_zero_logits(c):
    assert z_loss(torch.zeros(N, c)).item() == pytest.approx(math.log(c) ** 2, rel=1e-6)


def test_z_loss_grows_with_logit_scale():
    logits = torch.randn(N, C, generator=torch.Generator().manual_seed(0))
    assert z_loss(10 * logits) > z_loss(logits)


def test_cv_squared():
    assert cv_squared(uniform()).item() == pytest.approx(0.0, abs=1e-9)
    importance = torch.tensor([1.0, 0.0, 0.0])  # collapsed: var (unbiased) 1/3 over mean^2 1/9
    assert cv_squared(collapsed()).item() == pytest.approx(
        importance.var().item() / (1 / 9), rel=1e-5
    )


def aux_cfg(layer_reduce="mean", balance_type="mse", z_coef=0.0, cv_coef=0.0, **kw):
    return AuxConfig(
        layer_reduce=layer_reduce,
        balance_type=balance_type,
        balance_coef=0.01,
        z_coef=z_coef,
        cv_coef=cv_coef,
        **kw,
    )


def soft_record(probs: torch.Tensor) -> Routing:
    return Routing(probs, ("a", "b", "c"), None, probs.log())


def test_aux_losses_mean_and_sum_over_layers():
    """Layer terms are computed batched; the reduction over layers is the mean or the sum of
    per-layer terms."""
    layers = [soft_record(uniform()), None, soft_record(collapsed())]
    per_layer = {
        "balance": [balance_mse(uniform()), balance_mse(collapsed())],
        "z": [z_loss(uniform().log()), z_loss(collapsed().clamp_min(1e-30).log())],
        "cv": [cv_squared(uniform()), cv_squared(collapsed())],
    }
    layers[2].logits = collapsed().clamp_min(1e-30).log()
    mean, total = aux_losses(layers, aux_cfg("mean")), aux_losses(layers, aux_cfg("sum"))
    for name, values in per_layer.items():
        assert mean[name].item() == pytest.approx((values[0] + values[1]).item() / 2, rel=1e-5), (
            name
        )
        assert total[name].item() == pytest.approx((values[0] + values[1]).item(), rel=1e-5), name


def test_aux_losses_switch_uses_the_chosen_experts():
    probs = torch.full((4, 3), 1 / 3)
    chosen = torch.tensor([[0], [1], [2], [0]])
    r = Routing(probs, ("a", "b", "c"), chosen, probs.log())
    out = aux_losses([r, r], aux_cfg(balance_type="switch"))
    assert out["balance"].item() == pytest.approx(balance_switch(probs, chosen).item())


def test_zero_weighted_terms_are_skipped_off_log_steps():
    layers = [soft_record(uniform())]
    assert set(aux_losses(layers, aux_cfg(), all_terms=False)) == {"balance"}
    assert set(aux_losses(layers, aux_cfg(z_coef=0.001), all_terms=False)) == {"balance", "z"}
    assert set(aux_losses(layers, aux_cfg(), all_terms=True)) == {"balance", "z", "cv"}


def test_aux_losses_of_dense_model_is_empty():
    assert aux_losses([None, None], aux_cfg()) == {}


def test_weighted_aux_applies_coefficients():
    aux = {"balance": torch.tensor(2.0), "z": torch.tensor(3.0), "cv": torch.tensor(5.0)}
    coefs = AuxConfig(balance_coef=0.5, z_coef=0.0, cv_coef=0.1)
    assert float(weighted_aux(aux, coefs)) == pytest.approx(0.5 * 2 + 0.1 * 5)
