"""Every fast path checked against its plain path: same weights, same input, outputs and gradients
compared.

`check_all(device)` returns one row per check; `tests/test_fast_paths.py` runs it on CPU in CI and
`moa-bench` runs it on the GPU (with bf16 where the fast path is a bf16 kernel) and prints the
table. Errors are relative: ||fast - plain|| / ||plain|| over the output, and the largest such ratio
over the parameters' gradients.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from moa_train.models import build_model
from moa_train.models.attention.grouped import (
    grouped_kernel_available,
    grouped_mm,
    grouped_mm_reference,
)
from moa_train.models.attention.mha import MultiHeadAttention
from moa_train.models.roles import ROUTER, params_with
from moa_train.models.variants import variant_config

FP32_TOL = 1e-4  # different summation orders in fp32
# both sides in bf16 (8 mantissa bits: ~4e-3 per rounding), summed in different orders
BF16_TOL = 2e-2
BF16_AGAINST_FP32 = 5e-2  # a whole LM in bf16 against fp32: roundings through every layer


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def grad_err(fast: torch.nn.Module, plain: torch.nn.Module) -> float:
    """Relative error of the whole gradient (all parameters as one vector): a per-tensor maximum
    would be ruled by tensors whose gradient is nearly zero, where bf16 rounding alone is a large
    relative error."""
    pairs = [
        (p.grad.flatten(), q.grad.flatten())
        for p, q in zip(fast.parameters(), plain.parameters(), strict=True)
        if q.grad is not None
    ]
    return rel_err(
        torch.cat([a.float() for a, _ in pairs]), torch.cat([b.float() for _, b in pairs])
    )


def row(path: str, reference: str, out: float, grad: float | None, tol: float) -> dict:
    ok = out <= tol and (grad is None or grad <= tol)
    return {
        "path": path,
        "reference": reference,
        "out_err": out,
        "grad_err": grad,
        "tol": tol,
        "ok": ok,
    }


def random_routers(model: torch.nn.Module, seed: int = 0) -> None:
    """Routers start at zero (ties); random weights make the comparison exercise real, distinct
    choices."""
    gen = torch.Generator().manual_seed(seed)
    for p in params_with(model, ROUTER):
        if p.dim() == 2:  # logits of order 1: distinct choices, no saturated softmax
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def compare_lms(
    model_cfg,
    fast_overrides: dict,
    vocab: int,
    tokens: torch.Tensor,
    autocast,
    device,
    wrap=None,
    plain_autocast=None,
) -> tuple:
    """(output error, gradient error) of the LM built with `fast_overrides` (and `wrap`, e.g.
    torch.compile) against the plain LM with the same weights, on `tokens`; the plain LM runs under
    `plain_autocast` if given."""
    torch.manual_seed(0)
    plain = build_model(model_cfg, vocab)
    random_routers(plain)
    fast_cfg = copy.deepcopy(model_cfg)
    for key, value in fast_overrides.items():
        setattr(fast_cfg, key, value)
    fast = build_model(fast_cfg, vocab)
    fast.load_state_dict(plain.state_dict())
    plain, fast = plain.to(device).train(), fast.to(device).train()
    outs = []
    for call, context in (
        (plain, plain_autocast or autocast),
        (wrap(fast) if wrap else fast, autocast),
    ):
        with context():
            logits, _ = call(tokens)
        logits.float().square().mean().backward()
        outs.append(logits.detach())
    return rel_err(outs[1], outs[0]), grad_err(fast, plain)


def gqa_against_repeated_kv(device, dtype) -> tuple:
    """MultiHeadAttention's GQA (SDPA enable_gqa, K/V never repeated) against K/V repeated per query
    head."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(64, 8, 2).to(device)
    x = torch.randn(2, 24, 64, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        y_fast, _ = attn(x)
        q, k, v = attn.project(x, None)
        rep = attn.n_head // attn.n_kv
        o = F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True
        )
        y_plain = attn.c_proj(o.transpose(1, 2).flatten(2))
    g_fast = torch.autograd.grad(y_fast.float().square().sum(), x)[0]
    g_plain = torch.autograd.grad(y_plain.float().square().sum(), x)[0]
    return rel_err(y_fast, y_plain), rel_err(g_fast, g_plain)


