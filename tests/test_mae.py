"""mae (Mixture of Attentive Experts): the per-head-weight form equals the naive sum over the h
drop-one-head experts, a uniform gate is MHA, the causal prefix-mean gate reads no future token,
decoding through the cache equals the full forward, and a tiny CLI run trains."""

from __future__ import annotations

import pytest
import torch

from conftest import read_jsonl
from moa_train.models import build_model
from moa_train.models.attention.mae import MixtureOfAttentiveExperts
from moa_train.models.attention.mha import MultiHeadAttention, merge_heads, sdpa
from moa_train.models.conformance import check_decoding

D, H, B, T = 32, 4, 2, 10


def mae(causal: bool = True, seed: int = 0, gate_std: float = 1.0, **keys):
    torch.manual_seed(seed)
    m = MixtureOfAttentiveExperts(D, H, 16, causal=causal, **keys).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=gate_std if p in set(m.gate_out.parameters()) else 0.3)
    return m


def x_of(seed: int = 1, t: int = T) -> torch.Tensor:
    return torch.randn(B, t, D, generator=torch.Generator().manual_seed(seed))


def naive_experts(m: MixtureOfAttentiveExperts, x: torch.Tensor, mask=None) -> torch.Tensor:
    """sum_i g_i * f_i(x), f_i = MHA with head i dropped and the others scaled by h/(h-1): h
    separate expert outputs, each through the output projection."""
    g, _ = m.responsibilities(x, mask)
    q, k, v = m.project(x, None)
    heads = sdpa(q, k, v, mask, m.causal, 0.0)  # (B, h, T, D/h)
    out = 0
    for i in range(H):
        keep = torch.ones(H)
        keep[i] = 0.0
        f_i = m.c_proj(merge_heads(heads * keep[:, None, None] * H / (H - 1)))
        out = out + g[..., i : i + 1] * f_i
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_one_mha_with_head_weights_equals_the_sum_over_the_h_experts(causal):
    m = mae(causal, bias=True)
    x = x_of()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 6:] = False
    for mk in (None, mask):
        with torch.no_grad():
            y, routing = m(x, mask=mk)
            want = naive_experts(m, x, mk)
        # the gate is far from uniform, or the test would not tell the forms apart
        assert routing.probs.max() > 0.5
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_a_uniform_gate_is_mha_to_rounding(causal):
    m = mae(causal, bias=True)
    m.post_init()  # zero output layer: g = 1/h for every token
    mha = MultiHeadAttention(D, H, bias=True, causal=causal).eval()
    mha.load_state_dict(
        {k: v for k, v in m.state_dict().items() if not k.startswith("gate_")}, strict=True
    )
    x = x_of()
    with torch.no_grad():
        y, routing = m(x)
        want, _ = mha(x)
    torch.testing.assert_close(routing.probs, torch.full((B * T, H), 1.0 / H))
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-6)


def test_the_built_model_starts_as_mha():
    """init_weights zeroes every gate's output layer (post_init): uniform responsibilities."""
    from omegaconf import OmegaConf

    from moa_train.config import VARIANTS

    cfg = OmegaConf.merge(
        OmegaConf.structured(VARIANTS["mae"]),
        {"name": "mae", "d_model": D, "n_layer": 2, "n_head": H, "max_seq_len": 16},
    )
    lm = build_model(cfg, 50)
    _, routings = lm(torch.randint(0, 50, (B, 8)))
    for r in routings:
        torch.testing.assert_close(r.probs, torch.full_like(r.probs, 1.0 / H))
        assert r.choice_names == ("0", "1", "2", "3")


@pytest.mark.parametrize("t", [1, 4, T - 1])
def test_the_causal_prefix_mean_reads_no_later_token(t):
    m = mae(causal=True)
    x = x_of()
    x2 = x.clone()
    x2[:, t:] = torch.randn(B, T - t, D)
    with torch.no_grad():
        (a, ra), (b, rb) = m(x), m(x2)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:], atol=1e-4)
    # the gate itself moves with later tokens at later positions only
    ga, gb = ra.probs.view(B, T, H), rb.probs.view(B, T, H)
    torch.testing.assert_close(ga[:, :t], gb[:, :t])
    assert not torch.allclose(ga[:, t:], gb[:, t:], atol=1e-4)


