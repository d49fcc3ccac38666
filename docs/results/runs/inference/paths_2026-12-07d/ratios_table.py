"""The tables of RUN.md and inference_notes.md (2026-12-07d), from this folder's inference.json
files: the benchmark's compiled decode tokens/s before (old*, the code of 75d305d) and after (new*)
the redesign, per model and batch, with new / old of the means and the difference of the step's
time; then the new code compiled with
inductor's coordinate-descent tuning (cd*) beside its default compilation.

    python3 ratios_table.py        (from anywhere; reads the folders beside it)
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from statistics import mean

HERE = Path(__file__).resolve().parent
ROWS = ("mha", "gqa", "moas_dynamic", "moas_dynamic@top1", "moa_sparse")


@cache  # every table cell asks for the same few processes: each json is read once
def decode(process: str) -> dict:
    """gpt2/<model> -> {batch: (tokens/s, compile seconds)} of one process; failed rows left out."""
    data = json.loads((HERE / process / "inference.json").read_text())
    out = {}
    for key, entry in data["results"].items():
        if "decode" in entry:
            out[key.split("/", 1)[1]] = {
                b: (d["tokens_per_s"], d["compile_s"]) for b, d in entry["decode"].items()
            }
    return out


def figures(processes: tuple[str, ...], model: str, batch: str, field: int = 0) -> list[float]:
    return [decode(p)[model][batch][field] for p in processes if model in decode(p)]


def before_after() -> None:
    old, new = ("old1", "old2", "old3"), ("new1", "new2", "new3")
    print("| model | batch | old tok/s | new tok/s | new / old (means) | step time, new - old |")
    print("|---|---:|---|---|---:|---:|")
    for model in ROWS:
        for batch in ("1", "64"):
            o, n = figures(old, model, batch), figures(new, model, batch)
            cells = [", ".join(f"{x:,.0f}" for x in xs) for xs in (o, n)]
            # a decode step makes one token per sequence: its time is batch / (tokens/s)
            extra_us = 1e6 * int(batch) * (1 / mean(n) - 1 / mean(o))
            print(
                f"| {model} | {batch} | {cells[0]} | {cells[1]} | {mean(n) / mean(o):.3f} "
                f"| {extra_us:+.1f} µs |"
            )


def coordinate_descent() -> None:
    default, tuned = ("new1", "new2", "new3"), ("cd1", "cd2", "cd3")
    print(
        "| model | batch | default tok/s | coordinate descent tok/s | ratio (means) "
        "| compile s, default | compile s, coordinate descent |"
    )
    print("|---|---:|---|---|---:|---|---|")
    for model in (*ROWS, "moas_kv"):
        for batch in ("1", "64"):
            d, t = figures(default, model, batch), figures(tuned, model, batch)
            dc, tc = figures(default, model, batch, 1), figures(tuned, model, batch, 1)
            cells = [", ".join(f"{x:,.0f}" for x in xs) for xs in (d, t)]
            secs = [", ".join(f"{x:.1f}" for x in xs) for xs in (dc, tc)]
            print(
                f"| {model} | {batch} | {cells[0]} | {cells[1]} | {mean(t) / mean(d):.2f} "
                f"| {secs[0]} | {secs[1]} |"
            )


if __name__ == "__main__":
    before_after()
    print()
    coordinate_descent()
