"""Translation decoding through the KV cache (models/search.py, Seq2Seq.init_cache /
decode_step): for every variant allowed in translation, cached and uncached greedy and beam search
give the same hypotheses in fp32 on CPU, sentences leave the batch as they finish, and the cached
logits equal the full decoder's at every position."""

import json

import pytest
import torch
from omegaconf import OmegaConf

import moa_train.config as config
from moa_train.models import search
from moa_train.models.seq2seq import Seq2Seq

V, PAD, BOS = 60, 0, 1
# decoder self-attention x cross-attention pairs a translation model can have; MoA routers get
# random weights
VARIANTS = {
    "mha": ("mha", {}),
    "gqa": ("gqa", {"n_kv_heads": 2}),
    "mqa": ("mqa", {"n_kv_heads": 1}),
    "moa_topk": ("moa", {"n_experts": 4, "top_k": 2}),
    "moa_all": ("moa", {"n_experts": 4, "top_k": 4}),
    "moas_static": ("moas_static", {}),
    "moas_dynamic": ("moas_dynamic", {}),
    # a pool that cannot overflow: exact
    "moas_kv": ("moas_kv", {"kv_budget": 2.0, "kv_pool_slack": 2.0}),
    "mha_cross_moa": ("mha", {"cross": {"name": "moa", "n_experts": 4, "top_k": 2}}),
    "mha_postln_fairseq": (
        "mha",
        {
            "norm_first": False,
            "positions": "sinusoidal_fairseq",
            "bias": True,
            "activation": "relu",
            "init": "fairseq",
        },
    ),
    "moa_learned_positions": (
        "moa",
        {"n_experts": 4, "top_k": 2, "positions": "learned", "bias": True},
    ),
}


def build(variant: str) -> Seq2Seq:
    name, keys = VARIANTS[variant]
    keys = {"positions": "sinusoidal", **keys}
    m = OmegaConf.structured(
        config.VARIANTS[name](
            name=name,
            d_model=32,
            n_layer=2,
            n_encoder_layer=2,
            n_head=4,
            max_seq_len=40,
            dropout=0.0,
            **{k: v for k, v in keys.items() if k != "cross"},
        )
    )
    if "cross" in keys:
        m.cross = keys["cross"]
    torch.manual_seed(0)
    model = Seq2Seq(m, V, PAD).eval()
    # larger random weights than any init: an untrained model's greedy output otherwise repeats one
    # token, and the comparison would be trivial; routers too, so that routing differs per token
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 2.0 / p.shape[-1] ** 0.5)
            if "router" in pname:
                torch.nn.init.normal_(p, std=0.5)
    return model


def sources() -> tuple:
    g = torch.Generator().manual_seed(3)
    lengths = [7, 3, 9, 5, 1]
    src = torch.full((len(lengths), max(lengths)), PAD)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(3, V, (n,), generator=g)
    return src, src != PAD


def an_eos(model, src, mask) -> int:
    """A token that, taken as EOS, ends the greedy hypotheses at the most different steps (the
    untrained model's outputs decide which)."""
    never = search.greedy_search(model, src, mask, BOS, -1, PAD, 10, use_cache=False)

    def spread(t: int) -> int:
        return len({h.index(t) if t in h else len(h) for h in never})

    return max(sorted({t for h in never for t in h}), key=spread)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_and_uncached_search_give_the_same_hypotheses(variant):
    model = build(variant)
    assert model.cached_decoding_ok()
    src, mask = sources()
    eos = an_eos(model, src, mask)
    greedy = [
        search.greedy_search(model, src, mask, BOS, eos, PAD, 12, use_cache=c)
        for c in (False, True)
    ]
    assert greedy[0] == greedy[1]
    assert len({len(h) for h in greedy[0]}) > 1  # sentences finished at different steps
    beams = [
        search.beam_search(model, src, mask, BOS, eos, PAD, 12, beam=4, lenpen=0.6, use_cache=c)
        for c in (False, True)
    ]
    assert beams[0] == beams[1]
    assert (
        search.beam_search(model, src, mask, BOS, eos, PAD, 12, beam=1, use_cache=True) == greedy[1]
    )


