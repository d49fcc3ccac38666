"""`moa-report`: run and multirun folders -> a comparison table, plots and one HTML page.

    moa-report outputs/multiruns/quickstart/2026-11-22_10-00-00 --out report/

Every folder holding summary.json under the given paths is a run. Runs are grouped by their recipe
(`recipe`): the keys of the model, data, task, optim, schedule and eval nodes and the trainer's keys
that change what is trained or measured (steps, batch, block, precision, ...), not the seed, paths,
loggers, device, speed settings or resume (NOT_RECIPE). The runs of a group are repeats (seeds), so
mean +- std over a group compares like with like. A group is named by its model and the keys that
tell it from the others (`mha data=multi30k_en_de`), and the report lists every key that differs
between groups. `--group-by KEY ...` pools by those keys instead and lists the recipe keys that
differ inside a group. Written: report.md, report.csv, PNG plots (validation loss over steps,
routing entropy per site with its maximum ln C, and per routed run a site x choice utilisation
heatmap on one fixed scale, white at the even share 1/C), one hue per group; and report.html with
the tables and the captioned plots. Runs are named by their overrides (.hydra/overrides.yaml) that
not every run shares, e.g. `model=moa trainer.seed=1`.
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
import statistics
import sys
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moa_train.errors import Parser, fail
from moa_train.metrics.plots import pyplot, site_util, utilisation_figure
from moa_train.metrics.sinks import job_overrides
from moa_train.registration import ensure_registered
from moa_train.tables import markdown_table
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
        "recipe": recipe(cfg),
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


# --- groups ---------------------------------------------------------------------------------------

# the config nodes whose keys make a run what it is: runs that agree on them are repeats
RECIPE_NODES = ("model", "data", "task", "optim", "schedule", "eval", "trainer")
# ...except these, which say where, how fast or how watchfully a run ran, not what it trained and
# measured (two runs that differ only here are seeds of one recipe)
NOT_RECIPE = frozenset(
    {
        "data.root",
        "data.cache_dir",
        *(
            f"trainer.{key}"
            for key in (
                "seed",
                "device",
                "resume",
                "eval_only",
                "log_interval",
                "save_interval",
                "keep_checkpoints",
                "max_bad_steps",
                "compile",
                "compile_backend",
                "compile_mode",
                "cuda_graphs",
                "sdpa_backend",
                "strategy",
                "ddp_bucket_mb",
            )
        ),
    }
)
# the named choices, in the order a group's name gives them
CHOICES = ("model.name", "data.name", "task.name", "optim.name", "schedule.name")
ABSENT = "(absent)"  # a key one run's config has and another's (an older run's) has not


def override_text(value) -> str:
    """A config value as an override writes it: null, true, [0.9, 0.99]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(map(override_text, value)) + "]"
    return str(value)


def flatten(node: dict, prefix: str) -> dict:
    out = {}
    for key, value in node.items():
        dotted = f"{prefix}.{key}"
        out.update(flatten(value, dotted) if isinstance(value, dict) else {dotted: value})
    return out


def recipe(cfg) -> dict:
    """dotted key -> value (as override text) of the run's recipe: every key of RECIPE_NODES but
    NOT_RECIPE's, interpolations resolved where they still resolve."""
    keys = {}
    for node in RECIPE_NODES:
        if node not in cfg:
            continue
        try:
            values = OmegaConf.to_container(cfg[node], resolve=True)
        except OmegaConfBaseException:  # ${oc.env:...} of a variable this process has not
            values = OmegaConf.to_container(cfg[node], resolve=False)
        keys.update(flatten(values, node))
    return {k: override_text(v) for k, v in keys.items() if k not in NOT_RECIPE}


def group_value(group: dict, key: str) -> str:
    """A group's value of a recipe key; where its runs disagree (--group-by), their values."""
    if key in group["mixed"]:
        return " / ".join(group["mixed"][key])
    return group["recipe"].get(key, ABSENT)


def label_part(key: str, text: str) -> str:
    """How a group's name gives a key: the model bare, a choice as its group override (data=...),
    any other key as key=value."""
    if key == "model.name":
        return text
    return f"{key.partition('.')[0]}={text}" if key in CHOICES else f"{key}={text}"


def differing_keys(groups: list) -> list:
    """The recipe keys whose value is not the same in every group: the choices first."""
    keys = dict.fromkeys(k for g in groups for k in (*g["recipe"], *g["mixed"]))
    differ = [k for k in keys if len({group_value(g, k) for g in groups}) > 1]
    return [k for k in CHOICES if k in differ] + [k for k in differ if k not in CHOICES]


