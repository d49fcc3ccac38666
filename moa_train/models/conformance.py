"""Does an attention variant decode as it computes? `check_decoding(preset)` builds tiny models of a
registered variant (or named preset; a plugin's too, once its module is imported) and checks, in
fp32 on the CPU:

- the decoder-only LM: prefill of right-padded prompts of different lengths, then one-token decode
  steps through the caches, give each row's full-forward logits (to 1e-5 of the logits' scale,
  max(1, max |logit|): fp32 rounding grows with the values, and a gated variant such as moh adds a
  few roundings; a cache read wrongly is off by 1e-2 or more), and no pooled cache
  overflows; greedy tokens through the cached steps equal those of full forwards;
- the encoder-decoder with the variant as its decoder self-attention (and its cross-attention
  default): cached greedy and beam search give the recomputed hypotheses, and the cached decoder
  steps the full decoder's logits.

It raises AssertionError naming the variant and what differs. A variant that declares it cannot
cache (no `kv_layout`, no `make_cache`) is checked for the same tokens through full forwards. The
test suite runs it over every registered variant (tests/test_conformance.py); a plugin's tests call
it for their own:

    import my_plugin  # registers "toy"
    from moa_train.models.conformance import check_decoding

    check_decoding("toy", toy_key=3)
"""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from moa_train.models.decoding import Recompute, open_steps
from moa_train.models.kv_cache import has_kv_cache
from moa_train.models.lm import LanguageModel
from moa_train.models.roles import ROUTER, params_with
from moa_train.models.search import search
from moa_train.models.seq2seq import Seq2Seq
from moa_train.models.variants import PLUGIN_PRESETS, VARIANTS, preset_variant
from moa_train.paths import config_dir

VOCAB, PAD, BOS, ATOL = 50, 0, 1, 1e-5
TINY = {"d_model": 32, "n_layer": 2, "n_head": 4, "max_seq_len": 32, "dropout": 0.0}


def preset_keys(preset: str) -> dict:
    """The keys a preset's YAML sets, the presets it builds on first (`_schema_` entries left
    out)."""
    path = PLUGIN_PRESETS.get(preset, config_dir() / "model" / f"{preset}.yaml")
    node = OmegaConf.load(path)
    keys: dict = {}
    for entry in node.get("defaults", []):
        if isinstance(entry, str) and not entry.startswith("_") and entry != "_self_":
            keys.update(preset_keys(entry))
    own = OmegaConf.to_container(node)
    own.pop("defaults", None)
    return {**keys, **own}


def tiny_config(preset: str, **keys):
    """The typed config of `preset` at the tiny size, `keys` on top."""
    name = preset_variant(preset)
    values = {**preset_keys(preset), **TINY, **keys}
    return OmegaConf.merge(OmegaConf.structured(VARIANTS[name]), values)


def _spread_weights(model, seed: int) -> None:
    """Weights larger than any init (an untrained model's greedy output otherwise repeats one
    token, and a comparison of hypotheses would be trivial), routers included (routing then differs
    per token)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 2.0 / p.shape[-1] ** 0.5)
        for p in params_with(model, ROUTER):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _check_close(preset: str, what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """|got - want| within ATOL relative to the logits' scale (at least ATOL itself)."""
    err = (got.float() - want.float()).abs().max().item()
    tol = ATOL * max(1.0, want.float().abs().max().item())
    if not err <= tol:
        raise AssertionError(
            f"{preset}: {what} differs from the full forward by {err:.3g} (tolerance {tol:.3g})"
        )