def grouped_kernel_against_reference(device) -> tuple | None:
    """torch's grouped GEMM against the group-by-group reference, with an empty group; None without
    the kernel."""
    x = torch.randn(300, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    if not grouped_kernel_available(x.device, x.dtype):
        return None
    w = torch.randn(4, 64, 32, device=device, dtype=torch.bfloat16, requires_grad=True)
    offs = torch.tensor([100, 100, 250, 300], device=device, dtype=torch.int32)  # group 1 is empty
    outs = []
    for fn in (grouped_mm, grouped_mm_reference):
        y = fn(x, w, offs)
        outs.append((y, *torch.autograd.grad(y.float().square().sum(), (x, w))))
    return rel_err(outs[0][0], outs[1][0]), max(
        rel_err(a, b) for a, b in zip(outs[0][1:], outs[1][1:], strict=True)
    )


def fused_adamw_against_plain(device) -> float:
    """One AdamW step, fused kernel vs the for-loop implementation, from the same parameters and
    gradients."""
    torch.manual_seed(0)
    params = [torch.randn(64, 32, device=device) for _ in range(3)]
    grads = [torch.randn_like(p) for p in params]
    results = []
    for fused in (True, False):
        ps = [p.clone().requires_grad_() for p in params]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        opt = torch.optim.AdamW(
            ps, lr=1e-2, weight_decay=0.1, fused=fused, foreach=None if fused else False
        )
        for _ in range(3):
            opt.step()
        results.append(torch.cat([p.detach().flatten() for p in ps]))
    return rel_err(results[0], results[1])


def check_all(
    device: torch.device, model_cfg, vocab: int, batch: int, block: int, compile_backend: str
) -> list:
    """Every fast path against its plain path on `device`: LM-level checks at `model_cfg`'s
    sizes."""
    cuda = device.type == "cuda"
    # the dtype the fast paths run in on this device
    low = torch.bfloat16 if cuda else torch.float32
    tol = BF16_TOL if cuda else FP32_TOL
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    tokens = torch.randint(0, vocab, (batch, block), generator=torch.Generator().manual_seed(0)).to(
        device
    )
    sizes = {
        key: getattr(model_cfg, key) for key in ("d_model", "n_layer", "n_head", "max_seq_len")
    }
    cfg = variant_config(
        {**sizes, "name": "moas_dynamic", "dropout": 0.0, "gate_dropout": 0.0, "fused": False}
    )
    rows = []

    out, grad = compare_lms(cfg, {"fused": True}, vocab, tokens, autocast, device)
    rows.append(
        row("moas fused (one QKV, one SDPA, one O)", "moas branch by branch", out, grad, tol)
    )

    moa = variant_config(
        {
            **sizes,
            "name": "moa",
            "dropout": 0.0,
            "n_experts": 8,
            "top_k": 2,
            "expert_matmul": "dense",
        }
    )
    out, grad = compare_lms(moa, {"expert_matmul": "grouped"}, vocab, tokens, autocast, device)
    rows.append(row("moa grouped experts (k < E)", "moa dense experts", out, grad, tol))

    kernel = grouped_kernel_against_reference(device)
    if kernel is not None:
        rows.append(row("grouped GEMM kernel (bf16)", "group-by-group matmuls", *kernel, BF16_TOL))

    out, grad = gqa_against_repeated_kv(device, low)
    rows.append(row("gqa via SDPA enable_gqa", "K/V repeated per query head", out, grad, tol))

    cfg.fused = True
    compiled = lambda m: torch.compile(m, backend=compile_backend)  # noqa: E731
    out, grad = compare_lms(cfg, {}, vocab, tokens, autocast, device, wrap=compiled)
    rows.append(row(f"torch.compile ({compile_backend})", "eager", out, grad, tol))

    rows.append(
        row("fused AdamW", "for-loop AdamW", fused_adamw_against_plain(device), None, FP32_TOL)
    )
    # bf16 against fp32 is a change of precision, not of algorithm: checked at bf16's looser
    # tolerance
    if cuda:
        out, grad = compare_lms(
            cfg, {}, vocab, tokens, autocast, device, plain_autocast=nullcontext
        )
        rows.append(row("bf16 autocast", "fp32", out, grad, BF16_AGAINST_FP32))
    return rows