def peers(groups: list, g: dict, key: str) -> list:
    """The groups that agree with g on the choices that come before `key` (all of them for a key
    that is not a choice)."""
    same = CHOICES[: CHOICES.index(key)] if key in CHOICES else CHOICES
    return [h for h in groups if all(group_value(h, c) == group_value(g, c) for c in same)]


def tells_apart(groups: list, g: dict, key: str) -> bool:
    """Whether `key` tells g from groups of the same choices: a translation group is `mha
    data=multi30k_en_de`, not every key that data's choice changes."""
    return len({group_value(h, key) for h in peers(groups, g, key)}) > 1


def recipe_labels(groups: list, differing: list) -> list:
    """Each group's name: its model, then the keys that tell it from groups of the same choices
    (model, data, task, optim, schedule; a choice from groups of the same earlier choices). No two
    groups get one name: the first key two groups differ in is named in both."""
    return [
        " ".join(
            [group_value(g, "model.name")]
            + [
                label_part(key, group_value(g, key))
                for key in differing
                if key != "model.name" and tells_apart(groups, g, key)
            ]
        )
        for g in groups
    ]


def group_runs(records: list, keys: list | None = None) -> list:
    """Runs -> groups, in the order of their first run: by recipe, or by the values of `keys`
    (--group-by). A group: its runs ("records"), the recipe keys they agree on ("recipe"), those
    they do not with the values they have ("mixed": only under --group-by), its "label"; each run
    gets its group's number ("group")."""
    buckets: dict = {}
    for r in records:
        if keys:
            ident = tuple(
                override_text(OmegaConf.select(r["cfg"], k, default=ABSENT)) for k in keys
            )
        else:
            ident = tuple(sorted(r["recipe"].items()))
        buckets.setdefault(ident, []).append(r)
    groups = []
    for i, (ident, recs) in enumerate(buckets.items()):
        shared, mixed = {}, {}
        for key in dict.fromkeys(k for r in recs for k in r["recipe"]):
            values = list(dict.fromkeys(r["recipe"].get(key, ABSENT) for r in recs))
            if len(values) == 1:
                shared[key] = values[0]
            else:
                mixed[key] = values
        by = dict(zip(keys, ident, strict=True)) if keys else {}
        groups.append({"records": recs, "recipe": shared, "mixed": mixed, "by": by})
        for r in recs:
            r["group"] = i
    labels = (
        [" ".join(label_part(k, v) for k, v in g["by"].items()) for g in groups]
        if keys
        else recipe_labels(groups, differing_keys(groups))
    )
    for g, label in zip(groups, labels, strict=True):
        g["label"] = label
    return groups


def group_table(groups: list, columns: list) -> list:
    """One row per group: its name, its values of `columns`, n runs, and mean/std of each metric
    present."""
    table = []
    for g in groups:
        recs = g["records"]
        row = {"group": g["label"], **{k: g["by"].get(k) or group_value(g, k) for k in columns}}
        row["runs"] = len(recs)
        for m in METRICS:
            values = [
                r["summary"][m] for r in recs if isinstance(r["summary"].get(m), (int, float))
            ]
            if values:
                row[m] = statistics.mean(values)
            if len(values) > 1:  # no spread from one value
                row[m + " std"] = statistics.stdev(values)
        table.append(row)
    return table


def differing_rows(groups: list) -> tuple:
    """(header, rows naming groups apart, rows that come with a choice) of the recipe keys that
    differ between groups, one row per key and one column per group: first the model and each key
    that tells some group from others of the same choices, then the keys that only go with a
    choice (model=moa's own keys, a translation dataset's schedule...)."""
    keys = differing_keys(groups)
    naming = [
        k for k in keys if k == "model.name" or any(tells_apart(groups, g, k) for g in groups)
    ]

    def rows(selected: list) -> list:
        return [[k, *(group_value(g, k) for g in groups)] for k in selected]

    return (
        ["key", *(g["label"] for g in groups)],
        rows(naming),
        rows([k for k in keys if k not in naming]),
    )


def mixed_rows(groups: list) -> list:
    """Under --group-by: per group, each recipe key its runs differ in, with their values."""
    return [[g["label"], k, " / ".join(v)] for g in groups for k, v in g["mixed"].items()]


def number(metric: str, value: float) -> str:
    if metric == "params_total":
        return f"{value:,.0f}"
    return f"{value:.1f}" if metric == "step_ms_median" else f"{value:.4f}"


