"""moas_kv (models/attention/moas_kv.py): each query head reads, per past token, the head that token
stored; its head-pool cache (HeadPool) stores what the routing says and its realised bytes are its
used slots; the overflow policy; the budget loss on a tiny run; the command
line trains and generates. Prefill + cached decoding against the full forward (rows of different
lengths, no host sync, one compiled graph): tests/test_kv_cache.py."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import REPO, run_main
from moa_train import config
from moa_train.models.attention.moas_kv import MoASKVAttention
from moa_train.models.kv_cache import DecodeState, kv_bytes_per_token
from moa_train.models.lm import LanguageModel
from moa_train.models.routing import aux_losses, routing_metrics

VOCAB, D, H, G = 50, 32, 4, 2
MHA, GQA, MQA = 0, 1, 2


class FixedRouter(torch.nn.Module):
    """Router logits that force scheme `schemes[t]` on the token at position t (of every row)."""

    def __init__(self, schemes: list):
        super().__init__()
        self.schemes = torch.tensor(schemes)

    def forward(self, x):
        return 10.0 * F.one_hot(self.schemes[: x.shape[1]], 3).float().expand(x.shape[0], -1, -1)


def attention(seed: int = 0, **keys) -> MoASKVAttention:
    torch.manual_seed(seed)
    return MoASKVAttention(D, H, G, **keys).eval()


def by_hand(attn: MoASKVAttention, x: torch.Tensor, schemes: list) -> torch.Tensor:
    """The layer's output computed loop by loop: query head h at position i reads, for each past
    token j, the head j stored for h under its scheme: j's own head h, the mean of its heads in h's
    group, or the mean of all."""
    b, t, _ = x.shape
    dh = D // H
    q, k, v = (part.view(b, t, H, dh) for part in attn.c_attn(x).chunk(3, -1))

    def stored(kv, j, h):
        if schemes[j] == MHA:
            return kv[:, j, h]
        if schemes[j] == GQA:
            size = H // G
            return kv[:, j, (h // size) * size : (h // size + 1) * size].mean(1)
        return kv[:, j].mean(1)

    out = torch.zeros(b, t, H, dh)
    for i in range(t):
        for h in range(H):
            keys = torch.stack([stored(k, j, h) for j in range(i + 1)], 1)  # (B, i + 1, dh)
            values = torch.stack([stored(v, j, h) for j in range(i + 1)], 1)
            w = ((keys @ q[:, i, h, :, None])[..., 0] / math.sqrt(dh)).softmax(-1)
            out[:, i, h] = (w[..., None] * values).sum(1)
    return attn.c_proj(out.view(b, t, D))


def test_each_query_head_reads_what_each_past_token_stored():
    schemes = [MHA, GQA, MQA, GQA, MHA, MQA, MQA, MHA]
    attn = attention()
    attn.router = FixedRouter(schemes)
    x = torch.randn(2, len(schemes), D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = by_hand(attn, x, schemes)
        y, routing = attn(x)
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
        assert routing.chosen[:, 0].tolist() == schemes * 2
        # the cache: prefill of the first 5, then one token at a time, through a head pool
        state = DecodeState(torch.zeros(2, dtype=torch.int64), 12)
        pool = attn.kv_cache = attn.make_cache(state, "cpu", torch.float32)
        steps = [attn(x[:, :5])[0]]
        state.lengths += 5
        for t in range(5, len(schemes)):
            attn.router = FixedRouter(schemes[t : t + 1])
            steps.append(attn(x[:, t : t + 1])[0])
            state.lengths += 1
        attn.kv_cache = None
    torch.testing.assert_close(torch.cat(steps, 1), expected, atol=1e-5, rtol=0)
    heads = [(H, G, 1)[s] for s in schemes]
    assert pool.scheme[0, :8].tolist() == schemes
    # each token's heads follow the last's
    assert pool.offset[0, :8].tolist() == [sum(heads[:i]) for i in range(8)]
    assert pool.used_slots(torch.tensor([8, 8])).tolist() == [sum(heads)] * 2


def build(seed: int = 0, **keys) -> LanguageModel:
    m = OmegaConf.structured(
        config.VARIANTS["moas_kv"](
            name="moas_kv", d_model=D, n_layer=2, n_head=H, max_seq_len=32, dropout=0.0, **keys
        )
    )
    torch.manual_seed(seed)
    lm = LanguageModel(m, VOCAB).eval()
    for name, p in lm.named_parameters():
        if ".router" in name:  # a preference per token, so every scheme is chosen
            torch.nn.init.normal_(p, std=0.5)
    return lm


def tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_realised_bytes_are_the_used_slots_of_the_routed_heads(dtype):
    lm = build(kv_budget=2.0, kv_pool_slack=2.0)  # a pool of n_head x max_len: nothing falls back
    idx, lengths = tokens(3, 12), torch.tensor([12, 7, 3])
    with torch.no_grad():
        _, routings = lm(idx)
        cache = lm.init_cache(3, 16, dtype=dtype)
        lm.prefill(idx, lengths, cache)
    real = (torch.arange(12) < lengths[:, None]).flatten()
    heads = [
        lm.blocks[i].attn.stored_heads[r.chosen[:, 0]][real].mean() for i, r in enumerate(routings)
    ]
    assert all(len(r.chosen[:, 0].unique()) == 3 for r in routings)  # every scheme is used
    head_bytes = 2 * (D // H) * dtype.itemsize
    assert cache.realised_bytes_per_token() == pytest.approx(float(sum(heads)) * head_bytes)
    for layer, routing in zip(cache.self_layers(), routings, strict=True):
        used = lm.blocks[0].attn.stored_heads[routing.chosen[:, 0]].view(3, 12)
        assert layer.used_slots(lengths).tolist() == [
            int(used[r, :n].sum()) for r, n in enumerate(lengths)
        ]
    assert cache.overflow() == 0
    # the analytic figure from the routing records of the rows' real tokens alone
    with torch.no_grad():
        _, alone = lm(idx[:1])
    single = lm.init_cache(1, 16, dtype=dtype)
    with torch.no_grad():
        lm.prefill(idx[:1], torch.tensor([12]), single)
    assert single.realised_bytes_per_token() == pytest.approx(kv_bytes_per_token(lm, dtype, alone))
    # without records: the budget
    assert kv_bytes_per_token(lm, dtype) == 2 * 2 * 2.0 * (D // H) * dtype.itemsize
    # the pool: ceil(slack x budget x max_len) = 64 slots per row and layer
    assert cache.nbytes() == 2 * 3 * 64 * head_bytes
    # the analytic figure: the budget
    assert lm.blocks[0].attn.kv_cache_elems_per_token() == 2 * 2.0 * (D // H)


def test_a_full_pool_stores_the_fallback_scheme_and_counts_it():
    """Every token routed to MHA (4 heads) in a pool of max_len + 3 slots: the first token keeps MHA
    (it leaves one slot for each later position), every later one falls back to MQA, in prefill and
    in decode steps."""
    lm = build(kv_budget=1.0, kv_pool_slack=1.0)
    forced = build(kv_budget=1.0, kv_pool_slack=1.0)
    for block in lm.blocks:
        block.attn.router = FixedRouter([MHA] * 32)
    for block in forced.blocks:
        block.attn.router = FixedRouter([MHA] + [MQA] * 31)
    max_len, idx = 8, tokens(2, 8, seed=4)
    for block in lm.blocks:  # budget 1: slack x budget x max_len = max_len + 3 slots
        block.attn.kv_pool_slack = 1 + 3 / max_len
    with torch.no_grad():
        cache = lm.init_cache(2, max_len)
        assert cache.self_layers()[0].slots == max_len + 3
        steps = [lm.prefill(idx[:, :5], torch.tensor([5, 5]), cache)]
        steps += [lm.decode_step(idx[:, t], cache) for t in range(5, 8)]
        expected, _ = forced(idx)
    pool = cache.self_layers()[0]
    assert pool.scheme[0].tolist() == [MHA] + [MQA] * 7
    assert pool.offset[0].tolist() == [0, 4, 5, 6, 7, 8, 9, 10]
    assert cache.overflow() == 2 * 2 * 7  # 2 layers x 2 rows x 7 tokens
    assert cache.realised_bytes_per_token() == pytest.approx(2 * (4 + 7) / 8 * pool.head_bytes())
    torch.testing.assert_close(torch.stack(steps, 1), expected[:, 4:], atol=1e-5, rtol=0)


def test_generation_reports_the_fallbacks_once():
    from moa_train.generation import _generate_ids

    lm = build(kv_budget=1.0, kv_pool_slack=1.0)
    for block in lm.blocks:
        block.attn.router = FixedRouter([MHA] * 32)
    notes = []
    _generate_ids(
        lm, [[1, 2, 3], [4]], 6, True, lambda logits: logits.argmax(-1), warn=notes.append
    )
    assert (
        len(notes) == 1
        and "overflowed the KV head pool" in notes[0]
        and "kv_pool_slack" in notes[0]
    )
    notes.clear()
    _generate_ids(
        build(), [[1, 2, 3]], 6, True, lambda logits: logits.argmax(-1), warn=notes.append
    )
    assert notes == []  # no budget: a pool of n_head x max_len never overflows


def test_budget_term_is_the_straight_through_mean_of_stored_heads():
    lm = build(kv_budget=1.5).train()
    _, routings = lm(tokens(2, 16))
    aux = aux_losses(routings, OmegaConf.structured(config.AuxConfig()))
    chosen = torch.stack([r.chosen[:, 0] for r in routings])
    heads = lm.blocks[0].attn.stored_heads[chosen].mean()
    assert aux["kv_heads"].item() == pytest.approx(heads.item())
    assert aux["kv_budget"].item() == pytest.approx(max(0.0, heads.item() - 1.5) ** 2)
    aux["kv_budget"].backward()  # the gradient reaches the routers through the probabilities
    assert all(block.attn.router.weight.grad.abs().sum() > 0 for block in lm.blocks)
    metrics = routing_metrics(lm.sites, routings)
    for site in lm.sites:
        util = [metrics[f"routing/util/{site}/{name}"] for name in ("mha", "gqa", "mqa")]
        assert sum(util).item() == pytest.approx(1.0)


def test_soft_inference_mixes_and_hard_reads_one_scheme():
    hard = build(seed=3)
    soft = build(seed=3, inference_routing="soft")
    idx = tokens(2, 10, seed=5)
    with torch.no_grad():
        a, _ = hard(idx)
        b, _ = soft(idx)
    assert (a - b).abs().max() > 1e-4


def test_validation_names_the_key():
    m = OmegaConf.structured(
        config.VARIANTS["moas_kv"](name="moas_kv", n_head=4, d_model=32, kv_budget=5)
    )
    with pytest.raises(
        config.ConfigError, match=r"model.kv_budget: must be null or in \[1, model.n_head=4\]"
    ):
        config.VARIANTS["moas_kv"].validate(m, None)


def test_the_budget_loss_pulls_the_stored_heads_to_the_budget(train_run, tmp_path):
    steps = 60
    _, records = train_run(
        tmp_path,
        "model=moas_kv",
        "model.n_head=4",
        "model.kv_budget=1.2",
        "model.aux.kv_budget_coef=1.0",
        f"trainer.max_steps={steps}",
        "optim.lr=3e-3",
        "trainer.log_interval=5",
        "trainer.eval_interval=30",
    )
    train = [r for r in records if "train/loss" in r]
    assert train[-1]["train/loss"] < train[0]["train/loss"] - 0.5
    heads = [r["train/aux/kv_heads"] for r in train]
    # from about (4 + 2 + 1) / 3 to near the budget 1.2
    assert heads[0] > 1.8 and heads[-1] < 1.35, heads
    assert train[-1]["train/aux/kv_budget"] < train[0]["train/aux/kv_budget"] / 10
    for site in ("layer0", "layer1"):
        assert {f"routing/util/{site}/{name}" for name in ("mha", "gqa", "mqa")} <= set(train[-1])


def test_the_command_line_trains_and_generates(monkeypatch, capsys, tmp_path):
    run = tmp_path / "run"
    code, out, _ = run_main(
        [
            "debug=tiny",
            "trainer.device=cpu",
            "model=moas_kv",
            "model.kv_budget=1.5",
            "trainer.max_steps=6",
            "trainer.eval_interval=6",
            f"hydra.run.dir={run}",
        ],
        monkeypatch,
        capsys,
    )
    assert code in (0, None), out
    gen = subprocess.run(
        [
            sys.executable,
            "-m",
            "moa_train.generation",
            str(run),
            "--prompt",
            "The ",
            "--max-new-tokens",
            "12",
            "--greedy",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("The ") and len(gen.stdout) > len("The \n")


def test_a_decode_step_reads_the_pool_without_an_n_head_view_of_it():
    """HeadPool.attend scores the slots and picks each position's score, instead of gathering a (B,
    n_head, max_len, head_dim) view of K and V (MHA's cache traffic at every step): no op of a
    decode step makes a tensor that big (views and in-place writes aside), and the result still
    equals the full forward (test_kv_cache)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    lm = build(kv_budget=1.5, kv_pool_slack=1.0)
    b, max_len = 2, 24
    view = b * H * max_len * (D // H)

    class Sizes(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # new memory: no view, no in-place write
            if all(r.alias_info is None for r in func._schema.returns):
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor):
                        Sizes.biggest = max(Sizes.biggest, t.numel())
            return out

    cache = lm.init_cache(b, max_len)
    with torch.no_grad():
        lm.prefill(tokens(b, 6), torch.tensor([6, 4]), cache)
        with Sizes():
            lm.decode_step(tokens(b, 1, seed=5)[:, 0], cache)
    assert 0 < Sizes.biggest < view
