"""Our SwitchHead's weights in the released SwitchHeadRope (RobertCsordas/switchhead:
switchhead/switchhead.py + cvmm.py): do both compute the same outputs and gradients on full
sequences? Outside CI (it needs copies of the released files, which are not part of this
repository, and CUDA for their Triton kernels):

    python scripts/transplant_switchhead.py --released-dir DIR             # CUDA, fp32
    python scripts/transplant_switchhead.py --released-dir DIR --device cpu  # the dry path

DIR holds the released `switchhead.py` and `cvmm.py` (loaded as a package, so that switchhead.py's
`from .cvmm import ...` resolves). Weights copied (the released layout is ours, no transpose):
released `q.weight` / `k.weight` [H*dh, d] = the first / second half of our `qk.weight` (head-major
rows); `v` [H*E, d, dh] = our `v`; `o` [H*E, dh, d] = our `o`; `sel_v` / `sel_o` [H*E, d] = our
`sel_v.weight` / `sel_o.weight` (row h*E + e). Both rotate the first int(0.5 dh) channels of each
head (rotate-half, base 10000). The released layer scales q and k by dh^(-1/4) each and calls SDPA
with scale 1; ours leaves them and SDPA scales by dh^(-1/2): the same scores up to rounding.
Compared, in fp32 (TF32 off; the released kernels run with allow_tf32=False): the output, the
gradients w.r.t. the input and every weight (for a random cotangent), and the chosen experts (top-k
sets of V and O selection, our `select` against the released `get_sel`; a near-tie may flip
one in fp32, which is counted and reported). Then, for the record, the released cached path token
by token against its own full forward: it rotates each new query at position 0 (its offset is
q_len - k_len = 0), so a difference is expected there (ours is checked against its own full
forward by the conformance check). On CUDA the released
Triton `cvmm` is also compared with this script's torch transcription of it (`cvmm_reference`),
and the comparison is repeated under bf16 autocast (reported, no tolerance: both round to bf16,
differently).

--device cpu (the dry path, where no CUDA is): `triton` is replaced by a stand-in (its decorators
return the kernels unchanged; the kernels never run) so that cvmm.py imports, and the released
layer's `cvmm` by `cvmm_reference`, a plain-torch transcription of what the kernel computes (row of
`sel_index` times expert `sel`, written at `out_index`, then the reduction weights): everything but
the Triton kernel itself is compared. Exit status 1 if an fp32 difference exceeds the tolerance.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import types
from pathlib import Path

import torch

from moa_train.models.attention.switchhead import SwitchHeadAttention
from moa_train.models.rope import Rotary

# (d_model, heads, head_dim, experts, top_k, batch, tokens); the last: the successors check's layer
CASES = (
    (64, 2, 16, 5, 2, 2, 33),
    (96, 4, 24, 4, 3, 2, 40),
    (256, 2, 40, 5, 2, 2, 256),
)
TOL = 1e-4  # relative to the largest magnitude of the compared tensor


def stub_triton() -> None:
    """A stand-in `triton` so that cvmm.py imports without it: jit/autotune return the function,
    `tl` names resolve to placeholders; calling a kernel is an error (the CPU path never does)."""
    if "triton" in sys.modules:
        return

    def passthrough(*args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda fn: fn

    def placeholder(name: str):
        if name.startswith("__"):  # module attributes (__file__, ...): absent, as usual
            raise AttributeError(name)
        return object()

    language = types.ModuleType("triton.language")
    language.__getattr__ = placeholder
    triton = types.ModuleType("triton")
    triton.__version__ = "3.0.0"
    triton.jit, triton.autotune, triton.Config = passthrough, passthrough, lambda *a, **k: None
    triton.cdiv = lambda a, b: -(-a // b)
    triton.language = language
    sys.modules.update({"triton": triton, "triton.language": language})


def load_released(folder: Path, device: str):
    """The released package (switchhead.py + cvmm.py from `folder`) as `switchhead_released`."""
    for name in ("switchhead.py", "cvmm.py"):
        if not (folder / name).is_file():
            sys.exit(f"error: --released-dir: no {name} in {folder}")
    try:
        import triton  # noqa: F401
    except ImportError:
        if device == "cuda":
            sys.exit(
                "error: the released cvmm needs triton on CUDA; install it or use --device cpu"
            )
        stub_triton()
    package = types.ModuleType("switchhead_released")
    package.__path__ = [str(folder)]
    sys.modules["switchhead_released"] = package
    return importlib.import_module("switchhead_released.switchhead")


def cvmm_reference(x: torch.Tensor, sel, keys: torch.Tensor) -> torch.Tensor:
    """What the released `cvmm(x, sel, keys)` computes, in plain torch (autograd gives the
    gradients): output row p = x[row of p] @ keys[expert of p], where the sorted selection gives,
    at sorted place m, the input row sel.sel_index[m], the expert sel.sel[m] and the output row
    sel.out_index[m] (m itself without one); then, with reduction weights, the weighted sum over
    the last selection axis."""
    rows_in = x.flatten(end_dim=-2)
    experts = sel.sel.flatten()
    place = (
        torch.arange(experts.numel(), device=x.device) if sel.out_index is None else sel.out_index
    )
    row_of = torch.empty_like(sel.sel_index).scatter_(0, place, sel.sel_index)
    expert_of = torch.empty_like(experts).scatter_(0, place, experts)
    out = torch.einsum("mk,mkn->mn", rows_in[row_of], keys[expert_of])
    out = out.view(*sel.sel.shape, keys.shape[-1])
    if sel.reduction_weight is not None:
        w = sel.reduction_weight
        out = out.view(*w.shape, out.shape[-1])
        out = (w.unsqueeze(-2).type_as(out) @ out).squeeze(-2)
    return out


def pair(released, case: tuple, device: str):
    """(ours, theirs, mapping theirs-name -> function of our parameters) with the same weights."""
    d, h, dh, e, k = case[:5]
    torch.manual_seed(0)
    ours = SwitchHeadAttention(d, h, dh, e, k, dropout=0.0, causal=True)
    ours.rope = Rotary(dh, 0.5, 10000.0)
    with torch.no_grad():  # the released init's scales, so that outputs are O(1)
        for p in (ours.qk.weight, ours.v, ours.sel_v.weight, ours.sel_o.weight):
            p.normal_(0.0, 1 / math.sqrt(d))
        ours.o.normal_(0.0, 1 / math.sqrt(h * dh))
    theirs = released.SwitchHeadRope(d, h, e, d_head=dh, moe_k=k, rotate_fraction=0.5)
    assert theirs.n_rotate == ours.rope.n_rot, (theirs.n_rotate, ours.rope.n_rot)
    hd = h * dh
    mapping = {
        "q.weight": lambda m: m.qk.weight[:hd],
        "k.weight": lambda m: m.qk.weight[hd:],
        "v": lambda m: m.v,
        "o": lambda m: m.o,
        "sel_v": lambda m: m.sel_v.weight,
        "sel_o": lambda m: m.sel_o.weight,
    }
    theirs_p = dict(theirs.named_parameters())
    assert set(theirs_p) == set(mapping), sorted(theirs_p)
    with torch.no_grad():
        for name, p in theirs_p.items():
            p.copy_(mapping[name](ours))
    return ours.to(device).train(), theirs.to(device).train(), mapping


def rel(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """(max |a - b|, max |b|)."""
    return (a.double() - b.double()).abs().max().item(), b.double().abs().max().item()


def chosen_sets(ours, theirs, x: torch.Tensor) -> int:
    """Tokens x heads whose chosen experts (V and O selection, as h * E + e) differ between our
    `select` and the released `get_sel`."""
    h, k = ours.n_head, ours.top_k
    count = 0
    for mine, released in ((ours.sel_v, theirs.sel_v), (ours.sel_o, theirs.sel_o)):
        a = ours.select(mine, x)[1].sort(-1).values.view(-1, h, k)
        b = theirs.get_sel(x, released)[0].raw_sel.view(-1, h, k).sort(-1).values
        count += int((a != b).any(-1).sum())
    return count


def compare(released, case: tuple, device: str, autocast: bool = False) -> dict:
    ours, theirs, mapping = pair(released, case, device)
    d, _, _, _, _, b, t = case
    torch.manual_seed(1)
    x0 = torch.randn(b, t, d, device=device)
    cot = torch.randn(b, t, d, device=device)
    ctx = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if autocast
        else torch.autocast(device, enabled=False)
    )
    results = []
    for model, kind in ((ours, "ours"), (theirs, "theirs")):
        x = x0.clone().requires_grad_(True)
        with ctx:
            y = model(x)[0] if kind == "ours" else model(x, x, x, None)[0]
        params = dict(model.named_parameters())
        grads = torch.autograd.grad((y.float() * cot).sum(), [x, *params.values()])
        results.append((y.float(), grads[0], dict(zip(params, grads[1:], strict=True))))
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    out = {"output": rel(y0, y1), "grad_x": rel(gx0, gx1)}
    # our gradients in the released layout (our qk gradient split into q and k)
    grad_ours = {name: f(types.SimpleNamespace(**_grad_tree(gp0))) for name, f in mapping.items()}
    out["grad_weights"] = max((rel(grad_ours[n], g) for n, g in gp1.items()), key=lambda r: r[0])
    with torch.no_grad():
        out["selection_mismatches"] = chosen_sets(ours, theirs, x0)
    return out


def _grad_tree(grads: dict) -> dict:
    """Our parameter gradients under the attribute paths `mapping` reads (qk.weight, sel_v.weight,
    ...)."""
    tree: dict = {}
    for name, g in grads.items():
        head, _, tail = name.partition(".")
        if tail:
            tree[head] = types.SimpleNamespace(**{tail: g})
        else:
            tree[head] = g
    return tree


def cached_vs_full(released, case: tuple, device: str) -> tuple:
    """The released layer token by token with its kv_cache against its own full forward: max
    |diff| at the first token and over all tokens."""
    _, theirs, _ = pair(released, case, device)
    d, b, t = case[0], case[5], min(case[6], 16)
    torch.manual_seed(1)
    x = torch.randn(b, t, d, device=device)
    with torch.no_grad():
        full = theirs(x, x, x, None)[0]
        cache, steps = {}, []
        for i in range(t):
            xi = x[:, i : i + 1]
            y, cache = theirs(xi, xi, xi, None, kv_cache=cache)
            steps.append(y)
        diff = (torch.cat(steps, dim=1) - full).abs().amax(dim=(0, 2))
    return diff[0].item(), diff.max().item()


def kernel_vs_reference(released, device: str) -> float:
    """The released Triton cvmm against cvmm_reference on the same selection (fp32)."""
    torch.manual_seed(2)
    x = torch.randn(3, 7, 32, device=device)
    keys = torch.randn(10, 32, 24, device=device)
    idx = torch.randint(0, 10, (3, 7, 4), device=device)
    w = torch.rand(3, 7, 2, 2, device=device)
    sel = released.cvmm_prepare_sel2(idx, w)
    return (released.cvmm(x, sel, keys) - cvmm_reference(x, sel, keys)).abs().max().item()


def fmt(pair_: tuple) -> str:
    diff, scale = pair_
    return f"{diff:.3g} (scale {scale:.3g})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--released-dir", type=Path, required=True, help="switchhead.py, cvmm.py")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA here (the released Triton kernels need it)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    released = load_released(args.released_dir.resolve(), args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"torch {torch.__version__}; {name}; fp32, TF32 off; tolerance {TOL} x scale")
    if args.device == "cpu":
        released.cvmm = cvmm_reference
        print(
            "[dry path] the released Triton cvmm replaced by cvmm_reference (a torch transcription "
            "of it); the kernel itself is NOT compared here"
        )
    else:
        diff = kernel_vs_reference(released, "cuda")
        print(f"released cvmm (Triton) vs cvmm_reference: max |diff| {diff:.3g}")
    worst = 0.0
    for case in CASES:
        d, h, dh, e, k, b, t = case
        r = compare(released, case, args.device)
        worst = max(
            worst,
            *(r[key][0] / max(r[key][1], 1e-30) for key in ("output", "grad_x", "grad_weights")),
        )
        print(
            f"d {d} heads {h}x{dh} E {e} k {k} batch {b} tokens {t}: output {fmt(r['output'])}  "
            f"grad_x {fmt(r['grad_x'])}  grad_weights {fmt(r['grad_weights'])}  "
            f"selection mismatches {r['selection_mismatches']}"
        )
        if args.device == "cuda":
            a = compare(released, case, "cuda", autocast=True)
            print(
                f"    [bf16 autocast, no tolerance] output {fmt(a['output'])}  grad_x "
                f"{fmt(a['grad_x'])}  grad_weights {fmt(a['grad_weights'])}"
            )
    first, every = cached_vs_full(released, CASES[0], args.device)
    print(
        f"released cached path (token by token) vs its own full forward: first token {first:.3g}, "
        f"all tokens {every:.3g} (expected > 0 after the first: each new query rotated at 0)"
    )
    print(f"worst relative fp32 difference {worst:.3g}: {'PASS' if worst <= TOL else 'FAIL'}")
    sys.exit(0 if worst <= TOL else 1)


if __name__ == "__main__":
    main()
