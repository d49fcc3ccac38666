"""moa-bench: the training step of every attention variant, timed against the card's peaks measured
in the same run.

    moa-bench                                         # every model at both sizes (GPU: ~10 min)
    moa-bench --sizes table1 --models mha,moa_sparse  # a subset, to fit a time budget
    moa-bench --sizes gpt2 --batch 16

Each (size, model) runs the trainer's own step (`Trainer.train_steps`: the same compile, CUDA graph,
fused AdamW and FLOP counter as training) and records: the median step time over timed windows,
tokens/s, FLOPs per token (the models' counter), MFU against the measured peak of the precision
used, peak memory, the share of the step spent waiting for data (the step time that a fixed,
pre-drawn batch saves), and graph breaks (torch._dynamo.explain of the compiled loss). Before the
models: the peak GEMM rates (bf16, TF32), the SDPA backends on the GPT-2 attention shape, and every
fast path against its plain path (moa_train.fastpaths). At GPT-2 size each model also gets a kernel
breakdown of one step (torch.profiler).

Results merge into <out>/bench.json (keyed by size/model, each entry naming the run that measured
it) and <out>/bench.md is rebuilt from the whole file, so runs split over several calls add up to
one table. <out> is outputs/bench/ under the working directory unless --out names another folder;
--publish writes into the checkout's docs/results/ (the committed figures).

A busy machine is noticed, not trusted (common.contention): a copy-bandwidth probe at the start and
after each model (against the floor of an idle card of its class, and against the first probe),
the spread of each model's timed windows, and on a CPU the load average at the start. A flagged
run or row records `contention: {flagged, reasons}`, gets a WARNING line in the terminal and a
**[contention]** marker in bench.md.

`moa-bench --decode` is the inference benchmark instead (moa_train/bench/decode.py; `moa-bench
--decode --help`): prefill and decode tokens/s of every model through its static KV cache (compiled,
CUDA graph), KV bytes per token (analytic and measured), the share of the copy-bandwidth bound
achieved, and transformers' generate() as the baseline, into <out>/inference.{json,md,png}.
"""

from __future__ import annotations

import datetime
import json
import logging
import shlex
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from moa_train.bench import common
from moa_train.config import bench_presets
from moa_train.errors import Parser
from moa_train.metrics.flops import device_name, measure_matmul_flops, peak_kind
from moa_train.tables import table_lines
from moa_train.timing import repeat_times

# every model choice, each variant represented by its named presets where it has any (moa:
# moa_dense, moa_sparse)
MODELS = bench_presets()

log = logging.getLogger(__name__)


# --- one model ------------------------------------------------------------------------------------


def graph_breaks(trainer) -> dict:
    """Graphs and breaks that torch._dynamo sees in the trained function (model forward + losses +
    routing records)."""
    explained = torch._dynamo.explain(trainer.loss)(trainer.draw_batches()[0], True)
    torch._dynamo.reset()
    reasons = sorted(
        {str(getattr(b, "reason", b)).splitlines()[0] for b in explained.break_reasons}
    )
    return {
        "graphs": explained.graph_count,
        "graph_breaks": explained.graph_break_count,
        "break_reasons": reasons,
    }