def test_the_encoder_gate_is_the_mean_over_real_tokens():
    """Non-causal: one responsibility vector per sequence, unchanged by what padding holds."""
    m = mae(causal=False)
    x = x_of()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, 7:] = False
    x2 = x.clone()
    x2[:, 7:] = 100.0
    with torch.no_grad():
        (a, ra), (b, rb) = m(x, mask=mask), m(x2, mask=mask)
    g = ra.probs.view(B, T, H)
    torch.testing.assert_close(g, g[:, :1].expand_as(g))
    torch.testing.assert_close(ra.probs, rb.probs)
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-5, rtol=1e-5)


def test_decoding_conforms():
    assert check_decoding("mae") == {"lm": "cached", "seq2seq": "cached"}
    assert check_decoding("mae", n_kv_heads=2, bias=True, gate_hidden=8)["lm"] == "cached"


def test_the_cache_holds_the_running_gate_sums():
    """Bytes: MHA's K/V plus gate_hidden fp32 sums per position; the analytic count per token."""
    m = mae()
    from moa_train.models.kv_cache import DecodeState

    state = DecodeState(torch.zeros(3, dtype=torch.int64), 12)
    cache = m.make_cache(state, "cpu", torch.float32)
    assert cache.nbytes() == 3 * 12 * (2 * D + 16) * 4
    assert m.kv_cache_elems_per_token() == 2 * D + 16
    # a right-padded prefill, then one step: the step's gate is its row's real-prefix mean
    m.kv_cache = cache
    x = x_of(t=5)[:1].expand(3, 5, D).contiguous()
    with torch.no_grad():
        m(x)
        state.lengths.copy_(torch.tensor([2, 5, 3]))
        new = x_of(seed=7, t=1)[:1].expand(3, 1, D)
        _, routing = m(new)
    m.kv_cache = None
    with torch.no_grad():
        for r, n in enumerate([2, 5, 3]):
            _, want = m(torch.cat([x[r : r + 1, :n], new[r : r + 1]], 1))
            torch.testing.assert_close(routing.probs[r], want.probs[-1], atol=1e-6, rtol=1e-6)


def test_gate_is_declared_a_router():
    from moa_train.models.roles import ROUTER, params_with

    m = mae()
    assert {id(p) for p in params_with(m, ROUTER)} == {
        id(p) for p in [*m.gate_in.parameters(), *m.gate_out.parameters()]
    }


def test_a_bad_gate_size_and_one_head_are_one_line_errors(make_cfg):
    from moa_train.config import ConfigError
    from moa_train.train.tasks import validate

    with pytest.raises(ConfigError, match=r"model\.gate_hidden"):
        validate(make_cfg("model=mae", "model.gate_hidden=0"))
    with pytest.raises(ConfigError, match=r"model\.n_head"):
        validate(make_cfg("model=mae", "model.n_head=1"))


def test_a_tiny_cli_run_trains(cli, tmp_path):
    code, out, _ = cli("model=mae", "trainer.max_steps=20")
    assert code == 0, out
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in records if "train/loss" in r]
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    assert any(k.startswith("routing/") for r in records for k in r), records[-1].keys()


def test_parameters_and_flops_are_mhas_plus_the_gate():
    from types import SimpleNamespace

    from moa_train.models.attention.mae import MAEConfig

    m, mha = mae(bias=True), MultiHeadAttention(D, H, bias=True)
    gate = (D + 1) * 16 + (16 + 1) * H
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in mha.parameters()) + gate
    keys = SimpleNamespace(d_model=D, n_head=H, n_kv_heads=None, bias=True, gate_hidden=16)
    assert MAEConfig.attention_params(keys) == sum(p.numel() for p in m.parameters())
    assert m.flops_per_token(64) == mha.flops_per_token(64) + 6 * (D * 16 + 16 * H)


# --- block coordinate descent (train/bcd.py) ---------------------------------------------------


