"""Cached inference (models/kv_cache.py): prefill + one-token decode steps give the full forward's
logits for every attention variant, rows of different lengths stay independent, the cache holds what
each variant declares, MoAS top1 routing, and a decode step with no host sync. CPU, fp32, tiny
models; logits compared with atol 1e-5."""

from __future__ import annotations

import re
import time
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from moa_train import config
from moa_train.config import ConfigError
from moa_train.models.attention.moas import MoASAttention, MoASDynamicConfig
from moa_train.models.kv_cache import kv_bytes_per_token
from moa_train.models.lm import LanguageModel

VOCAB, D, H, MAX_SEQ, ATOL = 50, 32, 4, 32, 1e-5

# name -> (registered variant, its keys); every registered variant, MoA with k < E and k = E
VARIANTS = {
    "mha": ("mha", {}),
    "gqa": ("gqa", {"n_kv_heads": 2}),
    "mqa": ("mqa", {"n_kv_heads": 1}),
    "moas_static": ("moas_static", {}),
    "moas_static_plain": ("moas_static", {"fused": False}),
    "moas_dynamic": ("moas_dynamic", {}),
    "moas_dynamic_bias": ("moas_dynamic", {"bias": True}),
    "moas_dynamic_top1": ("moas_dynamic", {"inference_routing": "top1"}),
    "moa_topk": ("moa", {"n_experts": 4, "top_k": 2}),
    "moa_all": ("moa", {"n_experts": 4, "top_k": 4}),
    "moa_kv2": ("moa", {"n_experts": 4, "top_k": 2, "n_kv_heads": 2, "head_dim": 4, "bias": True}),
    # a pool of n_head x max_len slots (2 x budget 2): no token falls back, so the cache equals the
    # full forward
    "moas_kv": ("moas_kv", {"kv_budget": 2.0, "kv_pool_slack": 2.0}),
}
# K/V heads cached per layer: MoAS every branch's (H + G + 1), gqa G, mqa 1, moa its shared
# n_kv_heads (moas_kv's pooled cache: tests/test_moas_kv.py)
CACHED_HEADS = {
    "mha": H,
    "gqa": 2,
    "mqa": 1,
    "moas_static": H + 2 + 1,
    "moas_static_plain": H + 2 + 1,
    "moas_dynamic": H + 2 + 1,
    "moas_dynamic_bias": H + 2 + 1,
    "moas_dynamic_top1": H + 2 + 1,
    "moa_topk": 1,
    "moa_all": 1,
    "moa_kv2": 2,
}


def build(variant: str, seed: int = 0, **overrides) -> LanguageModel:
    name, keys = VARIANTS[variant]
    m = OmegaConf.structured(
        config.VARIANTS[name](
            name=name,
            d_model=D,
            n_layer=2,
            n_head=H,
            max_seq_len=MAX_SEQ,
            dropout=0.0,
            **{**keys, **overrides},
        )
    )
    torch.manual_seed(seed)
    lm = LanguageModel(m, VOCAB).eval()
    # routers start at zero (MoA): give them a preference per token
    for pname, p in lm.named_parameters():
        if ".router" in pname:
            torch.nn.init.normal_(p, std=0.5)
    return lm


def tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def cached_logits(lm: LanguageModel, idx: torch.Tensor, lengths: list, max_len: int = 24) -> list:
    """Per row: the logits (n, V) after each token from its last prompt token on: prefill of the
    right-padded prompts (row r's prompt is idx[r, :lengths[r]]), then one decode step per remaining
    column of idx."""
    b, t = idx.shape
    width = max(lengths)
    prompts = idx[:, :width].clone()
    for r, n in enumerate(lengths):
        prompts[r, n:] = 0  # padding: any token, never attended
    cache = lm.init_cache(b, max_len)
    steps = [lm.prefill(prompts, torch.tensor(lengths), cache)]
    columns = torch.tensor(lengths)[:, None] + torch.arange(t - width)
    # row r decodes its own next tokens idx[r, lengths[r] + j], one step after the other
    for j in range(t - width):
        steps.append(lm.decode_step(idx.gather(1, columns[:, j : j + 1])[:, 0], cache))  # noqa: PERF401
    assert cache.lengths.tolist() == [n + t - width for n in lengths]
    out = torch.stack(steps, 1)
    return [out[r] for r in range(b)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefill_and_decode_equal_full_forward(variant):
    lm = build(variant)
    idx = tokens(2, 14)
    with torch.no_grad():
        full, _ = lm(idx)
    for r, got in enumerate(cached_logits(lm, idx, [5, 5])):
        torch.testing.assert_close(got, full[r, 4:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_batch_of_different_lengths_gives_each_prompts_logits(variant):
    lm = build(variant, seed=2)
    lengths, t = [3, 7, 1], 12
    idx = tokens(3, t, seed=3)
    got = cached_logits(lm, idx, lengths)
    for r, n in enumerate(lengths):
        # the row's prompt and the tokens it decoded, alone
        row = idx[r : r + 1, : n + t - max(lengths)]
        with torch.no_grad():
            alone, _ = lm(row)
        torch.testing.assert_close(got[r], alone[0, n - 1 :], atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decode_over_a_span_equals_decode_over_the_whole_cache(variant):
    """decode_step(span=s) attends over (and writes into) the cache's first s positions: the same
    logits and cache as over all max_len, with s just above the largest position (what moa-generate
    passes) or a bucket above it."""
    lm = build(variant)
    idx, lengths = tokens(2, 12, seed=4), torch.tensor([3, 6])
    caches = [lm.init_cache(2, 24) for _ in range(3)]
    with torch.no_grad():
        for cache in caches:
            lm.prefill(idx[:, :6], lengths, cache)
        for j in range(5):
            token = idx[:, 6 + j]
            whole = lm.decode_step(token, caches[0])
            torch.testing.assert_close(
                lm.decode_step(token, caches[1], span=7 + j), whole, atol=ATOL, rtol=0
            )
            torch.testing.assert_close(
                lm.decode_step(token, caches[2], span=16), whole, atol=ATOL, rtol=0
            )
    for cache in caches[1:]:
        assert torch.equal(cache.lengths, caches[0].lengths)
        for a, b in zip(cache.k + cache.v, caches[0].k + caches[0].v, strict=True):
            # later layers' K/V differ in the last bits: the attention before them reduced over
            # fewer positions
            torch.testing.assert_close(getattr(a, "k", a), getattr(b, "k", b), atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["mha", "moas_dynamic", "moas_dynamic_top1", "moa_topk"])
def test_decode_over_a_span_writes_into_the_whole_cache(variant, monkeypatch):
    """The span narrows what attention READS; writes go to the whole cache tensors, never to views
    of their first positions, which inductor compiled into copies of the views out and back
    (kv_cache.write_kv)."""
    from moa_train.models import kv_cache

    lm = build(variant)
    cache = lm.init_cache(2, 16)
    written = []
    original = kv_cache.write_kv
    monkeypatch.setattr(
        kv_cache, "write_kv", lambda c, new, pos: (written.append(c), original(c, new, pos))
    )
    with torch.no_grad():
        lm.prefill(tokens(2, 5), torch.tensor([5, 5]), cache)
        written.clear()
        lm.decode_step(tokens(2, 1)[:, 0], cache, span=8)
    assert written and all(c.shape[2] == 16 and c.is_contiguous() for c in written)


def test_decode_span_outside_the_cache_is_refused():
    lm = build("mha")
    cache = lm.init_cache(1, 8)
    with torch.no_grad():
        lm.prefill(tokens(1, 3), torch.tensor([3]), cache)
        for span in (0, 9):
            with pytest.raises(ValueError, match=rf"span={span} must lie in 1\.\.8"):
                lm.decode_step(torch.tensor([1]), cache, span=span)


def test_decode_span_reads_only_its_positions():
    """Positions at and past the span are never read: garbage there leaves the logits unchanged."""
    lm = build("moas_dynamic")
    idx = tokens(1, 6, seed=5)
    clean, dirty = lm.init_cache(1, 16), lm.init_cache(1, 16)
    with torch.no_grad():
        for cache in (clean, dirty):
            lm.prefill(idx[:, :5], torch.tensor([5]), cache)
        for k, v in zip(dirty.k, dirty.v, strict=True):
            k[:, :, 6:] = float("nan")
            v[:, :, 6:] = float("nan")
        torch.testing.assert_close(
            lm.decode_step(idx[:, 5], dirty, span=6),
            lm.decode_step(idx[:, 5], clean),
            atol=ATOL,
            rtol=0,
        )


@pytest.mark.parametrize("variant", sorted(CACHED_HEADS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_per_token_match_the_cache(variant, dtype):
    lm = build(variant)
    batch, max_len = 3, 10
    cache = lm.init_cache(batch, max_len, dtype=dtype)
    assert cache.nbytes() / max_len / batch == kv_bytes_per_token(lm, dtype)
    head_dim = lm.blocks[0].attn.kv_layout()[1]
    # 2 layers
    assert (
        kv_bytes_per_token(lm, dtype) == 2 * 2 * CACHED_HEADS[variant] * head_dim * dtype.itemsize
    )
    assert all(
        k.shape == (batch, CACHED_HEADS[variant], max_len, head_dim) and k.dtype == dtype
        for k in cache.k
    )


def test_init_cache_longer_than_max_seq_len_is_refused():
    lm = build("mha")
    with pytest.raises(ValueError, match=re.escape("model.max_seq_len=32")) as err:
        lm.init_cache(1, MAX_SEQ + 1)
    assert "\n" not in str(err.value)
    assert lm.init_cache(1, MAX_SEQ).max_len == MAX_SEQ


def test_inference_routing_is_validated():
    m = OmegaConf.structured(MoASDynamicConfig(name="moas_dynamic", inference_routing="top2"))
    with pytest.raises(
        ConfigError, match=re.escape("model.inference_routing: got 'top2'; allowed: soft, top1")
    ):
        MoASDynamicConfig.validate(m, None)


def moas_modules(lm: LanguageModel) -> list:
    return [module for module in lm.modules() if isinstance(module, MoASAttention)]


def test_top1_equals_soft_when_the_router_is_one_hot():
    soft = build("moas_dynamic", seed=4)
    with torch.no_grad():
        for module in moas_modules(soft):
            module.router[2].weight.mul_(1e4)  # the softmax saturates to exactly one branch in fp32
    top1 = build("moas_dynamic_top1", seed=4)
    top1.load_state_dict(soft.state_dict())
    idx = tokens(2, 14, seed=5)
    with torch.no_grad():
        full, routings = soft(idx)
    probs = torch.cat([r.probs for r in routings])
    assert probs.max(-1).values.eq(1.0).all() and probs.eq(0.0).sum(-1).eq(2).all()  # one-hot
    assert len(probs.argmax(-1).unique()) > 1  # tokens pick different branches
    with torch.no_grad():
        torch.testing.assert_close(top1(idx)[0], full, atol=ATOL, rtol=0)
    assert_cached_logits_match(top1, idx, [4, 6], full)


def assert_cached_logits_match(
    lm: LanguageModel, idx: torch.Tensor, lengths: list, full: torch.Tensor
) -> None:
    """Each row's cached logits (prompt of lengths[r] tokens, then decode steps) against the full
    forward's."""
    for r, got in enumerate(cached_logits(lm, idx, lengths)):
        n = lengths[r]
        torch.testing.assert_close(got, full[r, n - 1 : n - 1 + len(got)], atol=ATOL, rtol=0)


def test_top1_on_a_normal_router_is_the_argmax_branch_alone(monkeypatch):
    top1 = build("moas_dynamic_top1", seed=6)
    # soft, with its gates forced to the one-hot of the router's argmax
    forced = build("moas_dynamic", seed=6)
    forced.load_state_dict(top1.state_dict())
    for module in moas_modules(forced):

        def one_hot_gates(x, top1=False, gates=module.gates):
            g, routing = gates(x)
            return F.one_hot(g.argmax(-1), 3).to(g.dtype), routing

        monkeypatch.setattr(module, "gates", one_hot_gates)
    idx = tokens(2, 14, seed=7)
    with torch.no_grad():
        expected, routings = forced(idx)
        soft, _ = build("moas_dynamic", seed=6)(idx)
    probs = torch.cat([r.probs for r in routings])
    # mixtures; every branch chosen
    assert probs.max(-1).values.median() < 0.9 and len(probs.argmax(-1).unique()) == 3
    assert (soft - expected).abs().max() > 1e-3  # top1 is not soft
    with torch.no_grad():
        torch.testing.assert_close(top1(idx)[0], expected, atol=ATOL, rtol=0)
    # the decode steps run top1's own one-token path (the chosen branch's weights and cache heads
    # only)
    assert_cached_logits_match(top1, idx, [3, 5], expected)


class NoHostSync(TorchDispatchMode):
    """Fails on every op that reads a tensor on the host (.item(), bool(), int():
    _local_scalar_dense; on CPU .tolist() reads memory without an op) or makes an output shape
    depend on data."""

    SYNCS: ClassVar[dict] = {
        "_local_scalar_dense",
        "nonzero",
        "masked_select",
        "unique",
        "_unique",
        "_unique2",
        "unique_consecutive",
        "unique_dim",
    }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert func.overloadpacket.__name__ not in self.SYNCS, (
            f"host sync in the decode step: {func}"
        )
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decode_step_has_no_host_sync(variant):
    lm = build(variant)
    idx = tokens(2, 8, seed=8)
    cache = lm.init_cache(2, 16)
    with torch.no_grad():
        lm.prefill(idx[:, :5], torch.tensor([3, 5]), cache)
        with NoHostSync():
            lm.decode_step(idx[:, 5], cache)
            lm.decode_step(idx[:, 6], cache)
        # the check itself sees a sync
        with pytest.raises(AssertionError, match="host sync"), NoHostSync():
            cache.lengths[0].item()


@pytest.mark.parametrize(
    "variant", ["mha", "moas_dynamic", "moas_dynamic_top1", "moa_topk", "moa_all", "moas_kv"]
)
def test_decode_step_compiles_in_one_graph(variant):
    """torch.compile(fullgraph=True) of the decode step (backend eager: tracing only) gives the
    eager logits."""
    lm = build(variant)
    idx = tokens(2, 8, seed=8)
    lengths = torch.tensor([3, 5])
    step = torch.compile(lm.decode_step, fullgraph=True, backend="eager")
    caches = [lm.init_cache(2, 16), lm.init_cache(2, 16)]
    start = time.monotonic()
    with torch.no_grad():
        for cache in caches:
            lm.prefill(idx[:, :5], lengths, cache)
        for j in range(2):
            token = idx[:, 5 + j]
            torch.testing.assert_close(
                step(token, caches[0]), lm.decode_step(token, caches[1]), atol=ATOL, rtol=0
            )
            if time.monotonic() - start > 20:
                pytest.skip("compiling the decode step took over 20 s")
    assert torch.equal(caches[0].lengths, caches[1].lengths)
    keys = [[getattr(k, "k", k) for k in cache.k] for cache in caches]  # a HeadPool's head slots
    torch.testing.assert_close(keys[0], keys[1], atol=0, rtol=0)


# inductor's imports
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_cache_write_touches_only_the_new_entries():
    """write_kv compiled by inductor (CPU code here) stores the new entries alone: no loop over the
    whole cache, which a scatter_ compiled into (a copy of the cache and a copy back, at every
    decode step: docs/results/inference.md)."""
    import shutil

    from torch._inductor.utils import run_and_get_code

    from moa_train.models.kv_cache import write_kv

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor's CPU code needs a C++ compiler")
    b, h, length, d = 3, 5, 37, 8  # numel 4440: a number no other loop of this function has
    cache, want = torch.zeros(b, h, length, d), torch.zeros(b, h, length, d)
    new, positions = torch.randn(b, h, 1, d), torch.tensor([[4], [0], [36]])
    write_kv(want, new, positions)
    torch._dynamo.reset()
    _, code = run_and_get_code(
        torch.compile(write_kv, fullgraph=True, dynamic=False), cache, new, positions
    )
    assert torch.equal(cache, want)
    # CPU loops read `x0<static_cast<int64_t>(4440L)`
    assert f"{b * h * length * d}L" not in "\n".join(code)


# inductor's imports
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("variant", ["mha", "moas_dynamic"])
def test_compiled_decode_over_a_span_copies_no_view_of_the_cache(variant):
    """decode_step(span=11) compiled by inductor (CPU code): no loop runs over span x head_dim (88)
    elements, which the copies of a (B, H, span, D) view of the cache around each write did (handing
    views down to the attention modules: 1.6 ms of a 2.0 ms step at batch 64 on an H200,
    kv_cache.write_kv); writes and the mask use other extents."""
    import re
    import shutil

    from torch._inductor.utils import run_and_get_code

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor's CPU code needs a C++ compiler")
    lm, span = build(variant), 11
    cache = lm.init_cache(2, 16)
    torch._dynamo.reset()
    with torch.no_grad():
        lm.prefill(tokens(2, 5), torch.tensor([5, 5]), cache)
        _, code = run_and_get_code(
            torch.compile(lm.decode_step, fullgraph=True, dynamic=False),
            tokens(2, 1)[:, 0],
            cache,
            span,
        )
    extents = set(re.findall(r"<static_cast<int64_t>\((\d+)L\)", "\n".join(code)))
    assert str(span) in extents  # the mask's loop: the span reached the compiled code
    assert str(span * (D // H)) not in extents


def test_moas_decode_reads_the_cache_without_expanding_it(monkeypatch):
    """MoAS decode steps (soft and top1) attend each branch's cache heads through SDPA's GQA:
    repeat_kv, which copies the cache into 3 n_head heads, is never called (it made a third of a
    GPT-2-size step at batch 64)."""
    for variant in ("moas_dynamic", "moas_dynamic_top1", "moas_static"):
        lm = build(variant)
        idx = tokens(2, 8, seed=8)
        cache = lm.init_cache(2, 16)
        with torch.no_grad():
            lm.prefill(idx[:, :5], torch.tensor([3, 5]), cache)
            monkeypatch.setattr(
                MoASAttention, "repeat_kv", lambda *a: pytest.fail("the cache was expanded")
            )
            lm.decode_step(idx[:, 5], cache)
            monkeypatch.undo()
