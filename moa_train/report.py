"""`moa-report`: run and multirun folders -> a comparison table, plots and one HTML page.

    moa-report outputs/multiruns/quickstart-moa/2026-11-22_10-00-00 \\
        --out report/ --group-by model.name

Every folder holding summary.json under the given paths is a run. The table groups runs by config
keys (`--group-by`, default model.name) with mean +- std over the runs of a group (seeds); it is
written as report.md and report.csv. Plots (PNG): validation loss over steps for every run, routing
entropy per site over training (with its maximum ln C), and per routed run a site x choice
utilisation heatmap of the last logged step (colour scale fixed at 0..1, so heatmaps compare).
report.html shows the tables and the captioned plots together. Runs are named by their overrides
(.hydra/overrides.yaml) that not every run shares, e.g. `model=moa trainer.seed=1`.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import re
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from moa_train.metrics.plots import pyplot, site_util, utilisation_figure
from moa_train.metrics.sinks import job_overrides
from moa_train.train.tasks import report_metrics

METRICS = (*report_metrics(), "step_ms_median", "params_total")
ROUTING_HEADER = ["run", "site", "entropy (nats)", "max ln C", "utilisation per choice"]


def natural_key(path: Path) -> list:
    """Numbers compared as numbers: a multirun's job 2 before job 10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(path))]


def find_runs(paths: list) -> list:
    runs = []
    for p in map(Path, paths):
        runs += sorted((s.parent for s in p.rglob("summary.json")), key=natural_key)
    return runs


def read_metrics(run: Path) -> list:
    path = run / "metrics.jsonl"
    return (
        [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        if path.is_file()
        else []
    )


def last_routing(rows: list) -> tuple:
    """(step, the routing/* values) of the last line that has them; (None, {}) for a dense run."""
    step, last = None, {}
    for row in rows:
        routing = {k: v for k, v in row.items() if k.startswith("routing/")}
        if routing:
            step, last = row.get("step"), routing
    return step, last


def load_run_record(run: Path) -> dict:
    cfg_path = run / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(cfg_path) if cfg_path.is_file() else OmegaConf.create({})
    rows = read_metrics(run)
    step, routing = last_routing(rows)
    return {
        "run": run,
        "cfg": cfg,
        "summary": json.loads((run / "summary.json").read_text()),
        "rows": rows,
        "routing": routing,
        "routing_step": step,
        "overrides": job_overrides(run),
        "label": run.name,
    }


def common_overrides(records: list) -> list:
    """The overrides every run shares: said once on the page, left out of the run names."""
    if len(records) < 2:
        return []
    shared = set.intersection(*(set(r["overrides"]) for r in records))
    return [o for o in records[0]["overrides"] if o in shared]


def run_labels(records: list) -> list:
    """One name per run: its overrides that not every run shares ('model=moa trainer.seed=1'); the
    folder name where there are none; the folder added where two runs would share a name."""
    shared = set(common_overrides(records))
    labels = [
        " ".join(o for o in r["overrides"] if o not in shared) or r["run"].name for r in records
    ]
    return [
        f"{label} ({r['run'].name})"
        if labels.count(label) > 1 and label != r["run"].name
        else label
        for label, r in zip(labels, records, strict=True)
    ]


def group_key(record: dict, keys: list) -> tuple:
    return tuple(str(OmegaConf.select(record["cfg"], k, default="?")) for k in keys)


def group_table(records: list, keys: list) -> list:
    """One row per group: n runs, and mean/std of each metric present."""
    groups: dict = {}
    for r in records:
        groups.setdefault(group_key(r, keys), []).append(r)
    table = []
    for key, recs in groups.items():
        row = dict(zip(keys, key, strict=True))
        row["runs"] = len(recs)
        for m in METRICS:
            values = [
                r["summary"][m] for r in recs if isinstance(r["summary"].get(m), (int, float))
            ]
            if values:
                row[m] = statistics.mean(values)
                row[m + " std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(row)
    return table


def number(metric: str, value: float) -> str:
    if metric == "params_total":
        return f"{value:,.0f}"
    return f"{value:.1f}" if metric == "step_ms_median" else f"{value:.4f}"


def summary_rows(table: list, keys: list) -> tuple:
    """(header, rows of text) of the grouped table: mean +- std where a group has several runs."""
    metrics = [m for m in METRICS if any(m in row for row in table)]
    rows = []
    for row in table:
        cells = [row[k] for k in keys] + [str(row["runs"])]
        for m in metrics:
            spread = f" ± {number(m, row[m + ' std'])}" if m in row and row["runs"] > 1 else ""
            cells.append(number(m, row[m]) + spread if m in row else "")
        rows.append(cells)
    return [*keys, "runs", *metrics], rows


def entropy_sites(routing: dict) -> list:
    return [k.split("/")[2] for k in routing if k.startswith("routing/entropy/")]


def routing_rows(records: list) -> list:
    """Per routed run and site at the last logged step: entropy, its maximum ln C and the
    utilisation."""
    rows = []
    for r in records:
        for site in entropy_sites(r["routing"]):
            util = site_util(r["routing"], site)
            rows.append(
                [
                    r["label"],
                    site,
                    f"{r['routing'][f'routing/entropy/{site}']:.3f}",
                    f"{math.log(len(util)):.3f}" if util else "",
                    " / ".join(f"{c} {v:.2f}" for c, v in util.items()),
                ]
            )
    return rows


def markdown_table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]) + "\n"