KERNEL_KINDS = (  # (kind, substrings of the CUDA kernel name), first match wins
    ("grouped GEMM", ("grouped", "group_gemm")),
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("GEMM", ("gemm", "cutlass", "nvjet", "xmma", "sm90_", "sm80_", "cublas")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("fused elementwise (Triton)", ("triton",)),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def kernel_breakdown(trainer, device: torch.device) -> dict:
    """GPU time per kernel kind in one eager (compiled, not graph-captured) training step."""
    from torch.profiler import ProfilerActivity, profile

    common.sync(device)
    # the profiler's own messages on stderr stay out of the terminal
    with common.captured_stderr():
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            trainer.train_steps(1)
            common.sync(device)
        events = prof.key_averages()
    kinds: dict = {}
    top = []
    for evt in events:
        t = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if t <= 0:
            continue
        kinds[kernel_kind(evt.key)] = kinds.get(kernel_kind(evt.key), 0.0) + t / 1000
        top.append((t / 1000, evt.key[:90], evt.count))
    top.sort(reverse=True)
    return {
        "ms_by_kind": kinds,
        "kernel_ms": sum(kinds.values()),
        "top": [{"ms": ms, "kernel": k, "calls": c} for ms, k, c in top[:8]],
    }


def timed_steps(trainer, steps: int, batches: list | None = None) -> float:
    """Seconds per training step over `steps` steps (on `batches` each step; default: batches drawn
    per step)."""
    [seconds] = repeat_times(lambda: trainer.train_steps(steps, batches=batches), 1)
    return seconds / steps


@contextmanager
def benched_trainer(trainer_class, cfg):
    """A Trainer in a temporary run folder, within its kernel settings (TF32, SDPA backend) for
    everything the benchmark does with it, the caller's settings back afterwards."""
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = trainer_class(cfg, Path(run_dir))
        with trainer.kernel_settings():
            yield trainer


def bench_model(size: str, model: str, batch: int, device: torch.device, peaks: dict, args) -> dict:
    from moa_train.train.cuda_graph import WARMUP_STEPS
    from moa_train.train.loop import Trainer

    cfg, overrides = common.compose_cfg(size, model, batch, device, args.override)
    with benched_trainer(Trainer, cfg) as trainer:
        entry = {
            "size": size,
            "model": model,
            "tag": args.tag,
            "batch": batch,
            "block": cfg.trainer.block_size,
            "overrides": overrides,
            "precision": cfg.trainer.precision,
            "compile": cfg.trainer.compile,
            "cuda_graph": trainer.use_graph,
            "params": trainer.model.num_params(),
            "flops_per_token": trainer.flops_per_token,
        }
        if cfg.trainer.compile:
            entry.update(graph_breaks(trainer))
        t0 = time.perf_counter()
        # compilation; the last warm-up step is profiled (kernels visible)
        for i in range(WARMUP_STEPS):
            if i == WARMUP_STEPS - 1 and args.profile and device.type == "cuda":
                entry["kernels"] = kernel_breakdown(trainer, device)
                continue
            trainer.train_steps(1)
        common.sync(device)
        entry["warmup_s"] = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.train_steps(2)  # the capture and a first replay, untimed
        # timed windows, alternating: real batches drawn each step / one fixed batch (no data work
        # at all); the share of the step spent waiting for data is the time the fixed batch saves
        fixed = trainer.draw_batches()
        times, times_fixed = [], []
        for _ in range(args.windows):
            for batches, out in ((None, times), (fixed, times_fixed)):
                out.append(timed_steps(trainer, args.steps, batches))
        step_s, fixed_s = statistics.median(times), statistics.median(times_fixed)
        tokens = batch * cfg.trainer.block_size
        peak = peaks[peak_kind(cfg.trainer.precision, cfg.trainer.tf32)]
        entry.update(
            {
                "step_ms": 1000 * step_s,
                "step_ms_windows": [1000 * t for t in times],
                "step_ms_fixed_windows": [1000 * t for t in times_fixed],
                "tokens_per_s": tokens / step_s,
                "mfu": trainer.flops_per_token * tokens / step_s / peak,
                "peak_kind": peak_kind(cfg.trainer.precision, cfg.trainer.tf32),
                "data_wait_share": (step_s - fixed_s) / step_s,
                "step_ms_fixed_batch": 1000 * fixed_s,
                "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
                if device.type == "cuda"
                else None,
                "contention": common.contention(
                    device.type,
                    device_name(device),
                    windows={"step windows": times, "fixed-batch step windows": times_fixed},
                ),
            }
        )
        del trainer
    common.release(device)
    return entry


def bench_with_fallback(
    size: str, model: str, batch: int, device: torch.device, peaks: dict, args
) -> dict:
    """bench_model, halving the batch on out-of-memory (the entry records the batch that ran)."""
    while True:
        try:
            return bench_model(size, model, batch, device, peaks, args)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
        # outside the except block: its traceback would keep the failed trainer (and its GPU memory)
        # alive
        common.release(device)
        log.warning("%s/%s: out of memory at batch %d; trying %d", size, model, batch, batch // 2)
        batch //= 2


# --- whole-run measurements -----------------------------------------------------------------------


def sdpa_backends(device: torch.device, batch: int) -> list:
    """Forward + backward time of causal SDPA at the GPT-2 shape (B, 12 heads, T 1024, 64) per
    backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, t, d = batch, 12, 1024, 64
    q, k, v = (
        torch.randn(b, h, t, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    flops = 12 * b * h * t * t * d  # the FLOP counter's count: 4BHT^2D forward, twice that backward

    def forward_backward() -> None:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(torch.ones_like(out))

    rows = []
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        backend = getattr(SDPBackend, name, None)
        try:
            with sdpa_kernel([backend]):
                times = repeat_times(forward_backward, 10, warmup=3)
            ms = 1000 * statistics.median(times)
            rows.append({"backend": name.lower(), "ms": ms, "tflops": flops / ms / 1e9})
        except (RuntimeError, TypeError) as exc:
            rows.append({"backend": name.lower(), "error": str(exc).splitlines()[0][:120]})
    return rows


def fast_path_checks(device: torch.device) -> list:
    from moa_train.config import ModelConfig
    from moa_train.fastpaths import check_all

    m = ModelConfig(name="mha", d_model=384, n_layer=4, n_head=6, max_seq_len=256)
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    if device.type == "cpu":
        m.d_model, m.n_layer, m.n_head, m.max_seq_len = 64, 2, 4, 64
    rows = check_all(device, m, 283, 4, m.max_seq_len, backend)
    torch._dynamo.reset()
    return rows


# --- results --------------------------------------------------------------------------------------

TARGETS = (
    "gpt2/mha MFU >= 55%; gpt2/moas_dynamic >= 45%; "
    "gpt2/moa_sparse >= 40% and faster than moa_dense"
)


def targets(results: dict) -> list:
    """(target, measured, met) rows from whatever the results hold."""
    rows = []
    for model, floor in (("mha", 0.55), ("moas_dynamic", 0.45), ("moa_sparse", 0.40)):
        r = results.get(f"gpt2/{model}")
        if r:
            rows.append(
                (f"GPT-2 small {model}: MFU >= {floor:.0%}", f"{r['mfu']:.1%}", r["mfu"] >= floor)
            )
    sparse, dense = results.get("gpt2/moa_sparse"), results.get("gpt2/moa_dense")
    if sparse and dense:
        ratio = sparse["tokens_per_s"] / dense["tokens_per_s"]
        rows.append(
            ("GPT-2 small moa_sparse faster per token than moa_dense", f"{ratio:.2f}x", ratio > 1)
        )
    mha = results.get("table1/mha")
    for model in ("moas_static", "moas_dynamic", "moa_dense", "moa_sparse"):
        r = results.get(f"table1/{model}")
        if mha and r:
            t_ratio, f_ratio = (
                r["step_ms"] / mha["step_ms"],
                r["flops_per_token"] / mha["flops_per_token"],
            )
            rows.append(
                (
                    f"Table 1 size {model}: time ratio <= 1.15 x FLOP ratio ({1.15 * f_ratio:.2f})",
                    f"{t_ratio:.2f} (FLOPs {f_ratio:.2f})",
                    t_ratio <= 1.15 * f_ratio,
                )
            )
    for key, r in sorted(results.items()):
        if r["data_wait_share"] >= 0.02:
            rows.append((f"{key}: data wait < 2%", f"{r['data_wait_share']:.1%}", False))
    waits = [r["data_wait_share"] for r in results.values()]
    if waits:
        rows.append(
            ("data wait < 2% of the step (worst model)", f"{max(waits):.2%}", max(waits) < 0.02)
        )
    return rows


def kernel_tables(size: str, rows: list) -> list:
    """Markdown lines: GPU time per kernel kind in one profiled step of each model, and the top
    kernels."""
    if not rows:
        return []
    kinds = sorted({kind for r in rows for kind in r["kernels"]["ms_by_kind"]})
    out = [
        "",
        f"## Kernel breakdown of one {size}-size step",
        "",
        (
            "GPU time per kernel kind in one compiled step run eagerly (the profiled step is not "
            "graph-captured; the timed steps are). `idle` = measured step time - kernel time: "
            "launch gaps, host work."
        ),
        "",
        *table_lines(
            ["model", *kinds, "kernels total", "step (graph)", "idle"],
            [kernel_cells(r, kinds) for r in rows],
        ),
    ]
    for r in rows:
        out += ["", f"Top kernels, {size}/{r['model']}:", ""]
        out += [f"- {t['ms']:.2f} ms x{t['calls']}: `{t['kernel']}`" for t in r["kernels"]["top"]]
    return out


SIZE_HEADER = (
    "model",
    "batch x block",
    "step ms (median)",
    "tokens/s",
    "GFLOPs/token",
    "MFU",
    "peak mem GiB",
    "data wait",
    "graph breaks",
    "CUDA graph",
    "run",
)


def label(r: dict) -> str:
    """A result's model, with its tag (`--tag`) where it has one."""
    return r["model"] + ("@" + r["tag"] if r.get("tag") else "")


def kernel_cells(r: dict, kinds: list) -> list:
    k = r["kernels"]
    ms = [k["ms_by_kind"].get(kind, 0) for kind in kinds]
    return [
        label(r),
        *(f"{t:.2f} ({t / k['kernel_ms']:.0%})" for t in ms),
        f"{k['kernel_ms']:.2f}",
        f"{r['step_ms']:.2f}",
        f"{max(r['step_ms'] - k['kernel_ms'], 0):.2f}",
    ]


def size_cells(r: dict) -> list:
    """A result's cells in its size's table."""
    return [
        label(r) + common.mark(r.get("contention")),
        f"{r['batch']} x {r['block']}",
        f"{r['step_ms']:.2f}",
        f"{r['tokens_per_s']:,.0f}",
        f"{r['flops_per_token'] / 1e9:.3g}",
        f"{r['mfu']:.1%} ({r['peak_kind']})",
        common.fmt(r["peak_mem_gib"], ".1f"),
        f"{r['data_wait_share']:.2%}",
        r.get("graph_breaks", "-"),
        "yes" if r["cuda_graph"] else "no",
        r["run"],
    ]


RUNS_HEADER = ("commit", "peak bf16 TFLOP/s", "peak TF32 TFLOP/s")


def run_cells(run: dict) -> list:
    return [
        run.get("git_sha") or "-",
        f"{run['peaks'].get('bf16', 0) / 1e12:.3g}",
        f"{run['peaks'].get('tf32', 0) / 1e12:.3g}",
    ]


CHECKS_HEADER = (
    "fast path",
    "plain path",
    "output rel. error",
    "gradient rel. error",
    "tolerance",
    "ok",
)


def markdown(bench: dict, notes: str | None) -> str:
    results = bench["results"]
    out = [
        "# moa-bench: training-step speed of every attention variant",
        "",
        (
            "Written by `moa-bench` (moa_train/bench/train.py) from bench.json; each table row "
            "names the run that measured it. MFU = FLOPs per token (the models' own counter: 6 x "
            "matmul parameters used + 12 x heads x head_dim x T) x tokens/s / the peak GEMM rate "
            "of the run's precision, measured at the start of the same run. Data wait = (step time "
            "with a batch drawn per step - step time with one fixed batch) / step time, from "
            "alternating timed windows; values near 0 (or below) are within timing noise."
        ),
        "",
        *common.runs_section(bench["runs"], RUNS_HEADER, run_cells),
        "",
        "## Targets",
        "",
        (
            f"Asked for: {TARGETS}; Table 1 size: each routed row's step-time ratio to mha at "
            "most 1.15x its FLOP ratio; data wait < 2%."
        ),
        "",
        *table_lines(
            ["target", "measured", "met"],
            [[t, m, "yes" if ok else "**no**"] for t, m, ok in targets(results)],
        ),
    ]
    for size in ("table1", "gpt2", "tiny"):
        rows = [r for k, r in sorted(results.items()) if r["size"] == size]
        if not rows:
            continue
        rows.sort(key=lambda r: (list(MODELS).index(r["model"]), r.get("tag") or ""))
        out += [
            "",
            f"## Size {size}",
            "",
            *table_lines(SIZE_HEADER, [size_cells(r) for r in rows]),
        ]
        reasons = {r["model"]: r["break_reasons"] for r in rows if r.get("break_reasons")}
        for model, why in reasons.items():
            out.append(f"\nGraph breaks in {model}: " + "; ".join(why))
        out += common.contention_notes((f"{size}/{label(r)}", r.get("contention")) for r in rows)
    for size in ("table1", "gpt2"):
        out += kernel_tables(
            size, [r for k, r in sorted(results.items()) if r.get("kernels") and r["size"] == size]
        )
    for rid, run in sorted(bench["runs"].items()):
        if run.get("sdpa"):
            out += [
                "",
                (
                    f"## SDPA backends (run {rid}): causal, bf16, batch {run['sdpa_batch']} x 12 "
                    "heads x 1024 x 64, forward + backward"
                ),
                "",
                *table_lines(
                    ["backend", "ms", "TFLOP/s (counter's count)"],
                    [
                        [
                            s["backend"],
                            common.fmt(s.get("ms"), ".2f"),
                            common.fmt(s.get("tflops"), ".0f"),
                        ]
                        if "ms" in s
                        else [s["backend"], f"unavailable: {s['error']}", "-"]
                        for s in run["sdpa"]
                    ],
                ),
            ]
        if run.get("checks"):
            out += [
                "",
                f"## Fast paths against plain paths (run {rid}, {run['device']})",
                "",
                *table_lines(
                    CHECKS_HEADER,
                    [
                        [
                            c["path"],
                            c["reference"],
                            f"{c['out_err']:.1e}",
                            common.fmt(c["grad_err"], ".1e"),
                            f"{c['tol']:.0e}",
                            "yes" if c["ok"] else "**no**",
                        ]
                        for c in run["checks"]
                    ],
                ),
            ]
    if notes:
        out += ["", notes.strip()]
    return "\n".join(out) + "\n"


def save(bench: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(bench, indent=1))
    notes = out / "bench_notes.md"
    (out / "bench.md").write_text(markdown(bench, notes.read_text() if notes.is_file() else None))


# --- entry point ----------------------------------------------------------------------------------


def parse_args(argv):
    p = Parser(prog="moa-bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}"
    )
    p.add_argument(
        "--sizes", default="table1,gpt2", help=f"comma-separated, of: {', '.join(common.SIZES)}"
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="sequences per step (default: table1 12, gpt2 64, tiny 4)",
    )
    p.add_argument("--steps", type=int, default=10, help="steps per timed window")
    p.add_argument("--windows", type=int, default=5, help="timed windows (the median is reported)")
    common.add_out_args(p, "bench.json / bench.md")
    p.add_argument(
        "--no-profile", dest="profile", action="store_false", help="skip the kernel breakdown"
    )
    p.add_argument(
        "--no-checks", dest="checks", action="store_false", help="skip the fast-path checks"
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="a moa-train override for every model (repeatable), e.g. trainer.sdpa_backend=cudnn",
    )
    p.add_argument(
        "--tag",
        default=None,
        help="suffix of the result keys (size/model@tag) for runs with --override",
    )
    p.add_argument(
        "--tables-only",
        action="store_true",
        help="rebuild bench.md from bench.json, measure nothing",
    )
    p.add_argument(
        "--decode",
        action="store_true",
        help="the inference benchmark instead, with its own options: moa-bench --decode --help",
    )
    args = p.parse_args(argv)
    for flag, names, allowed in (
        ("--models", args.models, MODELS),
        ("--sizes", args.sizes, common.SIZES),
    ):
        bad = [n for n in names.split(",") if n not in allowed]
        if bad:
            p.error(f"{flag}: unknown {', '.join(bad)}; allowed: {', '.join(allowed)}")
    if args.batch is not None and args.batch < 1:
        p.error(f"--batch: must be a positive integer, got {args.batch}")
    return args


def main(argv=None) -> int:
    argv, args, out, bench = common.begin(argv, parse_args, "bench.json", save)
    if args.tables_only:
        return 0
    from moa_train.train.loop import git_sha

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run_id = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    bandwidth, run_contention = common.probe(device)
    common.warn(f"run {run_id}", run_contention)
    peaks = {kind: measure_matmul_flops(device, kind) for kind in ("bf16", "tf32", "fp32")}
    run = {
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "git_sha": git_sha(),
        "command": shlex.join(["moa-bench", *argv]),
        "peaks": peaks,
        "bandwidth": bandwidth,
        "contention": run_contention,
    }
    log.info("peaks: %s", ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in peaks.items()))
    bench["runs"][run_id] = run
    sizes = args.sizes.split(",")
    if device.type == "cuda":
        run["sdpa_batch"] = args.batch or common.SIZES["gpt2"][1]
        run["sdpa"] = sdpa_backends(device, run["sdpa_batch"])
    if args.checks:
        run["checks"] = fast_path_checks(device)
        log.info(
            "fast-path checks: %s",
            ", ".join(f"{c['path']} {'ok' if c['ok'] else 'FAILED'}" for c in run["checks"]),
        )
    save(bench, out)
    for size in sizes:
        for model in args.models.split(","):
            entry = bench_with_fallback(
                size, model, args.batch or common.SIZES[size][1], device, peaks, args
            )
            entry["run"] = run_id
            key = f"{size}/{model}" + (f"@{args.tag}" if args.tag else "")
            # the run's signals, a copy probe after the model (one busy while it ran likely still
            # is) and the model's own (its windows' spread)
            probed = common.probe(device, first=bandwidth)[1]
            entry["contention"] = common.merge(run_contention, probed, entry["contention"])
            bench["results"][key] = entry
            save(bench, out)  # after every model, so a run cut short keeps what it measured
            log.info(
                "%s/%s: %.2f ms/step, %.0f tok/s, MFU %.1f%%, data wait %.2f%%",
                size,
                model,
                entry["step_ms"],
                entry["tokens_per_s"],
                100 * entry["mfu"],
                100 * entry["data_wait_share"],
            )
            common.warn(key, entry["contention"])
    common.warn_flagged(bench["results"], run_id)
    log.info("results: %s", out / "bench.md")
    failed = [c["path"] for c in run.get("checks", []) if not c["ok"]]
    if failed:
        print(
            "error: fast paths differ from their plain paths beyond tolerance: "
            f"{', '.join(failed)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
