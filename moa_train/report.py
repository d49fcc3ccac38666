"""`moa-report`: run and multirun folders -> a comparison table, plots and one HTML page.

    moa-report outputs/multiruns/quickstart-moa/2026-11-22_10-00-00 --out report/ --group-by model.name

Every folder holding summary.json under the given paths is a run. The table groups runs by config keys
(`--group-by`, default model.name) with mean +- std over the runs of a group (seeds); it is written as report.md
and report.csv. Plots (PNG): validation loss over steps for every run, routing entropy per site over training,
and per routed run a site x choice utilisation heatmap of the last logged step. report.html shows them together.
"""
from __future__ import annotations

import argparse
import csv
import html
import json
import statistics
from pathlib import Path

from omegaconf import OmegaConf

METRICS = ("val/loss", "val/bpc", "test/loss", "val/bleu", "test/bleu", "step_ms_median", "params_total")


def find_runs(paths: list) -> list:
    runs = []
    for p in map(Path, paths):
        runs += sorted(s.parent for s in p.rglob("summary.json"))
    return runs


def read_metrics(run: Path) -> list:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


def last_routing(rows: list) -> dict:
    """The routing/* values of the last line that has them."""
    last = {}
    for row in rows:
        routing = {k: v for k, v in row.items() if k.startswith("routing/")}
        if routing:
            last = routing
    return last


def load_run_record(run: Path) -> dict:
    cfg_path = run / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(cfg_path) if cfg_path.is_file() else OmegaConf.create({})
    rows = read_metrics(run)
    return {"run": run, "cfg": cfg, "summary": json.loads((run / "summary.json").read_text()), "rows": rows,
            "routing": last_routing(rows)}


def group_key(record: dict, keys: list) -> tuple:
    return tuple(str(OmegaConf.select(record["cfg"], k, default="?")) for k in keys)