def bcd_trainer(make_cfg, tmp_path, *overrides):
    from moa_train.train.loop import Trainer

    cfg = make_cfg(
        "trainer.device=cpu",
        "model=mae",
        "model.gate_every=4",
        "model.gate_steps=2",
        "trainer.grad_clip=1.0",
        *overrides,
    )
    return Trainer(cfg, tmp_path)


def snapshot(trainer) -> tuple:
    """(gate parameters, expert parameters) as copies."""
    gate_ids = {id(p) for p in trainer.phases.params} if trainer.phases else set()
    gate = [p.detach().clone() for p in trainer.model.parameters() if id(p) in gate_ids]
    rest = [p.detach().clone() for p in trainer.model.parameters() if id(p) not in gate_ids]
    return gate, rest


def moved(before: list, after: list) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_bcd_alternates_the_experts_and_the_gate(make_cfg, tmp_path):
    """gate_every=4, gate_steps=2: steps 0, 1 move the experts alone, steps 2, 3 the gate alone (on
    its SGD, outside AdamW's groups), and so on."""
    trainer = bcd_trainer(make_cfg, tmp_path)
    gate_ids = {id(p) for p in trainer.phases.params}
    assert gate_ids and isinstance(trainer.phases.optimizer, torch.optim.SGD)
    in_adamw = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not gate_ids & in_adamw
    assert len(in_adamw) + len(gate_ids) == len(list(trainer.model.parameters()))
    kinds = []
    for _ in range(8):
        before = snapshot(trainer)
        trainer.train_steps(1)
        after = snapshot(trainer)
        kinds.append((moved(before[0], after[0]), moved(before[1], after[1])))
    expert, gate = (False, True), (True, False)
    assert kinds == [expert, expert, gate, gate] * 2


def test_bcd_gate_step_is_plain_sgd_on_the_gate_gradient(make_cfg, tmp_path):
    """A gate step moves each gate weight by -gate_lr x its (clipped) gradient."""
    trainer = bcd_trainer(make_cfg, tmp_path, "model.gate_lr=0.5", "trainer.grad_clip=null")
    trainer.train_steps(2)  # the experts' steps
    batches = trainer.draw_batches()
    # the gradient the gate step will use, computed on the same batch
    trainer.model.zero_grad(set_to_none=True)
    loss, *_ = trainer.loss(batches[0], False)
    loss.backward()
    grads = [p.grad.clone() for p in trainer.phases.params]
    assert any(g.abs().sum() > 0 for g in grads)  # the gate's output layer has a gradient
    before = [p.detach().clone() for p in trainer.phases.params]
    trainer.model.zero_grad(set_to_none=True)
    trainer.train_steps(1, batches=batches)
    for p, b, g in zip(trainer.phases.params, before, grads, strict=True):
        torch.testing.assert_close(p.detach(), b - 0.5 * g, atol=1e-6, rtol=1e-5)


def test_joint_training_keeps_the_gate_in_adamw(make_cfg, tmp_path):
    trainer = bcd_trainer(make_cfg, tmp_path, "model.gate_training=joint")
    assert trainer.phases is None
    in_adamw = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert len(in_adamw) == len(list(trainer.model.parameters()))
    assert "router" in {g["name"] for g in trainer.optimizer.param_groups}


def test_bcd_says_in_one_line_why_no_cuda_graph(make_cfg, tmp_path, caplog):
    from moa_train.train.bcd import NO_GRAPH

    with caplog.at_level("INFO"):
        trainer = bcd_trainer(make_cfg, tmp_path, "trainer.cuda_graphs=true")
    assert not trainer.use_graph
    assert NO_GRAPH in caplog.text and "\n" not in NO_GRAPH


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.gate_training=adam", "model.gate_training"),
        ("model.gate_lr=0", "model.gate_lr"),
        ("model.gate_steps=4", "model.gate_steps"),  # gate_every=4 leaves no expert step
    ],
)
def test_bcd_keys_are_checked(make_cfg, override, key):
    from moa_train.config import ConfigError
    from moa_train.train.tasks import validate

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(make_cfg("model=mae", "model.gate_every=4", override))
