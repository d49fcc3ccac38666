"""MoAS against the paper's released code (compare_moas.py): residual dropout per branch
(model.resid_dropout= per_branch: each branch's c_proj output, bias included, dropped out before the
gates mix them) and router biases that follow model.bias."""

from __future__ import annotations

import math

import pytest
import torch

from moa_train.models import build_model
from moa_train.models.attention.moas import MoASAttention

D, H, B, T, P = 32, 4, 8, 33, 0.5
N = B * (T - 1) * D  # elements counted: position 0 left out (see zero_share)


def moas(
    mode: str,
    fused: bool = True,
    bias: bool = False,
    dynamic: bool = False,
    dropout: float = P,
    seed: int = 0,
) -> MoASAttention:
    torch.manual_seed(seed)
    m = MoASAttention(
        D,
        H,
        gqa_kv_heads=2,
        dropout=dropout,
        bias=bias,
        dynamic=dynamic,
        fused=fused,
        resid_dropout=mode,
    )
    # non-trivial output biases, so a bias added after the dropout would fill the zeros
    with torch.no_grad():
        if m.o_bias is not None:
            m.o_bias.normal_(std=0.1)
    return m


def rand_x(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


def zero_share(m: MoASAttention, seed: int = 2) -> float:
    """Share of exact zeros in the train-mode output. Position 0 is left out: its query has one key,
    which attention dropout (also p) removes for every head at once with probability p^(heads),
    zeroing the whole row."""
    torch.manual_seed(seed)
    y, _ = m.train()(rand_x())
    return (y[:, 1:] == 0).float().mean().item()


def tol(p: float) -> float:
    """5 binomial standard deviations of a share over N independent elements."""
    return 5 * math.sqrt(p * (1 - p) / N)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("branch", [0, 1, 2], ids=["mha", "gqa", "mqa"])
def test_per_branch_drops_each_branch_s_output_with_p(fused, bias, branch):
    """The other two branches silenced (their c_proj columns and output biases zero): y = 1/3
    dropout(o_b W_b^T + c_b), so a share p of y is zero, bias included (a bias added after the
    dropout would leave no zero)."""
    m = moas("per_branch", fused, bias)
    with torch.no_grad():
        for other in {0, 1, 2} - {branch}:
            m.c_proj.weight[:, other * D : (other + 1) * D] = 0
            if bias:
                m.o_bias[other] = 0
    assert abs(zero_share(m) - P) < tol(P)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_an_output_element_is_zero_only_where_every_branch_dropped_it(fused, bias):
    """All three branches on: per_branch zeroes an element of y with probability p^3 (independent
    masks; 0.125 at p = 0.5), mixed with p (one mask after the mix)."""
    assert abs(zero_share(moas("per_branch", fused, bias)) - P**3) < tol(P**3)
    assert abs(zero_share(moas("mixed", fused, bias)) - P) < tol(P)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fused_equals_plain_in_training_under_one_seed(dynamic, bias):
    """Both paths draw the residual mask over one contiguous (3, B, T, d) tensor, so under one seed
    they drop the same elements. Attention dropout is switched off (the module's attention
    probability, not the residual one): the fused path draws its attention mask in one SDPA call,
    the plain path in three, so with it the random streams part. Outputs and gradients agree to
    float32 rounding (atol 1e-5)."""
    fused = moas("per_branch", True, bias, dynamic)
    plain = moas("per_branch", False, bias, dynamic)
    plain.load_state_dict(fused.state_dict())
    fused.dropout = plain.dropout = 0.0
    x = rand_x()
    xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(3)
    yf, _ = fused.train()(xf)
    torch.manual_seed(3)
    yp, _ = plain.train()(xp)
    assert abs((yf == 0).float().mean().item() - P**3) < 5 * math.sqrt(
        P**3 * (1 - P**3) / yf.numel()
    )
    assert torch.equal(yf == 0, yp == 0)
    torch.testing.assert_close(yf, yp, rtol=0, atol=1e-5)
    w = torch.randn_like(yf)
    (yf * w).sum().backward()
    (yp * w).sum().backward()
    torch.testing.assert_close(xf.grad, xp.grad, rtol=0, atol=1e-5)
    grads_p = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, grads_p[name].grad, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("case", ["eval", "dropout0"])
def test_per_branch_equals_mixed_where_dropout_is_inactive(fused, dynamic, case):
    """In eval mode, or training with dropout 0, per_branch is the mixed function and runs the same
    code: equal bit for bit for the same weights (and fused == plain within float32 rounding, atol
    1e-5)."""
    dropout = P if case == "eval" else 0.0
    per_branch = moas("per_branch", fused, True, dynamic, dropout)
    mixed = moas("mixed", fused, True, dynamic, dropout)
    mixed.load_state_dict(per_branch.state_dict())
    other = moas("per_branch", not fused, True, dynamic, dropout)
    other.load_state_dict(per_branch.state_dict())
    for m in (per_branch, mixed, other):
        m.train(case == "dropout0")
    x = rand_x()
    y, _ = per_branch(x)
    assert torch.equal(y, mixed(x)[0])
    torch.testing.assert_close(y, other(x)[0], rtol=0, atol=1e-5)
    assert (y == 0).sum() == 0


@pytest.mark.parametrize("bias", [False, True])
def test_router_has_biases_iff_model_bias_and_they_learn(make_cfg, bias):
    """The released router, Linear(d, hidden) -> GELU -> Linear(hidden, 3), follows the model's bias
    setting."""
    cfg = make_cfg(
        "model=moas_dynamic", f"model.bias={bias}", "model.dropout=0.0", "model.gate_dropout=0.0"
    )
    torch.manual_seed(0)
    lm = build_model(cfg.model, 50)
    router_biases = {
        n: p for n, p in lm.named_parameters() if ".router." in n and n.endswith(".bias")
    }
    routers = [m for m in lm.modules() if isinstance(m, MoASAttention)]
    assert len(router_biases) == (2 * len(routers) if bias else 0)
    for attn in routers:
        assert (attn.router[0].bias is not None) == (attn.router[2].bias is not None) == bias
    if not bias:
        return
    x = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    logits, _ = lm(x)
    # no aux term: the gradient reaches the router through the gates alone
    logits.square().mean().backward()
    for name, p in router_biases.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_no_bias_is_decayed_with_model_bias(make_cfg):
    """The MoAS code decays only tensors of dim >= 2 and no bias; our stacked (3, d) output bias is
    three 1-D biases, so it sits in a no-decay group (a dim >= 2 rule would decay it)."""
    from moa_train.train.optim import param_groups

    cfg = make_cfg("experiment=moas_table1/moas_dynamic", "model.bias=true")
    lm = build_model(cfg.model, 50)
    o_biases = {id(m.o_bias) for m in lm.modules() if isinstance(m, MoASAttention)}
    assert o_biases
    decayed = {
        id(p) for g in param_groups(lm, cfg.optim) if g["weight_decay"] > 0 for p in g["params"]
    }
    assert not decayed & o_biases
    names = {id(p): n for n, p in lm.named_parameters()}
    assert all(not names[i].endswith("bias") for i in decayed)


def test_window_sampling_draws_the_last_start(make_cfg):
    """nanoGPT's get_batch (the MoAS code's) draws starts in [0, len - block - 1], the last window
    included; moas_table1/ asks for it, other runs keep their draws (one offset fewer)."""
    from moa_train.data.batches import RandomWindows

    tokens = torch.arange(12).numpy()  # block 8: starts 0..3
    seen = {}
    for last in (False, True):
        w = RandomWindows(tokens, 64, 8, 0, torch.device("cpu"), last_start=last)
        seen[last] = {int(s) for _ in range(20) for s in w.next_starts()}
    assert seen[True] == {0, 1, 2, 3} and seen[False] == {0, 1, 2}
    assert make_cfg("experiment=moas_table1/moas_dynamic").trainer.sample_last_window is True
    assert make_cfg("model=moas_dynamic").trainer.sample_last_window is False