def group_table(records: list, keys: list) -> list:
    """One row per group: n runs, and mean/std of each metric present."""
    groups: dict = {}
    for r in records:
        groups.setdefault(group_key(r, keys), []).append(r)
    table = []
    for key, recs in groups.items():
        row = {k: v for k, v in zip(keys, key)}
        row["runs"] = len(recs)
        for m in METRICS:
            values = [r["summary"][m] for r in recs if isinstance(r["summary"].get(m), (int, float))]
            if values:
                row[m] = statistics.mean(values)
                row[m + " std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(row)
    return table


def markdown(table: list, keys: list) -> str:
    metrics = [m for m in METRICS if any(m in row for row in table)]
    lines = ["| " + " | ".join([*keys, "runs", *metrics]) + " |", "|---" * (len(keys) + 1 + len(metrics)) + "|"]
    for row in table:
        cells = [row[k] for k in keys] + [str(row["runs"])]
        cells += [f"{row[m]:.4f} +- {row[m + ' std']:.4f}" if m in row else "" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def routing_cell(routing: dict) -> str:
    """'layer0: H 0.93, mha 0.41 / gqa 0.32 / mqa 0.27; layer1: ...' from the final routing metrics."""
    sites = sorted({k.split("/")[2] for k in routing if k.startswith("routing/entropy/")})
    parts = []
    for site in sites:
        util = {k.split("/")[3]: v for k, v in routing.items() if k.startswith(f"routing/util/{site}/")}
        shares = " / ".join(f"{c} {v:.2f}" for c, v in util.items())
        parts.append(f"{site}: H {routing[f'routing/entropy/{site}']:.3f}, {shares}")
    return "; ".join(parts)


def routing_markdown(records: list, keys: list) -> str:
    """Per routed run: entropy (nats) and utilisation per site at the last logged step."""
    routed = [r for r in records if r["routing"]]
    if not routed:
        return ""
    lines = ["", "| run | routing at the last logged step (entropy; utilisation) |", "|---|---|"]
    lines += [f"| {run_label(r, keys)} | {routing_cell(r['routing'])} |" for r in routed]
    return "\n".join(lines) + "\n"


def write_csv(table: list, path: Path) -> None:
    fields = list(dict.fromkeys(k for row in table for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(table)


def run_label(record: dict, keys: list) -> str:
    return f"{'/'.join(group_key(record, keys))} ({record['run'].name})"


def utilisation_figure(routing: dict, title: str):
    """A site x choice heatmap of the routing/util/<site>/<choice> values (also sent to the dashboards)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sorted({k.split("/")[2] for k in routing if k.startswith("routing/util/")})
    choices = list(dict.fromkeys(k.split("/")[3] for k in routing if k.startswith(f"routing/util/{sites[0]}/")))
    grid = [[routing.get(f"routing/util/{s}/{c}", float("nan")) for c in choices] for s in sites]
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * len(choices), 1 + 0.4 * len(sites)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(choices)), choices)
    ax.set_yticks(range(len(sites)), sites, fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def plot_curves(records: list, keys: list, out: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in records:
        pts = [(row["step"], row["val/loss"]) for row in r["rows"] if "val/loss" in row]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=run_label(r, keys))
    ax.set(xlabel="step", ylabel="val/loss (nats per token)", title="Validation loss")
    ax.legend(fontsize=6)
    save(fig, "val_loss.png")

    routed = [r for r in records if r["routing"]]
    if routed:
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in routed:
            sites = sorted({k.split("/")[2] for k in r["routing"] if k.startswith("routing/entropy/")})
            for site in sites:
                key = f"routing/entropy/{site}"
                pts = [(row["step"], row[key]) for row in r["rows"] if key in row]
                ax.plot(*zip(*pts), label=f"{run_label(r, keys)} {site}")
        ax.set(xlabel="step", ylabel="entropy (nats)", title="Routing entropy per site")
        ax.legend(fontsize=5)
        save(fig, "routing_entropy.png")
    for i, r in enumerate(routed):
        save(utilisation_figure(r["routing"], f"Utilisation: {run_label(r, keys)}"), f"utilisation_{i}.png")
    return written


def write_html(out: Path, table_md: str, images: list) -> None:
    body = [f"<h1>moa_train report</h1><pre>{html.escape(table_md)}</pre>",
            '<p>Table as CSV: <a href="report.csv">report.csv</a></p>']
    body += [f'<figure><img src="{name}" alt="{name}"><figcaption>{name}</figcaption></figure>' for name in images]
    (out / "report.html").write_text("<!doctype html><html><head><meta charset='utf-8'><title>moa_train report"
                                     "</title></head><body>" + "\n".join(body) + "</body></html>\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="moa-report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", help="run folders or folders holding them (multiruns)")
    parser.add_argument("--paper-tables", action="store_true",
                        help="rebuild docs/results/moas_table1.* and translation.* from docs/results/runs/ "
                             "(into --out when given)")
    parser.add_argument("--out", type=Path, help="folder for report.{md,csv,html} and the PNGs (default: print)")
    parser.add_argument("--group-by", nargs="+", default=["model.name"], help="config keys to group runs by")
    args = parser.parse_args(argv)
    if args.paper_tables:
        from moa_train.results import moas_table1, translation

        for name, module in (("moas_table1", moas_table1), ("translation", translation)):  # --out: elsewhere
            module.main(["--tables-only"] + ([] if args.out is None else ["--out", str(args.out / name)]))
        return
    records = [load_run_record(r) for r in find_runs(args.paths)]
    if not records:
        raise SystemExit(f"error: no run folder (with summary.json) under {', '.join(args.paths)}")
    table = group_table(records, args.group_by)
    table_md = markdown(table, args.group_by) + routing_markdown(records, args.group_by)
    print(table_md, end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text(table_md)
        write_csv(table, args.out / "report.csv")
        write_html(args.out, table_md, plot_curves(records, args.group_by, args.out))


if __name__ == "__main__":
    main()
