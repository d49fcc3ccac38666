"""The measured effects in docs/fidelity.md that no training run gives, measured again on CPU from
the code as it is: each faithful setting against the behaviour before its fix, which its key's
other value still selects. Seeded, deterministic, under two minutes on a CPU.

    python scripts/fidelity_checks.py                 # every section, as markdown on stdout
    python scripts/fidelity_checks.py dropout adam    # some sections
    python scripts/fidelity_checks.py --out docs/results/runs/fidelity_checks_<date>.md

The models, batches and reference computations are those of tests/test_fidelity_fairseq.py
(imported from it): the padded post-LN MoA model whose pads the test pins to fairseq's (zero
inputs, no expert routed for a pad query), the trainer's accumulation step on a stub trainer, and
the share of ReLU units the activation dropout zeroes.
"""

import argparse
import datetime
import math
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from moa_train.config import AuxConfig  # noqa: E402
from moa_train.models.routing import aux_losses  # noqa: E402
from test_fidelity_fairseq import (  # noqa: E402
    PAD,
    V,
    accumulated_grads,
    padded_moa,
    seq2seq,
    zero_share_after_activation,
)


def section_dropout() -> list[str]:
    """The zero share after the decoder's and the encoder's ReLU (train mode), with
    model.decoder_activation_dropout null (before: the encoder's 0.2 in both stacks) and 0.1
    (run.sh's --activation-dropout), over 5 seeds of about 100k positive units each."""
    lines = [
        "## dropout: zero share after the FFN's ReLU (activation_dropout 0.2)",
        "",
        "| decoder_activation_dropout | seed | decoder share | encoder share |",
        "|---|---|---|---|",
    ]
    for value in (None, 0.1):
        model = seq2seq(
            "mha",
            d_model=64,
            activation="relu",
            activation_dropout=0.2,
            decoder_activation_dropout=value,
        ).train()
        shares = {"dec": [], "enc": []}
        for seed in range(5):
            x = torch.randn(8, 100, 64, generator=torch.Generator().manual_seed(seed))
            torch.manual_seed(100 + seed)
            dec = zero_share_after_activation(model.decoder[0].mlp, x)
            enc = zero_share_after_activation(model.encoder[0].mlp, x)
            shares["dec"].append(dec)
            shares["enc"].append(enc)
            lines.append(f"| {value} | {seed} | {dec:.4f} | {enc:.4f} |")
        dec, enc = (sum(v) / len(v) for v in shares.values())
        lines.append(f"| {value} | mean | {dec:.4f} | {enc:.4f} |")
    return lines