def summary_rows(table: list, keys: list) -> tuple:
    """(header, rows of text) of the grouped table: mean +- std where several of a group's runs have
    the metric (a parameter count's only where it varies, under --group-by)."""
    metrics = [m for m in METRICS if any(m in row for row in table)]
    rows = []
    for row in table:
        cells = [row[k] for k in keys] + [str(row["runs"])]
        for m in metrics:
            if m not in row:
                cells.append("")
                continue
            spread = m + " std" in row and (m != "params_total" or row[m + " std"])
            cells.append(number(m, row[m]) + (f" ± {number(m, row[m + ' std'])}" if spread else ""))
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


DIFFERING = "Recipe keys that differ between groups"
MIXED = "Pooled by --group-by although their recipes differ"


def markdown(records: list, groups: list, table: list, keys: list) -> str:
    text = markdown_table(*summary_rows(table, keys))
    header, naming, following = differing_rows(groups)
    if naming:
        text += f"\n{DIFFERING}:\n\n" + markdown_table(header, naming + following)
    if mixed_rows(groups):
        text += f"\n{MIXED}:\n\n" + markdown_table(["group", "key", "values"], mixed_rows(groups))
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


DASHES = ("-", "--", "-.", ":")


def shades(colour, n: int) -> list:
    """n shades of one hue, dark to light; the colour itself for one."""
    from matplotlib.colors import to_rgb

    base = to_rgb(colour)
    if n == 1:
        return [base]
    steps = [-0.3 + 0.6 * i / (n - 1) for i in range(n)]  # darken by up to 30%, lighten likewise
    return [
        tuple(c * (1 + t) if t < 0 else c + (1 - c) * t for c in base)  # toward black or white
        for t in steps
    ]


def group_colours(groups: list) -> list:
    colours = pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    return [colours[i % len(colours)] for i in range(len(groups))]


def group_styles(groups: list) -> list:
    """Per group, per run, its line style: one hue per group (the colour cycle's), its runs in
    shades of it, each with its own dash pattern so that runs whose curves coincide (seeds of an
    untrained router at ln C) stay visible."""
    return [
        [
            {"color": shade, "ls": DASHES[j % len(DASHES)]}
            for j, shade in enumerate(shades(colour, len(g["records"])))
        ]
        for g, colour in zip(groups, group_colours(groups), strict=True)
    ]


