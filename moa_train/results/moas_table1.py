"""Reproduce the MoAS paper's Table 1 (WikiText-2 char, 500 iterations) over seeds, in both modes,
and write docs/results/moas_table1.{md,json}.

A thin driver over `moa-train` multiruns:

    python3 scripts/reproduce_moas_table1.py                # 3 rows x 5 seeds x 2 modes + tables
    python3 scripts/reproduce_moas_table1.py --modes faithful --seeds 3
    python3 scripts/reproduce_moas_table1.py --tables-only  # rebuild from the committed run records
    python3 scripts/reproduce_moas_table1.py --jobs 30      # every run at once, one process each

Every argument and override is checked first (one `error:` line, exit 2, nothing touched). Phases:
(1) train each mode as one Hydra multirun into <runs-dir>/.staging/<mode>/<row>-seed<k>/ (with
--jobs N > 1: every run as its own single `moa-train` run into the same folder, with the same
overrides, N at once, its output in <row>-seed<k>.log beside the folder, kept only if it fails); (2)
evaluate every trained model on the official WikiText-2 valid and test files (full passes, fp32),
written as official_eval.json beside the run's summary.json, then delete the checkpoints; the new
runs then replace the trained rows' old records in <runs-dir>/<mode>/ (all seeds: a row is remade
with its seeds), and only if every run of the set trained and was evaluated (else the old records
stay, and the new runs wait in .staging/ for inspection); (3) tables: per row the parameter count,
final val loss mean +- std over seeds with each seed's value, median ms per iteration
(device-synchronised windows of 10 steps, evaluation excluded), the official valid/test losses, the
paper's figures, and Welch's t-test of dynamic vs static.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from moa_train.paths import repo_root
from moa_train.results import (
    DriverParser,
    Staging,
    evaluate_each,
    evaluated,
    file_meta,
    mean_sd,
    no_records,
    note_lines,
    old_runs,
    run_command,
    run_jobs,
    shared_jobs,
    summaries,
    training_job,
    welch,
    write_results,
)
from moa_train.tables import table_lines

ROOT = repo_root()
ROWS = ("mha", "moas_static", "moas_dynamic")
# Table 1 of the MoAS paper, with what its "ms/iter" column really measured (moas-table1-setup.md)
PAPER = {
    "mha": {"name": "Baseline MHA", "params_m": 7.19, "val_loss": 2.2940, "ms_iter_claimed": 500},
    "moas_static": {
        "name": "Static MoAS",
        "params_m": 10.14,
        "val_loss": 2.3093,
        "ms_iter_claimed": 900,
    },
    "moas_dynamic": {
        "name": "Dynamic MoAS",
        "params_m": 10.29,
        "val_loss": 2.3074,
        "ms_iter_claimed": 1680,
    },
}
# one checkpoint at the end (for the official-split evaluation)
COMMON = ("trainer.save_interval=500",)


def overrides(mode: str, row: str, seed: int, extra: list) -> list:
    """One run's moa-train overrides (those of a multirun job)."""
    return [
        f"experiment=moas_table1/{row}",
        f"mode={mode}",
        f"trainer.seed={seed}",
        *COMMON,
        *extra,
    ]


def train(mode: str, seeds: int, out_dir: Path, extra: list) -> int:
    """One Hydra multirun per mode into out_dir/<mode>/: its jobs one after another. Its exit
    code."""
    experiments = ",".join(f"moas_table1/{r}" for r in ROWS)
    cmd = [
        sys.executable,
        "-m",
        "moa_train",
        "-m",
        f"experiment={experiments}",
        f"mode={mode}",
        f"trainer.seed={','.join(map(str, range(seeds)))}",
        f"hydra.sweep.dir={out_dir / mode}",
        "hydra.sweep.subdir=${model.name}-seed${trainer.seed}",
        *COMMON,
        *extra,
    ]
    # the subdir is ${model.name}-seed..., and each row's model.name is the row's name
    return run_command(cmd)


def jobs(mode: str, seeds: int, out_dir: Path, extra: list) -> list:
    """The multirun's jobs as single runs with the same overrides and folders under out_dir (for
    --jobs N); the logs lie beside the run folders."""
    out = []
    for row in ROWS:
        for seed in range(seeds):
            run = out_dir / mode / f"{row}-seed{seed}"
            out.append(training_job(f"{mode}/{run.name}", overrides(mode, row, seed, extra), run))
    return out


