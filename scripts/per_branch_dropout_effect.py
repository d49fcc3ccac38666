"""The effect of MoAS's per-branch residual dropout on Table 1 (faithful mode), from the run records
of both settings: the 2026-11-23 runs (one dropout after the mix, `mixed`) are in git history at
commit b8ca4a6, the 2026-12-01 runs (`per_branch`) at 99a770f (and in docs/results/runs/moas_table1/
today). Same seeds 0-4, so the test is seed-paired (scipy's ttest_rel on the final val/loss).

    python3 scripts/per_branch_dropout_effect.py   # needs the git history of a clone
"""

from __future__ import annotations

import json
import statistics
import subprocess

from scipy import stats

from moa_train.tables import table_lines

SETTINGS = (("mixed", "b8ca4a6"), ("per_branch", "99a770f"))
ROWS = ("moas_static", "moas_dynamic", "mha")
SEEDS = range(5)


def val_loss(commit: str, row: str, seed: int) -> float:
    path = f"docs/results/runs/moas_table1/faithful/{row}-seed{seed}/summary.json"
    text = subprocess.run(
        ["git", "show", f"{commit}:{path}"], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(text)["val/loss"]


def main() -> None:
    cells = []
    for row in ROWS:
        (_, old), (_, new) = SETTINGS
        a = [val_loss(old, row, k) for k in SEEDS]
        b = [val_loss(new, row, k) for k in SEEDS]
        test = stats.ttest_rel(a, b)
        cells.append(
            [
                row,
                f"{statistics.mean(a):.4f}",
                f"{statistics.mean(b):.4f}",
                f"{statistics.mean(b) - statistics.mean(a):+.4f}",
                f"{test.statistic:.2f}",
                f"{test.pvalue:.3f}",
            ]
        )
    header = ["row", "mixed (b8ca4a6)", "per_branch (99a770f)", "difference", "paired t", "p"]
    print("\n".join(table_lines(header, cells, "lrrrrr")))


if __name__ == "__main__":
    main()
