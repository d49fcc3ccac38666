"""Every fast path against its plain path on CPU (the same checks `moa-bench` runs on the GPU), the
grouped expert matmul in detail, and no graph breaks in the compiled training loss of any model."""

import pytest
import torch

from moa_train.config import ModelConfig
from moa_train.fastpaths import check_all
from moa_train.models.attention.grouped import gather_rows, grouped_mm, grouped_mm_reference
from moa_train.models.attention.moa import MixtureOfAttentionHeads


@pytest.mark.slow
def test_every_fast_path_matches_its_plain_path():
    m = ModelConfig(name="mha", d_model=32, n_layer=2, n_head=4, max_seq_len=16)
    rows = check_all(torch.device("cpu"), m, 50, 2, 16, "aot_eager")
    assert {r["path"].split(" (")[0] for r in rows} >= {
        "moas fused",
        "moa grouped experts",
        "gqa via SDPA enable_gqa",
        "torch.compile",
        "fused AdamW",
    }
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    # the checks can fail: the moa comparison really used distinct (random) routing, so a wrong sort
    # would show
    assert all(r["out_err"] < r["tol"] for r in rows)


def test_grouped_reference_is_a_per_group_matmul_with_empty_groups():
    x, w = torch.randn(9, 5), torch.randn(4, 5, 3)
    offs = torch.tensor([2, 2, 7, 9], dtype=torch.int32)  # group 1 is empty
    expected = torch.cat([x[:2] @ w[0], x[2:7] @ w[2], x[7:] @ w[3]])
    torch.testing.assert_close(grouped_mm_reference(x, w, offs), expected)
    torch.testing.assert_close(grouped_mm(x, w, offs), expected)  # CPU: the reference


def test_gather_rows_backward_is_the_gather_of_the_inverse():
    x = torch.randn(4, 3, requires_grad=True)
    # a permutation of the 8 slots (token n, copy j) = 2n + j
    order = torch.tensor([5, 0, 7, 2, 1, 6, 3, 4])
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(8))
    out = gather_rows(x, order // 2, inverse, copies=2)
    assert torch.equal(out, x.detach()[order // 2])
    w = torch.randn(8, 3)
    (out * w).sum().backward()
    expected = torch.zeros(4, 3).index_add_(0, order // 2, w)
    torch.testing.assert_close(x.grad, expected)


def moa_pair(**kw):
    dense = MixtureOfAttentionHeads(32, 6, expert_matmul="dense", **kw)
    torch.nn.init.normal_(dense.router.weight)  # distinct choices per token
    grouped = MixtureOfAttentionHeads(32, 6, expert_matmul="grouped", **kw)
    grouped.load_state_dict(dense.state_dict())
    return dense, grouped


@pytest.mark.parametrize(
    "kw",
    [
        {"top_k": 2, "head_dim": 8},
        {"top_k": 3, "head_dim": 4, "n_kv_heads": 2},
        {"top_k": 2, "head_dim": 8, "bias": True},
        {"top_k": 1, "head_dim": 8, "gating": "topk_softmax"},
        {"top_k": 6, "head_dim": 8},
    ],
)
def test_moa_grouped_equals_dense(kw):
    torch.manual_seed(0)
    dense, grouped = moa_pair(**kw)
    x = torch.randn(3, 10, 32)
    (y_d, r_d), (y_g, r_g) = dense(x), grouped(x)
    assert torch.equal(r_d.chosen, r_g.chosen)
    torch.testing.assert_close(y_g, y_d, rtol=1e-5, atol=1e-6)
    y_d.square().sum().backward()
    y_g.square().sum().backward()
    for (name, p), q in zip(dense.named_parameters(), grouped.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_moa_grouped_sort_puts_each_assignment_in_its_experts_group():
    moa = MixtureOfAttentionHeads(16, 5, top_k=2, head_dim=4)
    chosen = torch.tensor([[4, 0], [0, 2], [2, 4], [0, 1]])
    order, inverse, offs = moa.sorted_by_expert(chosen)
    assert torch.equal(order[inverse], torch.arange(8))
    experts = chosen.flatten()[order]
    assert offs.tolist() == [3, 4, 6, 6, 8]  # expert 3 is chosen by no token: an empty group
    assert experts.tolist() == sorted(experts.tolist())
    assert sorted(order.tolist()) == list(range(8))


def test_moa_auto_is_dense_where_the_grouped_kernel_does_not_run():
    moa = MixtureOfAttentionHeads(16, 8, top_k=2, head_dim=4)
    assert not moa.grouped(torch.randn(1, 2, 16))  # CPU fp32: the dense path


@pytest.mark.parametrize("model", ["mha", "gqa", "mqa", "moas_static", "moas_dynamic", "moa"])
def test_training_loss_compiles_without_graph_breaks(make_cfg, tmp_path, model):
    """Routing records, aux losses and CE trace as one graph: statistics are synced by the trainer,
    not inside."""
    from moa_train.bench.train import graph_breaks
    from moa_train.train.loop import Trainer

    trainer = Trainer(make_cfg("trainer.device=cpu", f"model={model}"), tmp_path)
    found = graph_breaks(trainer)
    assert found["graph_breaks"] == 0, found["break_reasons"]
    assert found["graphs"] == 1


@pytest.mark.parametrize(
    "top_k,gating",
    [(6, "softmax_all"), (6, "topk_softmax"), (2, "softmax_all"), (2, "topk_softmax")],
)
def test_moa_equals_a_loop_over_experts(top_k, gating):
    """The module against MoA's definition, expert by expert: y = sum over the selected experts e of
    gate_e * O_e(attention(Q_e x, K, V)); with k = E the module skips its gather and scatter."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    moa = MixtureOfAttentionHeads(32, 6, top_k=top_k, head_dim=8, gating=gating)
    torch.nn.init.normal_(moa.router.weight)
    x = torch.randn(2, 7, 32)
    y, _ = moa(x)
    gates, chosen, _ = moa.route(x)
    k, v = moa.kv_proj(x).split(8, dim=-1)
    w_q, w_o = moa.q_proj.weight.view(6, 8, 32), moa.c_proj.weight.view(32, 6, 8)
    expected = torch.zeros(14, 32)
    for e in range(6):
        o = F.scaled_dot_product_attention(
            (x @ w_q[e].T)[:, None], k[:, None], v[:, None], is_causal=True
        )
        gate = (gates * (chosen == e)).sum(-1, keepdim=True)  # 0 where e was not selected
        expected += gate * (o[:, 0].reshape(14, 8) @ w_o[:, e].T)
    torch.testing.assert_close(y.reshape(14, 32), expected, rtol=1e-5, atol=1e-6)