def reproduce(modes: list, seeds: int, runs_dir: Path, extra: list, n_jobs: int) -> None:
    """Train and evaluate the modes' rows in the staging folder, then put them in place of the rows'
    old records; a run that fails leaves the old records as they were (exit 1)."""
    stage = Staging(runs_dir)
    runs = [f"{mode}/{row}-seed{k}" for mode in modes for row in ROWS for k in range(seeds)]
    if n_jobs > 1:
        failed = run_jobs(
            [j for mode in modes for j in jobs(mode, seeds, stage.root, extra)], n_jobs
        )
    else:
        failed = []
        for mode in modes:  # a failed multirun stops the driver
            code = train(mode, seeds, stage.root, extra)
            if code:
                failed = stage.incomplete([r for r in runs if r.startswith(f"{mode}/")])
                failed = failed or [f"the {mode} multirun (exit {code})"]
                break
    stage.stop_if_failed(failed)
    evaluate_runs(stage.root)
    stage.commit(
        runs,
        "official_eval.json",
        superseded=[
            old for mode in modes for row in ROWS for old in old_runs(runs_dir / mode, row)
        ],
    )


def official_eval(run: Path) -> dict:
    """The trained model on the official valid/test files: full passes, fp32, no dropout."""
    import torch
    from omegaconf import OmegaConf

    import moa_train
    from moa_train.data import load_data
    from moa_train.train.evaluate import evaluate

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = moa_train.load_run(run, map_location=str(device))
    data_cfg = OmegaConf.merge(cfg.data, {"split": "official"})
    data = load_data(data_cfg)
    block = cfg.trainer.block_size
    out = {}
    for split, prefix in (("val", "official_valid"), ("test", "official_test")):
        out.update(evaluate(model, data.splits[split], prefix, 64, block, None, device))
    return out


def evaluate_runs(runs_dir: Path) -> None:
    evaluate_each(
        sorted(runs_dir.rglob("summary.json")),
        "official_eval.json",
        official_eval,
        lambda run, r: (
            f"{run.relative_to(runs_dir)}: official valid {r['official_valid/loss']:.4f} "
            f"test {r['official_test/loss']:.4f}"
        ),
    )


def collect(runs_dir: Path) -> dict:
    """mode -> row -> list of per-seed records."""
    table: dict = {}
    for summary_path in summaries(runs_dir, "**/summary.json"):
        run = summary_path.parent
        mode, job = run.parent.name, run.name
        row, _, seed = job.rpartition("-seed")
        summary = json.loads(summary_path.read_text())
        official = json.loads(evaluated(summary_path, "official_eval.json").read_text())
        table.setdefault(mode, {}).setdefault(row, []).append(
            {"seed": int(seed), "run": str(run.relative_to(runs_dir)), **summary, **official}
        )
    for rows in table.values():
        for records in rows.values():
            records.sort(key=lambda r: r["seed"])
    return table


def summarise(table: dict) -> dict:
    """Per mode and row: the figures of the tables, plus the tests and speed ratios."""
    out = {}
    for mode, rows in table.items():
        res = {}
        for row, recs in rows.items():
            res[row] = {
                "params_non_embedding": recs[0]["params_non_embedding"],
                "params_total": recs[0]["params_total"],
                "flops_per_token": recs[0]["flops_per_token"],
                "val_loss": [r["val/loss"] for r in recs],
                "step_ms_median": statistics.median(r["step_ms_median"] for r in recs),
                "official_valid_loss": [
                    r["official_valid/loss"] for r in recs if "official_valid/loss" in r
                ],
                "official_test_loss": [
                    r["official_test/loss"] for r in recs if "official_test/loss" in r
                ],
                "seeds": [r["seed"] for r in recs],
                "runs": [r["run"] for r in recs],
                "device": recs[0]["device_name"],
                "torch": recs[0]["torch_version"],
                "git_sha": recs[0]["git_sha"],
            }
        if "mha" in res:
            for r in res.values():
                r["flop_ratio"] = r["flops_per_token"] / res["mha"]["flops_per_token"]
                r["time_ratio"] = r["step_ms_median"] / res["mha"]["step_ms_median"]
        tests = {}
        if {"moas_static", "moas_dynamic"} <= res.keys() and len(
            res["moas_dynamic"]["val_loss"]
        ) >= 2:
            tests["paper_split"] = welch(
                res["moas_dynamic"]["val_loss"], res["moas_static"]["val_loss"]
            )
            if len(res["moas_dynamic"]["official_valid_loss"]) >= 2:
                tests["official_valid"] = welch(
                    res["moas_dynamic"]["official_valid_loss"],
                    res["moas_static"]["official_valid_loss"],
                )
                tests["official_test"] = welch(
                    res["moas_dynamic"]["official_test_loss"],
                    res["moas_static"]["official_test_loss"],
                )
        out[mode] = {"rows": res, "welch_dynamic_vs_static": tests}
    if {"faithful", "fast"} <= out.keys():
        for row, r in out["fast"]["rows"].items():
            if row in out["faithful"]["rows"]:
                r["speedup_vs_faithful"] = (
                    out["faithful"]["rows"][row]["step_ms_median"] / r["step_ms_median"]
                )
    return out


