"""Run folders -> comparison tables.

`python -m moa_train.report RUN_OR_SWEEP_DIR ... --out table.md` finds every run folder (one holding summary.json)
under the given paths and writes a markdown table: the model, its size, final losses, speed, and for routed models
the final routing entropy and utilisation per layer.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf


def find_runs(paths: list) -> list:
    runs = []
    for p in map(Path, paths):
        runs += sorted(s.parent for s in p.rglob("summary.json"))
    return runs


def last_routing(metrics_path: Path) -> dict:
    """The routing/* values of the last line that has them."""
    last = {}
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        routing = {k: v for k, v in row.items() if k.startswith("routing/")}
        if routing:
            last = routing
    return last


def load_run_record(run: Path) -> dict:
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    return {"run": run, "cfg": cfg, "summary": json.loads((run / "summary.json").read_text()),
            "routing": last_routing(run / "metrics.jsonl")}


def routing_cell(routing: dict) -> str:
    """'layer0: H 0.93, mha 0.41 / gqa 0.32 / mqa 0.27; layer1: ...' from the final routing metrics."""
    sites = sorted({k.split("/")[2] for k in routing if k.startswith("routing/entropy/")})
    parts = []
    for site in sites:
        util = {k.split("/")[3]: v for k, v in routing.items() if k.startswith(f"routing/util/{site}/")}
        shares = " / ".join(f"{c} {v:.2f}" for c, v in util.items())
        parts.append(f"{site}: H {routing[f'routing/entropy/{site}']:.3f}, {shares}")
    return "; ".join(parts) or "(dense)"


def markdown_table(records: list) -> str:
    head = ("| model | params (non-emb.) | steps | val/loss | val/bpc | test/loss | step ms (median) | "
            "routing at the end (entropy nats; utilisation) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in records:
        s, m = r["summary"], r["cfg"].model
        lines.append(f"| {m.name} | {s['params_non_embedding']:,} | {s['steps']} | {s['val/loss']:.4f} | "
                     f"{s['val/bpc']:.4f} | {s['test/loss']:.4f} | {s['step_ms_median']:.1f} | "
                     f"{routing_cell(r['routing'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run folders or folders holding them")
    parser.add_argument("--out", help="write the markdown table here (default: print)")
    args = parser.parse_args(argv)
    records = [load_run_record(r) for r in find_runs(args.paths)]
    if not records:
        raise SystemExit(f"error: no run folder (with summary.json) under {', '.join(args.paths)}")
    table = markdown_table(records)
    if args.out:
        Path(args.out).write_text(table)
    print(table, end="")


if __name__ == "__main__":
    main()