@pytest.mark.parametrize(
    "variant", ["mha", "moa_topk", "moas_dynamic", "mha_postln_fairseq", "moas_kv"]
)
def test_cached_logits_equal_the_full_decoder_at_every_position(variant):
    model = build(variant)
    src, mask = sources()
    tgt = torch.randint(3, V, (src.shape[0], 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        memory = model.encode(src, mask)
        full = model.decode(tgt, memory, mask)
        cache = model.init_cache(memory, mask, 8)
        steps = torch.stack([model.decode_step(tgt[:, t], cache) for t in range(8)], dim=1)
        model.release_cache()
        # the full decoder again, after the cache is gone: the same logits
        torch.testing.assert_close(model.decode(tgt, memory, mask), full, atol=0, rtol=0)
    assert torch.allclose(steps, full, atol=1e-5), (steps - full).abs().max()


def test_finished_sentences_leave_the_batch(monkeypatch):
    """Each decoder call after a sentence's EOS is made for fewer rows; beam reordering gathers the
    cache."""
    model = build("mha")
    src, mask = sources()
    eos = an_eos(model, src, mask)
    rows_per_call = []
    original = model.decode_step
    monkeypatch.setattr(
        model,
        "decode_step",
        lambda tokens, cache: rows_per_call.append(len(tokens)) or original(tokens, cache),
    )
    search.greedy_search(model, src, mask, BOS, eos, PAD, 12)
    assert (
        rows_per_call[0] == 5
        and rows_per_call[-1] < 5
        and rows_per_call == sorted(rows_per_call, reverse=True)
    )
    rows_per_call.clear()
    search.beam_search(model, src, mask, BOS, eos, PAD, 12, beam=3)
    assert (
        rows_per_call[0] == 15
        and min(rows_per_call) < 15
        and all(n % 3 == 0 for n in rows_per_call)
    )


def test_a_model_without_the_contract_is_decoded_by_recomputing():
    """A cross-attention module without `cross_kv` (a plugin's) falls back to recomputing each
    prefix."""
    model = build("mha")
    src, mask = sources()
    want = search.greedy_search(model, src, mask, BOS, 2, PAD, 8, use_cache=False)

    class Plain(torch.nn.Module):  # forward only
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    for layer in model.decoder:
        layer.cross_attn = Plain(layer.cross_attn)
    assert not model.cached_decoding_ok()
    assert search.greedy_search(model, src, mask, BOS, 2, PAD, 8) == want


def test_decoding_timer_on_a_trained_run(compose_cfg, tmp_path, capsys):
    """scripts/time_translation_decoding.py on a tiny trained run: both ways decode the same
    hypotheses, the same BLEU, and the table names both times; --with-cudnn adds the bf16 pair with
    cuDNN attention allowed, and leaves decoding's backends as they were."""
    from moa_train.models import kv_cache
    from moa_train.results import decoding
    from moa_train.train.loop import train
    from test_translation_train import write_copy_corpus

    root = write_copy_corpus(tmp_path / "data")
    cfg = compose_cfg(
        "experiment=multi30k/moa",
        "debug=tiny",
        "data=wmt14_en_de",
        f"data.root={root}",
        "data.vocab_size=300",
        "trainer.device=cpu",
        "trainer.max_steps=10",
        "task.beam=2",
    )
    train(cfg, tmp_path / "run")
    out = tmp_path / "decoding.json"
    backends = list(kv_cache.DECODING_SDPA)
    decoding.main(
        [
            str(tmp_path / "run"),
            "--precisions",
            "fp32,bf16",
            "--max-sentences",
            "12",
            "--device",
            "cpu",
            "--with-cudnn",
            "--out",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["precision"], r["cudnn_attention"], r["kv_cache"]) for r in rows] == [
        (p, c, k)
        for p, c in [("fp32", False), ("bf16", False), ("bf16", True)]
        for k in (False, True)
    ]
    off, on = rows[:2]
    assert off["beam"] == on["beam"] == 2
    assert on["identical_hypotheses"] == on["sentences"] == 12 and off["bleu"] == on["bleu"]
    assert backends == kv_cache.DECODING_SDPA
    table = capsys.readouterr().out
    assert "| run | precision | cuDNN attention |" in table and "| fp32 | off | 12 | 2 |" in table
    assert "| bf16 | allowed |" in table


def test_decoding_runs_without_cudnn_attention(monkeypatch):
    """cuDNN attention builds a graph per input shape and decoding changes shape every step
    (kv_cache.DECODING_SDPA): every decoder call of greedy and beam search, cached or not, runs with
    it disabled, and it is back on after."""
    model = build("mha")
    src, mask = sources()
    seen = []
    for name in ("decode", "decode_step"):
        original = getattr(model, name)

        def spy(*args, _original=original, **kwargs):
            seen.append(torch.backends.cuda.cudnn_sdp_enabled())
            return _original(*args, **kwargs)

        monkeypatch.setattr(model, name, spy)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    # on, as torch has it by default, so that the test can fail
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        for cache in (False, True):
            search.greedy_search(model, src, mask, BOS, -1, PAD, 4, use_cache=cache)
            search.beam_search(model, src, mask, BOS, -1, PAD, 4, beam=2, use_cache=cache)
        assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
    assert len(seen) >= 16 and not any(seen)