def sentence(name: str, test: dict) -> str:
    verdict = (
        "a difference at the 5% level"
        if test["p"] < 0.05
        else "no significant difference at the 5% level"
    )
    return (
        f"{name}: dynamic minus static = {test['mean_diff']:+.4f} nats/char, Welch t = "
        f"{test['t']:.2f}, p = {test['p']:.3f}: {verdict}."
    )


def speed_checks(res: dict) -> list:
    """The speed targets (time ratios to mha, fast vs faithful), checked on the measured figures."""
    out = []
    for row, r in res.get("faithful", {}).get("rows", {}).items():
        if row != "mha":
            limit = 1.15 * r["flop_ratio"]
            ok = "met" if r["time_ratio"] <= limit else "MISSED"
            out.append(
                f"faithful {row}: step time {r['time_ratio']:.2f}x mha, limit 1.15 x FLOP ratio "
                f"{r['flop_ratio']:.2f} = {limit:.2f}: {ok}"
            )
    for row, r in res.get("fast", {}).get("rows", {}).items():
        if "speedup_vs_faithful" in r:
            ok = "met" if r["speedup_vs_faithful"] >= 3 else "MISSED"
            out.append(
                f"fast {row}: {r['speedup_vs_faithful']:.2f}x faster than faithful, target >= 3x: "
                f"{ok}"
            )
    return out


def findings(res: dict, jobs: int = 1) -> list:
    lines = ["## Findings", ""]
    faithful = res.get("faithful", {}).get("rows", {})
    if set(ROWS) <= faithful.keys():
        means = {row: statistics.mean(faithful[row]["val_loss"]) for row in ROWS}
        order = " < ".join(f"{row} {means[row]:.4f}" for row in sorted(ROWS, key=means.get))
        paper = " < ".join(
            f"{row} {PAPER[row]['val_loss']:.4f}"
            for row in sorted(ROWS, key=lambda r: PAPER[r]["val_loss"])
        )
        lines += [
            (
                f"- Faithful mode, mean val loss over {len(faithful['mha']['val_loss'])} seeds: "
                f"{order}. The paper's single unseeded run: {paper}."
            ),
            (
                "- Seed-to-seed spread (std) of the val loss is "
                f"{min(statistics.stdev(faithful[r]['val_loss']) for r in ROWS):.3f} to "
                f"{max(statistics.stdev(faithful[r]['val_loss']) for r in ROWS):.3f} nats/char, "
                "larger than the 0.002 that separates dynamic from static in the paper's table."
            ),
        ]
        tests = res["faithful"]["welch_dynamic_vs_static"]
        if tests:
            lines.append(
                "- Dynamic vs static (Welch): "
                + "; ".join(f"{k.replace('_', ' ')} p = {v['p']:.2f}" for k, v in tests.items())
                + "."
            )
    if jobs > 1:
        lines.append(
            "- Speed: not measured by these runs (they shared one GPU); see the ms/iter note above."
        )
    else:
        lines += [f"- Speed target, {c}." for c in speed_checks(res)]
    return lines


MAIN_HEADER = (
    "row",
    "params (non-emb.)",
    "val loss, mean +- std",
    "per seed",
    "ms/iter",
    "time / mha",
    "FLOPs / mha",
    "paper: params, val loss, 'ms/iter'",
)
OFFICIAL_HEADER = ("row", "official valid loss", "per seed", "official test loss", "per seed")


def per_seed(values: list) -> str:
    return ", ".join(f"{v:.4f}" for v in values)


def main_rows(rows: dict, jobs: int) -> list:
    """The cells of a mode's main table: each row's paper-split loss, speed and cost beside the
    paper's."""
    out = []
    for row in (row for row in ROWS if row in rows):
        r, p = rows[row], PAPER[row]
        extra = (
            f" ({r['speedup_vs_faithful']:.2f}x faster than faithful)"
            if "speedup_vs_faithful" in r and jobs == 1
            else ""
        )
        out.append(
            [
                row,
                f"{r['params_non_embedding']:,}",
                mean_sd(r["val_loss"], 4),
                per_seed(r["val_loss"]),
                f"{r['step_ms_median']:.2f}{extra}",
                f"{r.get('time_ratio', float('nan')):.2f}",
                f"{r.get('flop_ratio', float('nan')):.2f}",
                f"{p['params_m']}M, {p['val_loss']:.4f}, {p['ms_iter_claimed']}",
            ]
        )
    return out