def group_legend(target, groups: list, styles: list, **kwargs):
    """Below the plot: one entry per group (a one-run group: its run's line), under it its runs'
    lines named by what tells them apart inside the group (the seed, ...)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles, labels = [], []
    for g, colour, group_style in zip(groups, group_colours(groups), styles, strict=True):
        lines = [Line2D([], [], lw=2, **style) for style in group_style]
        if len(lines) == 1:
            handles.append(lines[0])
            labels.append(g["label"])
            continue
        handles.append(Patch(color=colour))
        labels.append(f"{g['label']} ({len(lines)} runs)")
        handles += lines
        labels += ["   " + label for label in run_labels(g["records"])]
    return target.legend(
        handles,
        labels,
        fontsize=8,
        title="group, then its runs",
        loc="upper center",
        ncol=1 if len(labels) <= 6 else 2,
        **kwargs,
    )


def val_loss_figure(groups: list):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = group_styles(groups)
    for g, group_style in zip(groups, styles, strict=True):
        for r, style in zip(g["records"], group_style, strict=True):
            pts = [(row["step"], row["val/loss"]) for row in r["rows"] if "val/loss" in row]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", label=r["label"], **style)
    ax.set(xlabel="step", ylabel="val/loss (nats per token)", title="Validation loss")
    ax.grid(alpha=0.3)
    group_legend(ax, groups, styles, bbox_to_anchor=(0.5, -0.13))
    return fig


def entropy_figure(groups: list):
    """One panel per routing site: each routed run's entropy over training, and a dashed line at
    ln C, the maximum (C = the number of choices at the site; a site that routes uniformly reaches
    it). `groups`: those with routed runs, and only those runs."""
    plt = pyplot()
    routed = [r for g in groups for r in g["records"]]
    sites = list(dict.fromkeys(s for r in routed for s in entropy_sites(r["routing"])))
    ncols = min(len(sites), 3)
    nrows = math.ceil(len(sites) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4 * ncols, 3 * nrows), sharex=True, sharey=True, squeeze=False
    )
    styles = group_styles(groups)
    for ax, site in zip(axes.flat, sites, strict=True):
        key = f"routing/entropy/{site}"
        for g, group_style in zip(groups, styles, strict=True):
            for r, style in zip(g["records"], group_style, strict=True):
                pts = [(row["step"], row[key]) for row in r["rows"] if key in row]
                if pts:
                    ax.plot(*zip(*pts, strict=True), label=r["label"], lw=2, **style)
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
    fig.suptitle("Routing entropy per site")
    fig.tight_layout()
    group_legend(fig, groups, styles, bbox_to_anchor=(0.5, 0.0))
    return fig


def routed_groups(groups: list) -> list:
    """The groups with routed runs, each with only those."""
    routed = [{**g, "records": [r for r in g["records"] if r["routing"]]} for g in groups]
    return [g for g in routed if g["records"]]


def plot_curves(groups: list, out: Path) -> list:
    """Write the PNGs; returns (file name, caption) pairs."""
    plt = pyplot()
    written = []

    def save(fig, name: str, caption: str) -> None:
        # "tight" keeps legends placed outside the axes
        fig.savefig(out / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append((name, caption))

    save(
        val_loss_figure(groups),
        "val_loss.png",
        "Validation loss (nats per token; lower is better) at each evaluation step, one line per "
        "run, one hue per group: a group's runs (seeds) in shades of it, with their own dashes.",
    )
    routed = routed_groups(groups)
    if routed:
        save(
            entropy_figure(routed),
            "routing_entropy.png",
            "Routing entropy (nats, the mean over tokens of the entropy of each token's routing "
            "distribution) per site over training, one line per routed run, one hue per group. "
            "The dashed line is ln C, its maximum (C = the number of choices at the site): near it "
            "the router spreads tokens evenly; near 0 each token picks one choice.",
        )
    for i, r in enumerate(r for g in routed for r in g["records"]):
        save(
            utilisation_figure(r["routing"], f"{r['label']} (step {r['routing_step']})"),
            f"utilisation_{i}.png",
            f"Utilisation of run {r['label']} at its last logged step ({r['routing_step']}): the "
            "share of routing each choice (column) receives at each site (row); each site's row "
            "sums to 1. One scale for every run, 0..1 with white at an even share 1/C: red cells "
            "get more than an even share, blue ones less.",
        )
    return written


# --- the page -------------------------------------------------------------------------------------

CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em;"
    "color:#222}\n"
    # a cell never wraps: a table wider than the window scrolls in its own box, its first column
    # (the names) staying in view
    ".table{overflow-x:auto;margin:0 0 2em}table{border-collapse:collapse;font-size:0.9em}"
    "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}\n"
    "th{background:#eee}.t{text-align:left}"
    # the first column stays in view when a table scrolls; a shadow draws its edge, as the
    # collapsed border does not move with it
    "td:first-child,th:first-child{position:sticky;left:0;z-index:1;box-shadow:inset -1px 0 #bbb}"
    "td:first-child{background:#fff}.caption{margin:0.5em 0 0.3em;color:#444;max-width:60em}\n"
    "figure{margin:1.5em 0 2.5em}.heatmaps{display:flex;flex-wrap:wrap;gap:0 2em}\n"
    ".heatmaps figure{flex:0 1 520px}figcaption{max-width:60em;color:#444}img{max-width:100%}"
    "code{background:#f3f3f3}summary{cursor:pointer;color:#444;margin:-1em 0 1em}"
)


NUMBER = re.compile(r"[-+]?[\d,.]+( ± [\d,.]+)?")  # right-aligned; other cells (names) left


def html_table(header: list, rows: list, caption: str) -> str:
    """The caption above, the table in a box of its own that scrolls sideways when it is wider
    than the page."""
    # a column of numbers (blanks aside) right-aligned, any other left
    numeric = [
        all(NUMBER.fullmatch(str(c)) for c in column if str(c))
        for column in zip(*rows, strict=True)
    ] or [False] * len(header)
    align = ["" if n else " class=t" for n in numeric]
    head = "".join(f"<th{a}>{html.escape(str(h))}</th>" for a, h in zip(align, header, strict=True))
    body = "".join(
        "<tr>"
        + "".join(f"<td{a}>{html.escape(str(c))}</td>" for a, c in zip(align, row, strict=True))
        + "</tr>\n"
        for row in rows
    )
    return (
        f'<p class="caption">{html.escape(caption)}</p>\n<div class="table"><table>\n'
        f"<thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody></table></div>"
    )


def runs_rows(records: list, groups: list, root: Path | None) -> list:
    """Per run: its name, its group, its folder (relative to the one folder given), steps and final
    losses."""
    rows = []
    for r in records:
        run, summary = r["run"].resolve(), r["summary"]
        folder = run.relative_to(root) if root and run.is_relative_to(root) else run
        losses = [
            number(m, summary[m]) if isinstance(summary.get(m), (int, float)) else ""
            for m in ("val/loss", "test/loss")
        ]
        group = groups[r["group"]]["label"]
        rows.append([r["label"], group, str(folder), summary.get("steps", ""), *losses])
    return rows


def intro(records: list, groups: list, root: Path | None) -> str:
    where = f" under <code>{html.escape(str(root))}</code>" if root else ""
    shared = common_overrides(records)
    common = (
        f" Overrides common to every run: <code>{html.escape(' '.join(shared))}</code>."
        if shared
        else ""
    )
    return (
        f"<h1>moa_train report</h1><p>{len(records)} runs in {len(groups)} "
        f"group{'s' if len(groups) != 1 else ''}{where}.{common}</p>"
    )


def grouped_caption(keys: list | None) -> str:
    if keys:
        return (
            f"Runs pooled by {', '.join(keys)} (--group-by): mean ± std over each group's runs, "
            "which may differ in more than their seed (see below). "
        )
    return (
        "Runs grouped by recipe (the model, data, task, optim, schedule, eval and the trainer's "
        "recipe keys; not the seed, paths, loggers, device or resume): mean ± std over each "
        "group's runs (seeds). A group is named by its model and the keys that tell it from the "
        "others. "
    )


def write_html(
    out: Path, records: list, groups: list, table: list, keys: list | None, images: list, root=None
) -> None:
    parts = [intro(records, groups, root)]
    parts.append(
        html_table(
            *summary_rows(table, keys or ["group"]),
            grouped_caption(keys) + "Losses in nats per token, step_ms_median in milliseconds. "
            "Also as report.csv, with the differing keys as columns.",
        )
    )
    header, naming, following = differing_rows(groups)
    if naming:
        parts.append(
            html_table(
                header,
                naming,
                f"{DIFFERING}: the model and the keys that name groups apart, each group's value.",
            )
        )
    if following:
        parts.append(
            f"<details><summary>{len(following)} more recipe keys that differ between groups, "
            "each with a choice above (a model's own keys, a dataset's settings)</summary>"
            + html_table(header, following, "Keys that come with the choices above.")
            + "</details>"
        )
    if mixed_rows(groups):
        parts.append(
            html_table(
                ["group", "key", "values"],
                mixed_rows(groups),
                f"{MIXED}: their means mix different recipes.",
            )
        )
    parts.append(
        html_table(
            ["run", "group", "folder", "steps", "val/loss", "test/loss"],
            runs_rows(records, groups, root),
            "Every run, named by the overrides not every run shares, its group and its folder.",
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


def check_group_by(records: list, keys: list) -> None:
    """A --group-by key that no run's config has (a misspelling) would pool every run under '?'."""
    absent = object()  # not None: a key whose value is null is there
    for key in keys:
        if all(OmegaConf.select(r["cfg"], key, default=absent) is absent for r in records):
            fail(
                f"--group-by: no run's config has the key '{key}' (a dotted key, e.g. model.name, "
                "data.name, trainer.max_steps)"
            )


