"""Transplant check of MoH attention (moa_train/models/attention/moh.py) against the released code
(SkyworkAI/MoH). Not part of CI: it needs copies of the released files.

    python scripts/transplant_moh.py --released DIR

DIR holds `models.py` (MoH-DiT/models.py: `MoHAttention`, the learned-router module with
`shared_head`, `routed_head`, `wg`/`wg_0`/`wg_1` and the load-balance loss, on plain scaled-dot
attention like ours) and `modeling_llama.py` (MoH-LLaMA3/Inference_code/modeling_llama.py: the
query-norm rule). Everything runs in float64 on CPU, batch 2, 10 tokens, non-causal (the DiT/ViT
attention is bidirectional; ours is built with causal=False).

- router: ours and the released DiT module with the same sizes and weights (our `c_attn` is their
  `qkv`: same [Q | K | V] x head x head_dim row packing, no transpose; `c_proj` is `proj`; `router`
  is `wg`, `shared_router` is `wg_1`, `group_router` is `wg_0`; both biased as the DiT blocks
  build them); output, balance loss (theirs: `LOAD_BALANCING_LOSSES`, training mode; ours:
  `routing.aux_losses` with `balance_type=switch_k`, as tests/test_moh.py) and the gradients of
  both w.r.t. the input and the shared parameters. The released DiT module has no path for one
  shared head with routed heads (it reads `wg_1`, built only for shared_head > 1), so that split
  is not compared here (the ViT code uses gate 1 there, as ours does).
- query_norm: the full LLaMA block (RoPE, HF cache) is impractical against our position-free
  host, so the released rule itself (the statements of `LlamaSdpaAttention.forward` from
  `gate = query_states.view(...)` to the `mask = torch.cat(...)`, taken from the file's source
  with `ast` and executed as is, and the head split of `LlamaAttention.__init__`) is applied to
  our module's queries and compared with our gates; the released mask applied to our per-head
  outputs gives the output comparison. (Released: query_states before RoPE; ours: the projected
  queries, we have no RoPE: the same tensor.)

Imports the released files need and this environment lacks are stubbed here, minimally:
`timm.models.vision_transformer` and `timm.layers` (names imported by models.py but unused by its
`MoHAttention`; `use_fused_attn` returns False, so the explicit softmax path runs; the SDPA path is
run too by setting `fused_attn`). modeling_llama.py is not imported (its transformers imports are
of an older version): only the rule's source is read.

Our routers cast to float32 (`.float()`, the framework's convention for bf16 training) and
`aux_losses` returns float32: in float64 these give differences at float32 rounding. Each router
comparison is run as is and with those casts made no-ops for float64 (attribution only; this also
makes the released balance loss's `mask.float()`, a float32 token share, float64).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from moa_train.models.attention.moh import MoHAttention
from moa_train.models.routing import aux_losses
from moa_train.schema import AuxConfig

# the framework's aux settings with the released scaling (z and cv off, their defaults)
AUX = OmegaConf.structured(AuxConfig(balance_type="switch_k"))
D, H, B, T = 64, 8, 2, 10


def stub_timm() -> None:
    """The names MoH-DiT/models.py imports from timm; none is used by its MoHAttention."""
    if "timm" in sys.modules:
        return

    class Unused:
        def __init__(self, *a, **k):
            raise RuntimeError("timm stub: not available in the transplant check")

    vit = types.ModuleType("timm.models.vision_transformer")
    vit.PatchEmbed = vit.Attention = vit.Mlp = Unused
    layers = types.ModuleType("timm.layers")
    names = (
        "PatchEmbed Mlp DropPath AttentionPoolLatent RmsNorm PatchDropout SwiGLUPacked "
        "trunc_normal_ lecun_normal_ resample_patch_embed resample_abs_pos_embed"
    )
    for name in names.split():
        setattr(layers, name, Unused)
    layers.use_fused_attn = lambda *a, **k: False
    timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
    timm.models, timm.layers, models.vision_transformer = models, layers, vit
    sys.modules.update(
        {
            "timm": timm,
            "timm.models": models,
            "timm.models.vision_transformer": vit,
            "timm.layers": layers,
        }
    )


def load_released_dit(folder: Path):
    stub_timm()
    spec = importlib.util.spec_from_file_location("moh_released_dit", folder / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MoHAttention


@contextlib.contextmanager
def float64_kept():
    """Attribution only: Tensor.float() leaves float64 tensors as they are and makes integer ones
    float64 (the released code's `mask.float()` in its balance loss)."""
    original = torch.Tensor.float

    def keep(self, *a, **k):
        if self.dtype == torch.float64:
            return self
        return self.double() if not self.is_floating_point() else original(self, *a, **k)

    torch.Tensor.float = keep
    try:
        yield
    finally:
        torch.Tensor.float = original


def max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def pair(Released, n_shared: int, top_k: int, fused: bool):
    torch.manual_seed(0)
    ours = MoHAttention(D, H, n_shared, top_k, "router", bias=True, causal=False).double().train()
    theirs = Released(D, num_heads=H, qkv_bias=True, shared_head=n_shared, routed_head=top_k)
    theirs = theirs.double().train()
    theirs.fused_attn = fused
    mapping = {
        "qkv.weight": "c_attn.weight",  # same packing: rows [Q | K | V], each head-major
        "qkv.bias": "c_attn.bias",
        "proj.weight": "c_proj.weight",
        "proj.bias": "c_proj.bias",
        "wg.weight": "router.weight",
        "wg_0.weight": "group_router.weight",
        "wg_1.weight": "shared_router.weight",
    }
    ours_p, theirs_p = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert set(theirs_p) <= set(mapping), sorted(set(theirs_p) - set(mapping))
    assert {mapping[n] for n in theirs_p} == set(ours_p), (sorted(theirs_p), sorted(ours_p))
    with torch.no_grad():
        for n, p in theirs_p.items():
            assert p.shape == ours_p[mapping[n]].shape, n
            p.copy_(ours_p[mapping[n]])
    return ours, theirs, mapping


def run_router(Released, n_shared: int, top_k: int, fused: bool) -> dict:
    ours, theirs, mapping = pair(Released, n_shared, top_k, fused)
    torch.manual_seed(1)
    x0 = torch.randn(B, T, D, dtype=torch.float64)
    cot = torch.randn(B, T, D, dtype=torch.float64)
    out = {}
    results = []
    for model, kind in ((ours, "ours"), (theirs, "theirs")):
        x = x0.clone().requires_grad_(True)
        if kind == "ours":
            y, routing = model(x)
            aux = aux_losses([routing], AUX)["balance"]
            chosen = routing.chosen
        else:
            Released.LOAD_BALANCING_LOSSES.clear()
            y = model(x)
            (aux,) = Released.LOAD_BALANCING_LOSSES
            chosen = model.wg(x.detach().reshape(-1, D)).softmax(1).topk(top_k, 1).indices
        gy = torch.autograd.grad((y * cot).sum(), [x, *model.parameters()], retain_graph=True)
        ga = torch.autograd.grad(
            aux, [x, model.wg.weight if kind == "theirs" else model.router.weight]
        )
        names = [n for n, _ in model.named_parameters()]
        results.append((y, aux, chosen, gy[0], dict(zip(names, gy[1:], strict=True)), ga[0], ga[1]))
    (y0, a0, c0, gx0, gp0, gax0, gar0), (y1, a1, c1, gx1, gp1, gax1, gar1) = results
    out["selection_mismatches"] = int((c0.sort(-1).values != c1.sort(-1).values).any(-1).sum())
    out["output"] = max_diff(y0, y1)
    out["output_max_abs"] = y1.abs().max().item()
    out["balance"] = max_diff(a0, a1)
    out["balance_value"] = a1.item()
    out["grad_x(output)"] = max_diff(gx0, gx1)
    out["grad_x(balance)"] = max_diff(gax0, gax1)
    out["grad_params(output)"] = max(max_diff(g, gp0[mapping[n]]) for n, g in gp1.items())
    out["grad_wg(balance)"] = max_diff(gar0, gar1)
    return out


def released_rule(source: str) -> tuple:
    """The query-norm statements of LlamaSdpaAttention.forward and the head split of
    LlamaAttention.__init__, as source text."""
    tree = ast.parse(source)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}

    def method(cls, name):
        return next(
            f for f in classes[cls].body if isinstance(f, ast.FunctionDef) and f.name == name
        )

    body = method("LlamaSdpaAttention", "forward").body
    start = next(i for i, s in enumerate(body) if "gate = query_states.view" in ast.unparse(s))
    stop = next(i for i, s in enumerate(body) if ast.unparse(s).startswith("mask = torch.cat"))
    rule = "\n".join(ast.unparse(s) for s in body[start : stop + 1])
    split = "\n".join(
        ast.unparse(s)
        for s in method("LlamaAttention", "__init__").body
        if isinstance(s, ast.Assign)
        and ast.unparse(s.targets[0]) in ("self.routed_head", "self.shared_head")
    )
    return rule, split