def official_rows(rows: dict) -> list:
    """The cells of a mode's table on the official valid and test files."""
    out = []
    for row in (row for row in ROWS if row in rows and rows[row]["official_valid_loss"]):
        valid, test = rows[row]["official_valid_loss"], rows[row]["official_test_loss"]
        out.append([row, mean_sd(valid, 4), per_seed(valid), mean_sd(test, 4), per_seed(test)])
    return out


def markdown(res: dict, meta: dict) -> str:
    jobs = meta.get("jobs", 1)
    lines = [
        "# MoAS Table 1, reproduced over seeds",
        "",
        (
            "WikiText-2 character level (283 symbols), 4 layers, d 384, 6 heads, block 256, "
            "dropout 0.1, batch 12, 500 iterations, AdamW 3e-4 constant (the recipe in "
            "../shared/papers/moas-table1-setup.md)."
        ),
        "",
        (
            f"- Command: `{meta['command']}` (trains both modes in one run on one GPU, evaluates "
            "on the official files, writes these tables; `--tables-only` rebuilds them from the "
            "run records)"
        ),
        (
            f"- Device: {meta['device']}; torch {meta['torch']}; git {meta['git_sha']}; date "
            f"{meta['date']}"
        ),
        (
            "- Run records (config, metrics.jsonl, summary.json, official_eval.json): "
            "`docs/results/runs/moas_table1/<mode>/<row>-seed<k>/`"
        ),
        (
            "- Modes: `faithful` = the paper's recipe (fp32 without TF32, eager, fused AdamW, the "
            "MSE balance loss x 0.01 averaged over layers with gate dropout 0.1, each branch's "
            "output dropped out before the mix, the 90/10 char split, 20 random eval batches of 12 "
            "x 256; every departure from the released code is listed in docs/fidelity.md). `fast` "
            "= the same model, data and losses with bf16 autocast, TF32, torch.compile and the "
            "whole optimizer step captured in one CUDA graph."
        ),
        "- ms/iter: the median over seeds of each run's median step time, measured over "
        "device-synchronised windows of 10 steps with evaluation excluded (the paper's column is "
        "ms per 10 iterations on a T4)."
        + (
            f" These runs trained {jobs} at once on one GPU (`--jobs {jobs}`), so their step times "
            "measure a shared device, not the models' speed: the speed of each row at this size, "
            "alone on the card, is in docs/results/bench.md (size table1)."
            if jobs > 1
            else ""
        ),
        (
            "- Validation: the same 20 fixed random windows of the last 10% of the train file for "
            "every run (the paper drew new random windows at each evaluation)."
        ),
        "",
        *note_lines(meta),
        *findings(res, jobs),
        "",
    ]
    for mode, block in res.items():
        rows = block["rows"]
        lines += [
            f"## Table 1, mode `{mode}` (the paper's split: val = last 10% of the train file)",
            "",
            *table_lines(MAIN_HEADER, main_rows(rows, jobs), "lrrlrrrl"),
            "",
            (
                "### The same models on the official WikiText-2 valid and test files (full passes, "
                f"fp32), mode `{mode}`"
            ),
            "",
            *table_lines(OFFICIAL_HEADER, official_rows(rows), "lrlrl"),
        ]
        tests = block["welch_dynamic_vs_static"]
        if tests:
            lines += ["", "Welch's t-test, dynamic vs static:", ""]
            names = {
                "paper_split": "Paper's split (val = tail of train)",
                "official_valid": "Official valid",
                "official_test": "Official test",
            }
            lines += [f"- {sentence(names[k], v)}" for k, v in tests.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = DriverParser(
        __doc__,
        "moas_table1",
        seeds=5,
        jobs_help="N > 1: every (mode, row, seed) as its own process, N at once on the one device "
        "(the ms/iter column then measures runs that share it); 1: one multirun per mode",
    )
    parser.add_argument(
        "--modes", nargs="+", default=["faithful", "fast"], choices=["faithful", "fast"]
    )
    args, runs_dir = parser.parse_checked(
        argv,
        lambda a: [overrides(mode, row, 0, a.overrides) for mode in a.modes for row in ROWS],
    )
    if not args.tables_only:
        modes = list(dict.fromkeys(args.modes))
        reproduce(modes, args.seeds, runs_dir, args.overrides, args.jobs)
    res = summarise(collect(runs_dir))
    if not res:
        no_records(args.runs_dir)
    jobs = shared_jobs(args)
    first = next(iter(next(iter(res.values()))["rows"].values()))
    meta = file_meta(args, "reproduce_moas_table1.py", jobs, first, paper=PAPER, jobs=jobs)
    write_results(args.out, {"meta": meta, "results": res}, markdown(res, meta))


if __name__ == "__main__":
    main()
