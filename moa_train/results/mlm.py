"""Reproduce the MoA paper's masked-LM trend: train every row of
configs/experiment/moa_mlm/ for --seeds seeds and write docs/results/mlm.{md,json} from the run
records: per row mean +- std over seeds of val and test perplexity (nats per masked token,
exponentiated), parameters, MACs per token (the model's FLOP counter: training FLOPs / 6, i.e. the
forward's multiply-accumulates), routing entropy and utilisation per layer; and whether the paper's
trend holds here (perplexity falls as E grows at fixed k and head size, and as the head size grows
at about constant MACs), with Welch's t-test between each series' ends.

Runs go to <runs-dir>/.staging/ and replace the old records only once all finished; checkpoints are
deleted, the records (config, metrics.jsonl, summary.json) kept. `--tables-only` rebuilds the
tables from the records.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path

from moa_train.results import (
    DriverParser,
    Staging,
    file_meta,
    no_records,
    note_lines,
    previous_meta,
    run_jobs,
    summaries,
    training_job,
    welch,
    write_results,
)
from moa_train.tables import table_lines

GROUP = "moa_mlm"
ROWS = ("mha", "moa_e4", "moa_e8", "moa_e16", "moa_h32_k4", "moa_h128_k1", "moas_dynamic")
# the paper's two trends: (name, rows in the order the paper says perplexity falls)
SERIES = (
    ("experts E at k=2, head 64", ("moa_e4", "moa_e8", "moa_e16")),
    ("head size at about constant MACs (k halves)", ("moa_h32_k4", "moa_e8", "moa_h128_k1")),
)
STAGING = ".staging"
ALPHA = 0.05


def overrides(row: str, seed: int, extra: list) -> list:
    return [f"experiment={GROUP}/{row}", f"trainer.seed={seed}", *extra]


def names(rows, seeds) -> list:
    return [f"{row}-seed{seed}" for row in rows for seed in seeds]


def reproduce(rows: list, seeds: list, runs_dir: Path, extra: list, n_jobs: int) -> None:
    stage = Staging(runs_dir)
    jobs = [
        training_job(f"{GROUP}/{name}", overrides(row, seed, extra), stage.root / name)
        for row in rows
        for seed in seeds
        for name in [f"{row}-seed{seed}"]
    ]
    failed = run_jobs(jobs, n_jobs)
    stage.stop_if_failed(failed)
    for name in names(rows, seeds):  # records only: the weights are not kept
        for ckpt in (stage.root / name / "checkpoints").glob("*"):
            ckpt.unlink()
    stage.commit(names(rows, seeds))


def routing(run: Path) -> dict:
    """Per layer: the routing entropy and the largest choice's share (1/choices = balanced) of the
    last logged step."""
    last = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if any(k.startswith("routing/") for k in record):
            last = record
    layers = {}
    for key, value in last.items():
        parts = key.split("/")
        if parts[:2] == ["routing", "entropy"]:
            layers.setdefault(parts[2], {})["entropy"] = value
        elif parts[:2] == ["routing", "util"]:
            site = layers.setdefault(parts[2], {})
            site["util_max"] = max(site.get("util_max", 0.0), value)
    return layers


def collect(runs_dir: Path) -> dict:
    """row -> the records of its seeds."""
    table = {}
    for path in summaries(runs_dir, "*/summary.json"):
        row, _, seed = path.parent.name.rpartition("-seed")
        s = json.loads(path.read_text())
        table.setdefault(row, []).append(
            {
                "seed": int(seed),
                "val_ppl": s["val/ppl"],
                "test_ppl": s["test/ppl"],
                "params": s["params_total"],
                "macs_per_token": s["flops_per_token"] / 6,
                "routing": routing(path.parent),
                "device": s["device_name"],
                "torch": s["torch_version"],
                "git_sha": s["git_sha"],
                "steps": s["steps"],
            }
        )
    return table


def _ms(values: list) -> dict:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def summarise(table: dict) -> dict:
    rows = {}
    for row in [r for r in ROWS if r in table] + sorted(set(table) - set(ROWS)):
        recs = sorted(table[row], key=lambda r: r["seed"])
        layers = sorted({k for r in recs for k in r["routing"]}, key=lambda k: int(k[5:]))
        rows[row] = {
            "val_ppl": _ms([r["val_ppl"] for r in recs]),
            "test_ppl": _ms([r["test_ppl"] for r in recs]),
            "params": recs[0]["params"],
            "macs_per_token": recs[0]["macs_per_token"],
            "routing": {
                layer: {
                    k: statistics.mean(r["routing"][layer][k] for r in recs)
                    for k in ("entropy", "util_max")
                    if all(k in r["routing"].get(layer, {}) for r in recs)
                }
                for layer in layers
            },
            "seeds": [r["seed"] for r in recs],
            "steps": recs[0]["steps"],
            "device": recs[0]["device"],
            "torch": recs[0]["torch"],
            "git_sha": recs[0]["git_sha"],
        }
    return {"rows": rows, "trends": [trend(name, series, rows) for name, series in SERIES]}


def trend(name: str, series: tuple, rows: dict) -> dict:
    """Whether val perplexity falls along `series` (monotone in the means) and whether the ends
    differ significantly (Welch, two-sided, ALPHA)."""
    present = [r for r in series if r in rows]
    out = {"series": name, "rows": present}
    if len(present) < 2:
        return {**out, "holds": None, "statement": f"{name}: fewer than two rows trained"}
    means = [rows[r]["val_ppl"]["mean"] for r in present]
    falls = all(b < a for a, b in itertools.pairwise(means))
    first, last = rows[present[0]]["val_ppl"]["values"], rows[present[-1]]["val_ppl"]["values"]
    test = welch(first, last) if min(len(first), len(last)) > 1 else None
    p = test["p"] if test and math.isfinite(test["p"]) else None
    significant = p is not None and p < ALPHA and means[-1] < means[0]
    words = "falls" if falls else "does not fall monotonically"
    sig = (
        f"{present[-1]} vs {present[0]}: Welch p = {p:.3g} "
        + ("(significant at 0.05)" if significant else "(not significant at 0.05)")
        if p is not None
        else "no significance test (one seed)"
    )
    statement = (
        f"{name}: val perplexity {words} along {' -> '.join(present)} "
        f"({' -> '.join(f'{m:.2f}' for m in means)}); {sig}; the paper's trend "
        + ("holds here." if falls and significant else "is not shown here.")
    )
    return {
        **out,
        "holds": falls and significant,
        "monotone": falls,
        "p": p,
        "statement": statement,
    }


def fmt(ms: dict) -> str:
    return f"{ms['mean']:.2f} +- {ms['std']:.2f}"


def markdown(res: dict, meta: dict) -> str:
    lines = [
        "# Masked LM: the MoA paper's trend",
        "",
        (
            f"`{meta['command']}` on {meta['device']}, torch {meta['torch']}, commit "
            f"{meta['git_sha'][:7]}, {meta['date']}. Rows: configs/experiment/moa_mlm/; task=mlm "
            "(BERT masking, 15%, 80/10/10), perplexity = exp(nats per masked token) on the fixed "
            "seeded validation / test masks. MACs/token: the model's FLOP counter / 6 (the "
            "forward's multiply-accumulates per token)."
        ),
        "",
        *note_lines(meta),
    ]
    lines += table_lines(
        ["row", "seeds", "params", "MACs/token", "val ppl", "test ppl"],
        [
            [row, len(r["seeds"]), f"{r['params']:,}", f"{r['macs_per_token']:,.0f}"]
            + [fmt(r["val_ppl"]), fmt(r["test_ppl"])]
            for row, r in res["rows"].items()
        ],
    )
    lines += [
        "",
        (
            "Routing per layer (mean over seeds; entropy in nats, util max = the largest "
            "choice's share, 1/choices when balanced):"
        ),
        "",
    ]
    for row, r in res["rows"].items():
        if r["routing"]:
            cells = "; ".join(
                f"{layer}: H {v.get('entropy', float('nan')):.3f}, util max "
                f"{v.get('util_max', float('nan')):.3f}"
                for layer, v in r["routing"].items()
            )
            lines.append(f"- {row}: {cells}")
    lines += ["", "## Trend", ""] + [f"- {t['statement']}" for t in res["trends"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = DriverParser(__doc__, "mlm")
    parser.add_choices("--rows", ROWS)
    args, runs_dir = parser.parse_checked(
        argv, lambda a: [overrides(row, 0, a.overrides) for row in a.rows]
    )
    if not args.tables_only:
        reproduce(args.rows, list(range(args.seeds)), runs_dir, args.overrides, args.jobs)
    table = collect(runs_dir)
    if not table:
        no_records(args.runs_dir)
    res = summarise(table)
    first = next(iter(res["rows"].values()))
    jobs = previous_meta(args.out).get("jobs", 1) if args.tables_only else args.jobs
    meta = file_meta(
        args, "reproduce_mlm.py", jobs, first, args.overrides, keep_command=True, jobs=jobs
    )
    write_results(args.out, {"meta": meta, "results": res}, markdown(res, meta))
