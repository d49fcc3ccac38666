"""Data-parallel scaling: tokens/s of GPT-2 small (mha, moas_dynamic) on 1 and 2 GPUs under torchrun
(DDP, bf16, torch.compile), written to docs/results/multigpu.{md,json}.

    python3 scripts/bench_multigpu.py                # 2 models x {1, 2} GPUs, then the tables
    python3 scripts/bench_multigpu.py --tables-only  # rebuild the tables from the run records
    # extra overrides go to every run
    python3 scripts/bench_multigpu.py --models mha --gpus 1 2 trainer.compile=false

Weak scaling: every GPU holds the same batch (--batch sequences of 1024 tokens), so the global batch
doubles on two GPUs; the scaling efficiency is tok/s(2 GPUs) / (2 x tok/s(1 GPU)). tok/s is the
median of the runs' logged `perf/tokens_per_s` windows after the first (which holds compilation and
warm-up). Every argument and override is checked first (one `error:` line, exit 2, nothing
touched). Each run's record (config, train.log, metrics.jsonl, summary.json; the checkpoint is
deleted) is built in <runs-dir>/.staging/<model>-<n>gpu/ and replaces <runs-dir>/<model>-<n>gpu/
once every run of the call has finished (a failed or interrupted call leaves the old records and
tables as they were).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from moa_train.config import applicable, presets
from moa_train.errors import Parser, fail
from moa_train.paths import repo_root
from moa_train.registration import ensure_registered
from moa_train.results import (
    Staging,
    check_overrides,
    check_writable,
    no_records,
    positive_int,
    results_meta,
    summaries,
    unfinished,
    write_text,
)
from moa_train.tables import table_lines

ROOT = repo_root()
MODELS = ("mha", "moas_dynamic")
TARGET = 0.9  # scaling-efficiency target: 2 GPUs reach this share of twice one GPU's tokens/s
# GPT-2 small: 12 layers, d 768, 12 heads, block 1024, vocabulary padded to 50304 (nanoGPT's); the
# data are WikiText-2 characters, whose 283 symbols use the first rows of the embedding: the compute
# is GPT-2's
GPT2_SMALL = (
    "~experiment",
    "data=wikitext2_char",
    "model.n_layer=12",
    "model.d_model=768",
    "model.n_head=12",
    "model.max_seq_len=1024",
    "model.vocab_size=50304",
    "model.dropout=0.0",
    "model.gate_dropout=0.0",
    "trainer.block_size=1024",
    "trainer.precision=bf16",
    "trainer.tf32=true",
    "trainer.compile=true",
    "trainer.cuda_graphs=false",
    "trainer.grad_accum=1",
    "trainer.eval_iters=1",
    "trainer.resume=false",
)


def overrides(model: str, gpus: int, batch: int, steps: int, log_interval: int) -> list:
    """One run's moa-train overrides: `batch` sequences per GPU, evaluation (one batch) only at the
    end."""
    return [
        f"model={model}",
        *applicable(model, GPT2_SMALL),
        f"trainer.batch_size={batch * gpus}",
        f"trainer.eval_batch_size={batch}",
        f"trainer.max_steps={steps}",
        f"trainer.log_interval={log_interval}",
        f"trainer.eval_interval={steps}",
        f"experiment_name=multigpu-{model}",
    ]


def launch(model: str, gpus: int, args, run_dir: Path) -> int:
    """One torchrun job into `run_dir`; its exit code."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={gpus}",
        "-m",
        "moa_train",
        *overrides(model, gpus, args.batch, args.steps, args.log_interval),
        *args.overrides,
        f"hydra.run.dir={run_dir}",
    ]
    print("+", " ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=ROOT).returncode
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return code


def bench(args, runs_dir: Path) -> None:
    """Every (model, GPUs) run in the staging folder, then in place of the old records of the same
    names; a run that fails stops the call and leaves the old records as they were (exit 1)."""
    stage = Staging(runs_dir)
    runs = {f"{model}-{gpus}gpu": (model, gpus) for model in args.models for gpus in args.gpus}
    for run, (model, gpus) in runs.items():
        code = launch(model, gpus, args, stage.root / run)
        if code:
            unfinished([f"{run} (exit {code})"], stage.root)
    stage.commit(list(runs))


def measure(run_dir: Path) -> dict:
    """A run's steady-state speed (the median over the logged windows after the first) and its
    record."""
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    windows = [r for r in lines if "perf/tokens_per_s" in r]
    steady = windows[1:]
    if not steady:
        fail(f"{run_dir} logged fewer than two training windows; rerun it with more --steps")
    return {
        "model": run_dir.name.rpartition("-")[0],
        "gpus": summary["world_size"],
        "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in steady),
        "step_ms": statistics.median(r["perf/step_ms"] for r in steady),
        "mfu": statistics.median(r["perf/mfu"] for r in steady),
        "windows": len(steady),
        "log_interval": windows[0]["step"],
        "tokens_per_step": summary["tokens_seen"] // summary["steps"],
        "params_total": summary["params_total"],
        "run": run_dir.name,
        "device": summary["device_name"],
        "torch": summary["torch_version"],
        "git_sha": summary["git_sha"],
    }


def summarise(runs_dir: Path) -> dict:
    """model -> {"runs": [per GPU count], "efficiency": tok/s(2) / (2 x tok/s(1)) where both
    exist}."""
    out: dict = {}
    for path in summaries(runs_dir, "*/summary.json"):
        row = measure(path.parent)
        out.setdefault(row["model"], {"runs": []})["runs"].append(row)
    for block in out.values():
        block["runs"].sort(key=lambda r: r["gpus"])
        speed = {r["gpus"]: r["tokens_per_s"] for r in block["runs"]}
        if {1, 2} <= speed.keys():
            block["efficiency"] = speed[2] / (2 * speed[1])
    return out


def row_cells(model: str, block: dict, r: dict) -> list:
    """A run's cells: its throughput, and on the 2-GPU row the scaling efficiency."""
    eff = f"{100 * block['efficiency']:.1f}%" if r["gpus"] == 2 and "efficiency" in block else ""
    return [
        model,
        r["gpus"],
        f"{r['params_total'] / 1e6:.1f}M",
        f"{r['tokens_per_step']:,}",
        f"{r['tokens_per_s']:,.0f}",
        f"{r['tokens_per_s'] / r['gpus']:,.0f}",
        f"{r['step_ms']:.1f}",
        f"{100 * r['mfu']:.1f}%",
        eff,
    ]


def markdown(res: dict, meta: dict) -> str:
    lines = [
        "# Data-parallel scaling on 2 GPUs",
        "",
        (
            "GPT-2 small (12 layers, d 768, 12 heads, block 1024, vocabulary 50304) as mha and as "
            "moas_dynamic, WikiText-2 characters, bf16 autocast, TF32, torch.compile, fused AdamW; "
            "DDP under torchrun (one process per GPU, NCCL). Weak scaling: the same batch per GPU, "
            "so the global batch doubles on 2 GPUs."
        ),
        "",
        (
            f"- Command: `{meta['command']}` (`--tables-only` rebuilds these tables from the run "
            "records)"
        ),
        (
            f"- Device: {meta['device']}; torch {meta['torch']}; git {meta['git_sha']}; date "
            f"{meta['date']}"
        ),
        (
            "- tok/s: the whole job's training tokens per second, the median over the logged "
            f"windows of {meta['log_interval']} steps after the first (compilation, warm-up); "
            "evaluation excluded. Scaling efficiency = tok/s(2 GPUs) / (2 x tok/s(1 GPU))."
        ),
        (
            "- Run records (config, train.log, metrics.jsonl, summary.json): "
            "`docs/results/runs/multigpu/<model>-<n>gpu/`"
        ),
        "",
        *table_lines(
            ["model", "GPUs", "params", "tokens / step", "tok/s", "tok/s per GPU", "ms / step"]
            + ["MFU", "scaling efficiency"],
            [row_cells(model, block, r) for model, block in res.items() for r in block["runs"]],
            "lrrrrrrrr",
        ),
    ]
    lines += ["", "## Target", ""]
    for model, block in res.items():
        if "efficiency" in block:
            verdict = "met" if block["efficiency"] >= TARGET else "MISSED"
            lines.append(
                f"- {model}: scaling efficiency {100 * block['efficiency']:.1f}%, target >= "
                f"{100 * TARGET:.0f}%: {verdict}."
            )
    return "\n".join(lines) + "\n"


def check(args) -> None:
    """The runs' arguments and overrides, before anything is written (one line, exit 2)."""
    ensure_registered(plugins=True)  # plugins' presets are models too
    args.models, args.gpus = list(dict.fromkeys(args.models)), list(dict.fromkeys(args.gpus))
    unknown = [m for m in args.models if m not in presets()]
    if unknown:
        fail(f"--models: unknown {', '.join(unknown)}; allowed: {', '.join(presets())}")
    if args.steps < 2 * args.log_interval:
        fail(
            f"--steps: {args.steps} logs fewer than two windows of --log-interval "
            f"{args.log_interval} (the first holds compilation); give at least "
            f"{2 * args.log_interval}"
        )
    for gpus in args.gpus:
        check_overrides(
            [
                [
                    *overrides(model, gpus, args.batch, args.steps, args.log_interval),
                    *args.overrides,
                ]
                for model in args.models
            ],
            world_size=gpus,
        )


def main(argv=None) -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--gpus", nargs="+", type=positive_int, default=[1, 2])
    parser.add_argument(
        "--batch", type=positive_int, default=16, help="sequences of 1024 tokens per GPU"
    )
    parser.add_argument("--steps", type=positive_int, default=60)
    parser.add_argument("--log-interval", type=positive_int, default=10)
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "docs/results/runs/multigpu")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/multigpu")
    parser.add_argument("--tables-only", action="store_true", help="skip the runs")
    parser.add_argument("overrides", nargs="*", help="extra moa-train overrides for every run")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    runs_dir = args.runs_dir.resolve()
    check_writable(out=args.out.parent)
    if not args.tables_only:
        check(args)
        check_writable(runs_dir=runs_dir)
        bench(args, runs_dir)
    res = summarise(runs_dir)
    if not res:
        no_records(args.runs_dir)
    first = next(iter(res.values()))["runs"][0]
    # a rebuild keeps the measuring run's command, date
    kept = results_meta(args.out, args.tables_only)
    meta = {
        "command": kept["command"] or " ".join(["python3 scripts/bench_multigpu.py", *argv]),
        "device": first["device"],
        "torch": first["torch"],
        "git_sha": first["git_sha"],
        "date": kept["date"],
        "log_interval": first["log_interval"],
    }
    write_text(args.out.with_suffix(".json"), json.dumps({"meta": meta, "results": res}, indent=1))
    # hand-written analysis, kept across rebuilds
    notes = args.out.with_name(args.out.name + "_notes.md")
    text = markdown(res, meta) + ("\n" + notes.read_text() if notes.is_file() else "")
    write_text(args.out.with_suffix(".md"), text)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