@torch.no_grad()
def check_lm(preset: str, seed: int = 0, **keys) -> str:
    """The LM part of `check_decoding`; returns how the LM decodes (cached / full forwards)."""
    torch.manual_seed(seed)
    lm = LanguageModel(tiny_config(preset, **keys), VOCAB).eval()
    _spread_weights(lm, seed)
    g = torch.Generator().manual_seed(seed + 1)
    lengths, new = [6, 3, 1], 8
    idx = torch.randint(2, VOCAB, (3, max(lengths) + new), generator=g)
    prompts = idx[:, : max(lengths)].clone()
    for r, n in enumerate(lengths):
        prompts[r, n:] = PAD
    warned = []
    with open_steps(lm, 3, max(lengths) + new, "cpu", warn=warned.append) as steps:
        got = [steps.prefill(prompts, torch.tensor(lengths))]
        for j in range(new - 1):
            row_tokens = idx[torch.arange(3), torch.tensor(lengths) + j]
            got.append(steps.step(row_tokens))
        overflow = steps.overflow_note()
    if warned:
        raise AssertionError(f"{preset}: {warned[0]}")
    if overflow:
        raise AssertionError(f"{preset}: {overflow}")
    got = torch.stack(got, 1)
    for r, n in enumerate(lengths):
        want, _ = lm(idx[r : r + 1, : n + new - 1])
        _check_close(preset, f"cached decoding (row {r}, prompt {n})", got[r], want[0, n - 1 :])
    # greedy tokens: the cached steps against full forwards
    tokens = []
    for strategy in ("steps", "recompute"):
        s = (
            open_steps(lm, 3, max(lengths) + new, "cpu")
            if strategy == "steps"
            else Recompute(lm, 3, max(lengths) + new, "cpu")
        )
        with s:
            out, logits = [], s.prefill(prompts, torch.tensor(lengths))
            for _ in range(new):
                out.append(logits.argmax(-1))
                logits = s.step(out[-1])
        tokens.append(torch.stack(out, 1))
    if not torch.equal(tokens[0], tokens[1]):
        raise AssertionError(f"{preset}: greedy tokens through the cache differ from full forwards")
    return steps.mode if has_kv_cache(lm) else "full forwards (declares no cache)"


@torch.no_grad()
def check_seq2seq(preset: str, seed: int = 0, **keys) -> str:
    """The encoder-decoder part of `check_decoding`."""
    # sinusoidal unless rope is asked for (or set by the preset): a learned table would be random
    rope = keys.get("positions", preset_keys(preset).get("positions")) == "rope"
    keys = {"n_encoder_layer": 2, **keys, "positions": "rope" if rope else "sinusoidal"}
    cfg = tiny_config(preset, **keys)
    torch.manual_seed(seed)
    model = Seq2Seq(cfg, VOCAB, PAD).eval()
    _spread_weights(model, seed)
    g = torch.Generator().manual_seed(seed + 2)
    src_lengths = [7, 3, 9, 5, 1]
    src = torch.full((len(src_lengths), max(src_lengths)), PAD)
    for i, n in enumerate(src_lengths):
        src[i, :n] = torch.randint(3, VOCAB, (n,), generator=g)
    mask = src != PAD
    tgt = torch.randint(3, VOCAB, (len(src_lengths), 8), generator=g)
    memory = model.encode(src, mask)
    full = model.decode(tgt, memory, mask)
    with open_steps(model, len(src_lengths), 8, "cpu", memory=memory, src_mask=mask) as steps:
        got = torch.stack([steps.step(tgt[:, t]) for t in range(8)], 1)
    _check_close(preset, "cached decoder steps", got, full)
    # an EOS that ends the greedy hypotheses at different steps
    free = search(model, src, mask, BOS, -1, PAD, 10, use_cache=False)
    eos = max(
        sorted({t for h in free for t in h}),
        key=lambda t: len({h.index(t) if t in h else len(h) for h in free}),
    )
    for beam in (None, 3):
        hyps = [
            search(model, src, mask, BOS, eos, PAD, 12, beam=beam, lenpen=0.6, use_cache=c)
            for c in (False, True)
        ]
        if hyps[0] != hyps[1]:
            kind = "greedy search" if beam is None else f"beam search ({beam} beams)"
            raise AssertionError(f"{preset}: cached {kind} differs from the recomputed one")
    return steps.mode


def check_decoding(preset: str, seed: int = 0, **keys) -> dict:
    """{"lm": how it decodes, "seq2seq": ...} after every check of the module docstring passed;
    AssertionError (naming `preset` and the difference) otherwise. `keys`: model keys on top of the
    preset's and the tiny size's."""
    return {
        "lm": check_lm(preset, seed, **keys),
        "seq2seq": check_seq2seq(preset, seed, **keys),
    }
