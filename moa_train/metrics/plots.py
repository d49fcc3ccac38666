"""Figures shared by the dashboards (metrics/sinks.py, during a run) and the reports (report.py,
afterwards)."""

from __future__ import annotations


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def site_util(routing: dict, site: str) -> dict:
    """choice -> share of routing at `site`, in the logged order."""
    prefix = f"routing/util/{site}/"
    return {k[len(prefix) :]: v for k, v in routing.items() if k.startswith(prefix)}


def utilisation_norm(n_choices: int):
    """The heatmaps' one colour scale: 0..1, its white middle at an even share 1/C (C = the number
    of choices), so that a router that spreads tokens evenly reads as a pale map and a choice that
    takes more (red) or less (blue) than its share stands out, in every run alike."""
    from matplotlib.colors import Normalize, TwoSlopeNorm

    if n_choices < 2:
        return Normalize(vmin=0.0, vmax=1.0)
    return TwoSlopeNorm(vcenter=1.0 / n_choices, vmin=0.0, vmax=1.0)


def utilisation_figure(routing: dict, title: str):
    """A site x choice heatmap of the routing/util/<site>/<choice> values (also sent to the
    dashboards), each cell labelled with its value in black or white, whichever reads on the
    cell's colour; the colour scale is fixed (utilisation_norm) so that heatmaps of different runs
    compare."""
    import numpy as np

    plt = pyplot()
    sites = list(dict.fromkeys(k.split("/")[2] for k in routing if k.startswith("routing/util/")))
    choices = list(dict.fromkeys(c for s in sites for c in site_util(routing, s)))
    grid = np.array(
        [[routing.get(f"routing/util/{s}/{c}", np.nan) for c in choices] for s in sites]
    )
    fig, ax = plt.subplots(figsize=(2.5 + 0.8 * len(choices), 1.5 + 0.45 * len(sites)))
    norm, cmap = utilisation_norm(len(choices)), plt.get_cmap("RdBu_r")
    im = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            r, g, b, _ = cmap(norm(v))
            ax.text(
                j,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                # the cell's luminance (Rec. 709)
                color="black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white",
            )
    ax.set_xticks(range(len(choices)), choices)
    ax.set_yticks(range(len(sites)), sites, fontsize=8)
    ax.set(xlabel="choice", ylabel="site")
    ax.set_title(title, fontsize=9)
    bar = fig.colorbar(im, ax=ax, label="share of routing")
    if len(choices) >= 2:
        even = 1.0 / len(choices)
        ticks = sorted({0.0, even, 1.0} | ({0.5} if abs(even - 0.5) >= 0.1 else set()))
        labels = [f"1/{len(choices)} (even)" if t == even else f"{t:g}" for t in ticks]
        bar.set_ticks(ticks, labels=labels)
    return fig
