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


def utilisation_figure(routing: dict, title: str):
    """A site x choice heatmap of the routing/util/<site>/<choice> values (also sent to the
    dashboards), each cell labelled with its value; the colour scale is fixed at 0..1 so that
    heatmaps of different runs compare."""
    import numpy as np

    plt = pyplot()
    sites = list(dict.fromkeys(k.split("/")[2] for k in routing if k.startswith("routing/util/")))
    choices = list(dict.fromkeys(c for s in sites for c in site_util(routing, s)))
    grid = np.array(
        [[routing.get(f"routing/util/{s}/{c}", np.nan) for c in choices] for s in sites]
    )
    fig, ax = plt.subplots(figsize=(2.5 + 0.8 * len(choices), 1.5 + 0.45 * len(sites)))
    im = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        # dark text on viridis' bright upper end, light text on its dark lower end
        if not np.isnan(v):
            ax.text(
                j,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="black" if v > 0.5 else "white",
            )
    ax.set_xticks(range(len(choices)), choices)
    ax.set_yticks(range(len(sites)), sites, fontsize=8)
    ax.set(xlabel="choice", ylabel="site")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="share of routing")
    return fig