def markdown(records: list, table: list, keys: list) -> str:
    text = markdown_table(*summary_rows(table, keys))
    routing = routing_rows(records)
    if routing:
        text += "\nRouting at the last logged step:\n\n" + markdown_table(ROUTING_HEADER, routing)
    return text


def write_csv(table: list, path: Path) -> None:
    fields = list(dict.fromkeys(k for row in table for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(table)


# --- plots ----------------------------------------------------------------------------------------


def run_style(i: int, plt) -> dict:
    """Run i's colour and dash pattern: runs whose curves coincide (seeds of an untrained router at
    ln C) stay visible as alternating dashes."""
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {"color": colours[i % len(colours)], "ls": ("-", "--", "-.", ":")[i % 4]}


def val_loss_figure(records: list):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, r in enumerate(records):
        pts = [(row["step"], row["val/loss"]) for row in r["rows"] if "val/loss" in row]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", label=r["label"], **run_style(i, plt))
    ax.set(xlabel="step", ylabel="val/loss (nats per token)", title="Validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), title="run")
    return fig


def entropy_figure(routed: list):
    """One panel per routing site: each run's entropy over training, and a dashed line at ln C, the
    maximum (C = the number of choices at the site; a site that routes uniformly reaches it)."""
    plt = pyplot()
    sites = list(dict.fromkeys(s for r in routed for s in entropy_sites(r["routing"])))
    ncols = min(len(sites), 3)
    nrows = math.ceil(len(sites) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4 * ncols, 3 * nrows), sharex=True, sharey=True, squeeze=False
    )
    for ax, site in zip(axes.flat, sites, strict=True):
        key = f"routing/entropy/{site}"
        for i, r in enumerate(routed):
            pts = [(row["step"], row[key]) for row in r["rows"] if key in row]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=r["label"], lw=2, **run_style(i, plt))
        counts = sorted({len(site_util(r["routing"], site)) for r in routed} - {0})
        for c in counts:  # under the runs' lines, which often lie on it
            ax.axhline(math.log(c), color="grey", ls="--", lw=1, zorder=1, label=f"ln {c}")
            ax.text(
                0.02,
                math.log(c),
                f"ln {c} (max, {c} choices)",
                transform=ax.get_yaxis_transform(),
                va="bottom",
                fontsize=7,
                color="dimgrey",
            )
        # from 0: how far below its maximum a site is
        ax.set_ylim(0, 1.1 * math.log(max(counts, default=2)))
        ax.set_title(site, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(sites) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("entropy (nats)")
    handles = [h for h in axes.flat[0].get_lines() if not h.get_label().startswith("ln ")]
    fig.suptitle("Routing entropy per site")
    fig.tight_layout()
    fig.legend(
        handles,
        [h.get_label() for h in handles],
        fontsize=8,
        title="run",
        loc="upper left",
        bbox_to_anchor=(1.0, 0.9),
    )
    return fig


def plot_curves(records: list, out: Path) -> list:
    """Write the PNGs; returns (file name, caption) pairs."""
    plt = pyplot()
    written = []

    def save(fig, name: str, caption: str) -> None:
        # "tight" keeps legends placed outside the axes
        fig.savefig(out / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append((name, caption))

    save(
        val_loss_figure(records),
        "val_loss.png",
        "Validation loss (nats per token; lower is better) at each evaluation step, one line per "
        "run.",
    )
    routed = [r for r in records if r["routing"]]
    if routed:
        save(
            entropy_figure(routed),
            "routing_entropy.png",
            "Routing entropy (nats, the mean over tokens of the entropy of each token's routing "
            "distribution) per site over training, one line per routed run. The dashed line is ln "
            "C, its maximum (C = the number of choices at the site): near it the router spreads "
            "tokens evenly; near 0 each token picks one choice.",
        )
    for i, r in enumerate(routed):
        save(
            utilisation_figure(r["routing"], f"{r['label']} (step {r['routing_step']})"),
            f"utilisation_{i}.png",
            f"Utilisation of run {r['label']} at its last logged step ({r['routing_step']}): the "
            "share of routing each choice (column) receives at each site (row); each site's row "
            "sums to 1. The colour scale is fixed at 0..1 for every run.",
        )
    return written


# --- the page -------------------------------------------------------------------------------------

CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em;"
    "color:#222}\n"
    "table{border-collapse:collapse;margin:0.5em 0 2em}"
    "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}\n"
    "th{background:#eee}td:first-child,th:first-child{text-align:left}"
    "caption{text-align:left;padding:4px 0;color:#444}\n"
    "figure{margin:1.5em 0 2.5em}.heatmaps{display:flex;flex-wrap:wrap;gap:0 2em}\n"
    ".heatmaps figure{flex:0 1 520px}figcaption{max-width:60em;color:#444}img{max-width:100%}"
    "code{background:#f3f3f3}"
)


def html_table(header: list, rows: list, caption: str) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>\n" for row in rows
    )
    return (
        f"<table><caption>{html.escape(caption)}</caption>\n<thead><tr>{head}</tr></thead>\n"
        f"<tbody>{body}</tbody></table>"
    )


def runs_rows(records: list, root: Path | None) -> list:
    """Per run: its name, its folder (relative to the one folder given), steps and final losses."""
    rows = []
    for r in records:
        run, summary = r["run"].resolve(), r["summary"]
        folder = run.relative_to(root) if root and run.is_relative_to(root) else run
        losses = [
            number(m, summary[m]) if isinstance(summary.get(m), (int, float)) else ""
            for m in ("val/loss", "test/loss")
        ]
        rows.append([r["label"], str(folder), summary.get("steps", ""), *losses])
    return rows


def intro(records: list, root: Path | None) -> str:
    where = f" under <code>{html.escape(str(root))}</code>" if root else ""
    shared = common_overrides(records)
    common = (
        f" Overrides common to every run: <code>{html.escape(' '.join(shared))}</code>."
        if shared
        else ""
    )
    return f"<h1>moa_train report</h1><p>{len(records)} runs{where}.{common}</p>"


def write_html(
    out: Path, records: list, table: list, keys: list, images: list, root: Path | None = None
) -> None:
    parts = [intro(records, root)]
    parts.append(
        html_table(
            *summary_rows(table, keys),
            f"Runs grouped by {', '.join(keys)}: mean ± std over each group's runs (seeds). Losses "
            "in nats per token, step_ms_median in milliseconds. Also as report.csv.",
        )
    )
    parts.append(
        html_table(
            ["run", "folder", "steps", "val/loss", "test/loss"],
            runs_rows(records, root),
            "Every run, named by the overrides not every run shares, and its folder.",
        )
    )
    routing = routing_rows(records)
    if routing:
        parts.append(
            html_table(
                ROUTING_HEADER,
                routing,
                "Routing at each run's last logged step: the entropy of the "
                "routing distribution (nats), its maximum ln C, and each choice's share.",
            )
        )
    figures = {
        name: f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, caption in images
    }
    parts += [f for name, f in figures.items() if not name.startswith("utilisation_")]
    heatmaps = [f for name, f in figures.items() if name.startswith("utilisation_")]
    if heatmaps:  # side by side, to compare runs at a glance
        parts.append('<div class="heatmaps">' + "\n".join(heatmaps) + "</div>")
    (out / "report.html").write_text(
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>moa_train report"
        f"</title><style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n",
        encoding="utf-8",
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="moa-report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", help="run folders or folders holding them (multiruns)")
    parser.add_argument(
        "--paper-tables",
        action="store_true",
        help="rebuild docs/results/moas_table1.* and translation.* from docs/results/runs/ "
        "(into --out when given)",
    )
    parser.add_argument(
        "--out", type=Path, help="folder for report.{md,csv,html} and the PNGs (default: print)"
    )
    parser.add_argument(
        "--group-by", nargs="+", default=["model.name"], help="config keys to group runs by"
    )
    args = parser.parse_args(argv)
    if args.paper_tables:
        from moa_train.results import moas_table1, translation

        # --out: elsewhere
        for name, module in (("moas_table1", moas_table1), ("translation", translation)):
            module.main(
                ["--tables-only"] + ([] if args.out is None else ["--out", str(args.out / name)])
            )
        return
    records = [load_run_record(r) for r in find_runs(args.paths)]
    if not records:
        raise SystemExit(f"error: no run folder (with summary.json) under {', '.join(args.paths)}")
    for record, label in zip(records, run_labels(records), strict=True):
        record["label"] = label
    table = group_table(records, args.group_by)
    table_md = markdown(records, table, args.group_by)
    print(table_md, end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text(table_md)
        write_csv(table, args.out / "report.csv")
        root = Path(args.paths[0]).resolve() if len(args.paths) == 1 else None
        write_html(args.out, records, table, args.group_by, plot_curves(records, args.out), root)


if __name__ == "__main__":
    main()