def warn_pooled(groups: list) -> None:
    for g in groups:
        if g["mixed"]:
            print(
                f"warning: group {g['label']} pools runs whose recipes differ in "
                f"{', '.join(g['mixed'])} (--group-by; see the report)",
                file=sys.stderr,
            )


def main(argv=None) -> None:
    ensure_registered()  # the tasks, whose metrics are the report's columns
    parser = Parser(prog="moa-report", description=__doc__.splitlines()[0])
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
        "--group-by",
        nargs="+",
        help="config keys to pool runs by instead of their whole recipe (the report then lists "
        "the recipe keys that differ inside a group)",
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
    if args.group_by:
        check_group_by(records, args.group_by)
    for record, label in zip(records, run_labels(records), strict=True):
        record["label"] = label
    groups = group_runs(records, args.group_by)
    differing = [k for k in differing_keys(groups) if k != "model.name"]
    table = group_table(groups, args.group_by or ["model.name", *differing])
    table_md = markdown(records, groups, table, args.group_by or ["group"])
    print(table_md, end="")
    warn_pooled(groups)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text(table_md)
        write_csv(table, args.out / "report.csv")
        root = Path(args.paths[0]).resolve() if len(args.paths) == 1 else None
        images = plot_curves(groups, args.out)
        write_html(args.out, records, groups, table, args.group_by, images, root)


if __name__ == "__main__":
    main()