def padded_batch(seed: int, rows: int = 4, src_len: int = 9, tgt_len: int = 8) -> tuple:
    """Random sentences, each row padded after a random length of at least 2."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in (src_len, tgt_len):
        ids = torch.randint(3, V, (rows, length), generator=g)
        keep = torch.randint(2, length + 1, (rows,), generator=g)
        keep[0] = length  # one full row: the batch's length
        ids[torch.arange(length)[None] >= keep[:, None]] = PAD
        out.append(ids)
    return tuple(out)


def z_and_ln_bias_grads(model, src, tgt, aux: AuxConfig) -> tuple:
    """The z term (unweighted) and its gradient on every LayerNorm bias."""
    model.zero_grad()
    _, routings = model(src, tgt)
    z = aux_losses(routings, aux)["z"]
    z.backward()
    grads = {
        name: p.grad.clone()
        for name, p in model.named_parameters()
        if name.endswith("norm.bias") and p.grad is not None
    }
    return z.item(), grads


def section_padding() -> list[str]:
    """The z term over every token (model.aux.z_tokens=all) on padded batches, pads kept and routed
    like real tokens (model.pad_positions=kept, before the fix) against pads zeroed as fairseq's
    (zeroed, whose pad logits the test pins to the reference's), float64. Also the z term's
    gradient on the LayerNorm biases."""
    aux = AuxConfig(balance_type="switch", z_coef=0.001, layer_reduce="sum", z_tokens="all")
    zeroed, kept = padded_moa("zeroed").double(), padded_moa("kept").double()
    lines = [
        "## padding: z term (z_tokens=all) on padded batches, pad_positions kept vs zeroed",
        "",
        (
            "Model: tests/test_fidelity_fairseq.py's `padded_moa` (post-LN MoA, E 4, k 2, 2+2"
            " layers, biases, LayerNorms away from (1, 0)). Batches: 4 rows, source 9 and target 8"
            " tokens, rows padded after a random length (seeded); `test`: the test's own batch."
            " z gap = (kept - zeroed) / zeroed. LN-bias gradient: dz/db over every LayerNorm bias,"
            " max |kept - zeroed| of an element, and the largest ||kept - zeroed|| / ||zeroed|| of"
            " one LayerNorm's bias. float64 (the router logits in float32, as the code casts them)."
        ),
        "",
        "| batch | pad share | z zeroed | z kept | z gap | max abs grad diff | max rel grad diff |",
        "|---|---|---|---|---|---|---|",
    ]
    test_batch = (
        torch.tensor([[5, 6, 7, 8, 9], [11, 12, PAD, PAD, PAD]]),
        torch.tensor([[5, 6, 7, 8], [13, 14, 15, PAD]]),
    )
    gaps = []
    for seed in ["test", *range(5)]:
        src, tgt = test_batch if seed == "test" else padded_batch(seed)
        pads = ((src == PAD).sum() + (tgt == PAD).sum()).item() / (src.numel() + tgt.numel())
        z_ref, g_ref = z_and_ln_bias_grads(zeroed, src, tgt, aux)
        z_old, g_old = z_and_ln_bias_grads(kept, src, tgt, aux)
        gap = (z_old - z_ref) / z_ref
        gaps.append(gap)
        abs_diff = max((g_old[n] - g_ref[n]).abs().max().item() for n in g_ref)
        rel_diff = max(((g_old[n] - g_ref[n]).norm() / g_ref[n].norm()).item() for n in g_ref)
        lines.append(
            f"| {seed} | {pads:.2f} | {z_ref:.6f} | {z_old:.6f} | {100 * gap:+.2f}% |"
            f" {abs_diff:.3g} | {rel_diff:.3g} |"
        )
    lines.append(f"| range | | | | {100 * min(gaps):+.2f}% to {100 * max(gaps):+.2f}% | | |")
    return lines


def section_accum() -> list[str]:
    """The gradient of one update over two unequal micro-batches with trainer.grad_accum_norm=mean
    (before the fix) against tokens (fairseq's), relative difference of the flat gradients; and
    tokens against one batch holding both (the faithful one, which should be ~0)."""
    aux = AuxConfig()
    model = seq2seq("mha", dropout=0.0).double()
    g = torch.Generator().manual_seed(5)

    def batch(rows, length):
        tgt = torch.randint(3, V, (rows, length), generator=g)
        src = torch.randint(3, V, (rows, 5), generator=g)
        return {"src": src, "tgt_in": tgt, "tgt_out": tgt, "n_tokens": rows * length}

    def padded_to(b, length):
        pad = torch.full((b["tgt_in"].shape[0], length - b["tgt_in"].shape[1]), PAD)
        return {k: torch.cat([b[k], pad], 1) for k in ("tgt_in", "tgt_out")}

    lines = [
        "## accum: two unequal micro-batches, grad_accum_norm mean vs tokens",
        "",
        (
            "Model: tests/test_fidelity_fairseq.py's `seq2seq('mha')` (d 32, 1+1 layers), float64;"
            " the trainer's step_body on a stub trainer (`accumulated_grads`). Difference:"
            " ||g_mean - g_tokens|| / ||g_tokens||; check: ||g_tokens - g_one_batch|| /"
            " ||g_one_batch||."
        ),
        "",
        "| micro-batches (rows x target tokens) | tokens | mean vs tokens | tokens vs one batch |",
        "|---|---|---|---|",
    ]
    diffs = []
    for (r1, l1), (r2, l2) in (
        ((1, 3), (3, 4)),
        ((2, 4), (2, 6)),
        ((1, 2), (4, 8)),
        ((3, 5), (2, 5)),
    ):
        a, b = batch(r1, l1), batch(r2, l2)
        length = max(l1, l2)
        pa, pb = padded_to(a, length), padded_to(b, length)
        both = {
            "src": torch.cat([a["src"], b["src"]]),
            "tgt_in": torch.cat([pa["tgt_in"], pb["tgt_in"]]),
            "tgt_out": torch.cat([pa["tgt_out"], pb["tgt_out"]]),
            "n_tokens": a["n_tokens"] + b["n_tokens"],
        }
        whole = accumulated_grads(model, [both], "mean", aux)
        tokens = accumulated_grads(model, [a, b], "tokens", aux)
        mean = accumulated_grads(model, [a, b], "mean", aux)
        diff = ((mean - tokens).norm() / tokens.norm()).item()
        check = ((tokens - whole).norm() / whole.norm()).item()
        if a["n_tokens"] != b["n_tokens"]:
            diffs.append(diff)
        lines.append(
            f"| {r1}x{l1}, {r2}x{l2} | {a['n_tokens']}, {b['n_tokens']} | {100 * diff:.1f}% |"
            f" {check:.1e} |"
        )
    lines.append(f"| unequal: range | | {100 * min(diffs):.1f}% to {100 * max(diffs):.1f}% | |")
    return lines


def adam_update(m, v, t, lr, betas, eps, fairseq_eps: bool) -> torch.Tensor:
    """Adam's update (weight decay 0) from the moments after t steps. PyTorch's: -lr/bc1 * m /
    (sqrt(v)/sqrt(bc2) + eps); fairseq's adds eps to sqrt(v) before the bias correction:
    -lr*sqrt(bc2)/bc1 * m / (sqrt(v) + eps)."""
    bc1, bc2 = 1 - betas[0] ** t, 1 - betas[1] ** t
    if fairseq_eps:
        return -lr * math.sqrt(bc2) / bc1 * m / (v.sqrt() + eps)
    return -lr / bc1 * m / (v.sqrt() / math.sqrt(bc2) + eps)


def adam_step(params, grads, state, t, lr, betas, eps, fairseq_eps: bool) -> None:
    """One Adam step in place: the moments, then the update."""
    for p, g, (m, v) in zip(params, grads, state, strict=True):
        m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
        v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        p.add_(adam_update(m, v, t, lr, betas, eps, fairseq_eps))


def section_adam(steps: int = 300) -> list[str]:
    """Two copies of a small model trained on the same batches in float64, one with PyTorch's eps
    placement and one with fairseq's (multi30k_fairseq's Adam: lr 7e-4, betas (0.9, 0.98), eps
    1e-9, constant lr); the manual PyTorch update is checked against torch.optim.Adam first."""
    lr, betas, eps = 7e-4, (0.9, 0.98), 1e-9
    base = seq2seq("mha", dropout=0.0).double()
    g = torch.Generator().manual_seed(6)
    batches = [
        (torch.randint(3, V, (4, 6), generator=g), torch.randint(3, V, (4, 5), generator=g))
        for _ in range(8)
    ]

    def grads_of(model, step):
        src, tgt = batches[step % len(batches)]
        model.zero_grad()
        logits, _ = model(src, tgt)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten()).backward()
        return [p.grad.clone() for p in model.parameters()]

    def copy():
        model = seq2seq("mha", dropout=0.0).double()
        model.load_state_dict(base.state_dict())
        return model

    start = [p.detach().clone() for p in base.parameters()]
    reference, pytorch, fairseq = copy(), copy(), copy()
    torch_adam = torch.optim.Adam(reference.parameters(), lr, betas, eps, foreach=False)
    states = {
        name: [(torch.zeros_like(p), torch.zeros_like(p)) for p in model.parameters()]
        for name, model in (("pytorch", pytorch), ("fairseq", fairseq))
    }
    lines = [
        "## adam: eps placement, PyTorch's vs fairseq's, float64",
        "",
        (
            f"Model: `seq2seq('mha')` (d 32, 1+1 layers), 8 fixed batches in turn, lr {lr}, betas"
            f" {betas}, eps {eps}, {steps} updates. Update gap: ||u_fairseq - u_pytorch|| /"
            " ||u_pytorch|| of update t, both from the same moments (the PyTorch run's); drift:"
            " ||theta_fairseq - theta_pytorch|| / ||theta_pytorch - theta_0|| of the two runs."
        ),
        "",
        "| update | update gap | drift | manual PyTorch vs torch.optim.Adam (max abs) |",
        "|---|---|---|---|",
    ]
    report = {1, 2, 5, 10, 30, 100, steps}
    for t in range(1, steps + 1):
        ref_grads = grads_of(reference, t)
        for p, gr in zip(reference.parameters(), ref_grads, strict=True):
            p.grad = gr
        torch_adam.step()
        for name, model in (("pytorch", pytorch), ("fairseq", fairseq)):
            grads = grads_of(model, t)
            with torch.no_grad():
                params = list(model.parameters())
                adam_step(params, grads, states[name], t, lr, betas, eps, name == "fairseq")
        if t not in report:
            continue
        flat = {
            n: torch.cat([p.detach().flatten() for p in m.parameters()])
            for n, m in (("pytorch", pytorch), ("fairseq", fairseq))
        }
        # both placements from the same moments (the PyTorch trajectory's)
        same = {
            n: torch.cat(
                [
                    adam_update(m, v, t, lr, betas, eps, n == "fairseq").flatten()
                    for m, v in states["pytorch"]
                ]
            )
            for n in ("pytorch", "fairseq")
        }
        gap = ((same["fairseq"] - same["pytorch"]).norm() / same["pytorch"].norm()).item()
        moved = (flat["pytorch"] - torch.cat([p.flatten() for p in start])).norm()
        drift = ((flat["fairseq"] - flat["pytorch"]).norm() / moved).item()
        ref = torch.cat([p.detach().flatten() for p in reference.parameters()])
        check = (ref - flat["pytorch"]).abs().max().item()
        lines.append(f"| {t} | {gap:.2e} | {drift:.2e} | {check:.1e} |")
    return lines


SECTIONS = {
    "dropout": section_dropout,
    "padding": section_padding,
    "accum": section_accum,
    "adam": section_adam,
}


def header(argv: list[str]) -> list[str]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [
        "# Fidelity checks without a training run (docs/fidelity.md)",
        "",
        f"- command: `{' '.join(['python scripts/fidelity_checks.py', *argv])}`",
        f"- date: {datetime.date.today().isoformat()}",
        f"- commit: {commit or 'unknown'} (the code measured; this file is committed after it)",
        f"- CPU: {cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "",
    ]


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sections", nargs="*", help=f"of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}; valid: {', '.join(SECTIONS)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reductions, so the same digits, on every machine
    try:
        lines = header(argv)
        for name in args.sections or list(SECTIONS):
            torch.manual_seed(0)
            lines += [*SECTIONS[name](), ""]
    finally:
        torch.set_num_threads(threads)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
