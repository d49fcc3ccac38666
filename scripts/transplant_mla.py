"""Our MLA's weights in DeepSeek-V3's released MLA (inference/model.py), on the CPU in fp32: do both
compute the same attention, naive and absorbed, full sequences and token by token? Outside CI (it
needs a copy of the released file, which is not part of this repository):

    python scripts/transplant_mla.py /path/to/DeepSeek-V3/inference/model.py

The released file imports `kernel` (its Triton FP8 kernels, unused in fp32): a stand-in module is
put in its place. Its rotary embedding rotates interleaved channel pairs (2i, 2i+1); ours rotates
halves (i, i + n/2) at the same frequencies, so the rows of W_q's and W_kv_a's rotary channels are
permuted when copied (scores are sums over channel pairs, so the same attention results). No YaRN:
max_seq_len stays below original_seq_len. Prints the largest differences; exit status 1 if one
exceeds 1e-5.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types

import torch

from moa_train.models.attention.mla import MLAAttention
from moa_train.models.kv_cache import DecodeState

SHAPES = {"dim": 32, "n_heads": 4, "kv_lora_rank": 12, "qk_nope_head_dim": 6}
SHAPES |= {"qk_rope_head_dim": 4, "v_head_dim": 5, "rope_theta": 10000.0}
B, T, PROMPT, TOL = 2, 9, 4, 1e-5


def load_released(path: str):
    """The released module, with a stand-in for its `kernel` import; fp32 Linear layers."""
    kernel = types.ModuleType("kernel")
    for name in ("act_quant", "weight_dequant", "fp8_gemm"):
        setattr(kernel, name, None)
    sys.modules.setdefault("kernel", kernel)
    spec = importlib.util.spec_from_file_location("deepseek_v3_model", path)
    released = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(released)
    released.Linear.dtype = torch.float32
    return released


def ours(q_lora_rank: int) -> MLAAttention:
    torch.manual_seed(0)
    s = SHAPES
    attn = MLAAttention(
        s["dim"],
        s["n_heads"],
        s["kv_lora_rank"],
        s["qk_nope_head_dim"],
        s["qk_rope_head_dim"],
        s["v_head_dim"],
        q_lora_rank or None,
        rope_base=s["rope_theta"],
    ).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    return attn


def interleave(n: int) -> torch.Tensor:
    """Released rotary channel j holds our channel interleave(n)[j]: (2i, 2i+1) <- (i, i + n/2)."""
    half = torch.arange(n // 2)
    return torch.stack([half, half + n // 2], dim=1).flatten()


def copy_weights(attn: MLAAttention, theirs) -> None:
    s = SHAPES
    nope, rope, r = s["qk_nope_head_dim"], s["qk_rope_head_dim"], s["kv_lora_rank"]
    qk = nope + rope
    # W_q rows: head-major, each head [nope | rope]; only the rotary rows move
    q_rows = torch.cat(
        [
            torch.cat([torch.arange(nope), nope + interleave(rope)]) + h * qk
            for h in range(s["n_heads"])
        ]
    )
    kv_rows = torch.cat([torch.arange(r), r + interleave(rope)])
    with torch.no_grad():
        if hasattr(attn, "wq"):
            theirs.wq.weight.copy_(attn.wq.weight[q_rows])
        else:
            theirs.wq_a.weight.copy_(attn.wq_a.weight)
            theirs.q_norm.weight.copy_(attn.q_norm.weight)
            theirs.wq_b.weight.copy_(attn.wq_b.weight[q_rows])
        theirs.wkv_a.weight.copy_(attn.wkv_a.weight[kv_rows])
        theirs.kv_norm.weight.copy_(attn.kv_norm.weight)
        theirs.wkv_b.weight.copy_(attn.wkv_b.weight)
        theirs.wo.weight.copy_(attn.wo.weight)


def released_outputs(released, attn: MLAAttention, impl: str, q_lora_rank: int, x: torch.Tensor):
    """(full forward, prompt then one token at a time) of the released MLA in form `impl`."""
    released.attn_impl = impl
    args = released.ModelArgs(
        max_batch_size=B, max_seq_len=T, q_lora_rank=q_lora_rank, original_seq_len=4096, **SHAPES
    )
    theirs = released.MLA(args).eval()
    copy_weights(attn, theirs)
    freqs = released.precompute_freqs_cis(args)
    mask = torch.full((T, T), float("-inf")).triu_(1)
    with torch.no_grad():
        full = theirs(x, 0, freqs[:T], mask)
        steps = [theirs(x[:, :PROMPT], 0, freqs[:PROMPT], mask[:PROMPT, :PROMPT])]
        steps += [theirs(x[:, t : t + 1], t, freqs[t : t + 1], None) for t in range(PROMPT, T)]
    return full, torch.cat(steps, dim=1)


def our_outputs(attn: MLAAttention, x: torch.Tensor) -> tuple:
    """(naive full forward, absorbed full forward, cached decoding: prompt then one token at a
    time through the latent cache)."""
    with torch.no_grad():
        naive, _ = attn(x)
        q_nope, q_pe, c, k_pe = attn.project(x)
        o = attn.absorbed(q_nope, q_pe, torch.cat([c[:, None], k_pe], dim=-1), None)
        absorbed = attn.wo(o.transpose(1, 2).flatten(2))
        state = DecodeState(torch.zeros(B, dtype=torch.int64), T)
        attn.kv_cache = attn.make_cache(state, "cpu", torch.float32)
        steps = []
        for lo, hi in [(0, PROMPT), *((t, t + 1) for t in range(PROMPT, T))]:
            y, _ = attn(x[:, lo:hi])
            steps.append(y)
            state.lengths += hi - lo
        attn.kv_cache = None
    return naive, absorbed, torch.cat(steps, dim=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_py", help="DeepSeek-V3's inference/model.py")
    released = load_released(parser.parse_args(argv).model_py)
    print(f"torch {torch.__version__}, CPU fp32; shapes {SHAPES}, batch {B}, {T} tokens")
    worst = 0.0
    for q_lora_rank in (0, 8):
        attn = ours(q_lora_rank)
        x = torch.randn(B, T, SHAPES["dim"], generator=torch.Generator().manual_seed(1))
        naive, absorbed, cached = our_outputs(attn, x)
        rows = {"ours absorbed vs ours naive (full)": (absorbed, naive)}
        rows["ours cached (absorbed) vs ours naive (full)"] = (cached, naive)
        for impl in ("naive", "absorb"):
            full, steps = released_outputs(released, attn, impl, q_lora_rank, x)
            rows[f"released {impl} (full) vs ours naive (full)"] = (full, naive)
            rows[f"released {impl} (token by token) vs ours cached"] = (steps, cached)
        print(
            f"q_lora_rank={q_lora_rank or 'null (full W_q)'}; output scale {naive.abs().max():.3g}"
        )
        for name, (a, b) in rows.items():
            err = (a - b).abs().max().item()
            worst = max(worst, err)
            print(f"  {name:<52} max |diff| {err:.3g}")
    print(f"worst {worst:.3g} ({'within' if worst <= TOL else 'ABOVE'} {TOL:g})")
    return 0 if worst <= TOL else 1


if __name__ == "__main__":
    sys.exit(main())