def run_query_norm(folder: Path) -> dict:
    rule, split = released_rule((folder / "modeling_llama.py").read_text())
    cfg = types.SimpleNamespace(num_heads=H, head_dim=D // H)
    exec(split, {}, {"self": cfg})
    torch.manual_seed(0)
    ours = MoHAttention(D, H, cfg.shared_head, cfg.routed_head, "query_norm", causal=False)
    ours = ours.double().eval()
    torch.manual_seed(1)
    x = torch.randn(B, T, D, dtype=torch.float64)
    with torch.no_grad():
        y, routing = ours(x)
        q, heads = ours.attend(x, None, None)
        gates, _ = ours.gates(x, q)
        scope = {"torch": torch, "F": F, "self": cfg, "bsz": B, "q_len": T}
        scope["query_states"] = q.transpose(1, 2).reshape(B, T, H * cfg.head_dim)
        exec(rule, scope)
        mask, probs = scope["mask"].reshape(B * T, H), scope["gates"]
        b, h, t, _ = heads.shape
        y_rel = ours.c_proj(
            (heads * mask.view(b, t, h).transpose(1, 2).unsqueeze(-1))
            .transpose(1, 2)
            .reshape(b, t, -1)
        )
    return {
        "released_split(shared, routed)": (cfg.shared_head, cfg.routed_head),
        "ours_split(shared, top_k)": (ours.n_shared, ours.top_k),
        "gate_mismatches": int((gates != mask).any(-1).sum()),
        "gates": max_diff(gates, mask),
        "probs": max_diff(routing.probs, probs),
        "output": max_diff(y, y_rel),
        "rule": rule,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--released", type=Path, required=True, help="folder of released files")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    print(f"torch {torch.__version__}; float64, CPU; d_model {D}, {H} heads, batch {B}, {T} tokens")
    Released = load_released_dit(args.released)
    print("\n== router gating: ours vs MoH-DiT models.py MoHAttention (training mode, non-causal)")
    for n_shared, top_k in ((4, 2), (2, 1), (6, 1), (0, 2)):
        for fused in (False, True):
            for label, ctx in (("as is", contextlib.nullcontext), ("fp32 casts off", float64_kept)):
                with ctx():
                    r = run_router(Released, n_shared, top_k, fused)
                path = "sdpa" if fused else "explicit"
                print(
                    f"shared {n_shared} top_k {top_k} released-{path:8s} [{label:14s}] "
                    + "  ".join(
                        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                    )
                )
    print("\n== query_norm gating: ours vs the MoH-LLaMA3 rule (modeling_llama.py, source)")
    for label, ctx in (("as is", contextlib.nullcontext), ("fp32 casts off", float64_kept)):
        with ctx():
            r = run_query_norm(args.released)
        rule = r.pop("rule")
        print(
            f"[{label:14s}] "
            + "  ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
            )
        )
    print("released rule as executed:\n    " + rule.replace("\n", "\n    "))


if __name__ == "__main__":
    main()
