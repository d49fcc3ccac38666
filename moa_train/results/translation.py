"""Translation results: MoA vs MHA on Multi30k En->De (two recipes) and the WMT pipeline, over
seeds.

Multi30k En->De for mha, moa and moa_sparse (matched MACs) over seeds in two recipes (the modern
one, `multi30k`, and the MoA code's fairseq model and loss scaled to Multi30k, `multi30k_fairseq`),
plus one end-to-end run of the WMT pipeline on the local news data, written to
docs/results/translation.{md,json}.

    python3 scripts/reproduce_translation.py                # a multirun per row, then the tables
    python3 scripts/reproduce_translation.py --tables-only  # rebuild the tables from the records
    python3 scripts/reproduce_translation.py --seeds 2 --part multi30k
    # add seed 2 to two rows
    python3 scripts/reproduce_translation.py --part multi30k --rows mha,moa --seed-list 2
    # all 18 runs at once
    python3 scripts/reproduce_translation.py --part multi30k,multi30k_fairseq --jobs 18

Every argument and override is checked first (one `error:` line, exit 2, nothing touched). Every
run's record (config, metrics.jsonl, summary.json) is built under <runs-dir>/.staging/<group>/
<row>-seed<k>/ and lands in <runs-dir>/<group>/ once every planned run has finished: it replaces the
row's old records (with --seed-list only those of the listed seeds); a failed or interrupted driver
leaves them, and the tables, as they were. With --jobs N > 1 every (row, seed) is its own single
`moa-train` run with the multirun's overrides and folder, N at once, its output in <row>-seed<k>.log
beside the folder (kept only if the run fails). Each group's table gets its description from the
runs' saved configs, its device, torch and commit from their summaries, and Welch's t-test of moa
and moa_sparse against mha on test BLEU and tokenised BLEU.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import yaml

from moa_train.config_format import upgrade
from moa_train.errors import fail
from moa_train.paths import config_dir, repo_root
from moa_train.results import (
    STAGING,
    DriverParser,
    Staging,
    check_overrides,
    comma_list,
    mean_sd,
    no_records,
    non_negative_int,
    note_lines,
    old_runs,
    previous_meta,
    results_meta,
    run_command,
    run_jobs,
    summaries,
    training_job,
    unfinished,
    welch,
    write_text,
)
from moa_train.tables import table_lines

ROOT = repo_root()
ROWS = ("mha", "moa", "moa_sparse")
GROUPS = {  # group (= the experiment folder of its rows) -> its table's heading
    "multi30k": "Multi30k En->De, modern recipe, test2016 (1,000 sentences)",
    "multi30k_fairseq": "Multi30k En->De, fairseq-faithful model and loss (the MoA code's recipe "
    "scaled to Multi30k)",
}
PARTS = (*GROUPS, "wmt")
COMMON = ("trainer.precision=bf16", "trainer.tf32=true")
# the Multi30k mha architecture on the local WMT news data (a small corpus; its score is in
# docs/results/translation.md), seed 0 only
WMT = (
    "wmt_local",
    "mha",
    (
        "experiment=multi30k/mha",
        "data=wmt14_en_de",
        "trainer.max_steps=2000",
        "experiment_name=wmt_local-mha",
    ),
)
TESTS = {"test/bleu": "BLEU", "test/bleu_tok": "BLEU (tok.)"}  # metric -> its unit in the sentences


def plan(parts: list, rows: list, seeds: list) -> list:
    """(group, row, seeds, the row's overrides) of every row to train."""
    out = [
        (group, row, seeds, (f"experiment={group}/{row}",))
        for group in GROUPS
        if group in parts
        for row in rows
    ]
    if "wmt" in parts and WMT[1] in rows:
        out.append((WMT[0], WMT[1], [0], WMT[2]))
    return out


def train(
    planned: list, runs_dir: Path, extra: list, n_jobs: int, keep_other_seeds: bool = False
) -> list:
    """Train the planned rows in the staging folder: one multirun per row (n_jobs 1) or every
    (row, seed) as its own run, n_jobs at once; then, if every planned run finished, put them in
    place of the rows' old records: all of them (the row is remade with its seeds), or with
    `keep_other_seeds` only those of the seeds it reruns.

    Returns the names of the failed or unfinished runs (a failed multirun stops the training), in
    which case nothing is replaced."""
    for _, _, _, overrides in planned:  # before anything is deleted or started
        experiment = config_dir() / "experiment" / f"{overrides[0].partition('=')[2]}.yaml"
        if not experiment.is_file():
            raise SystemExit(f"error: {overrides[0]}: no such experiment ({experiment} is missing)")
    stage = Staging(runs_dir)
    out_dir = stage.root
    jobs = []
    for group, row, seeds, overrides in planned:
        if n_jobs == 1:
            # the row's name written into the subdir: the experiment choice is "<group>/<row>" (a
            # subdir built from it nests a folder), and model.name is "moa" for the moa_sparse row
            code = run_command(
                [
                    sys.executable,
                    "-m",
                    "moa_train",
                    "-m",
                    f"trainer.seed={','.join(map(str, seeds))}",
                    *COMMON,
                    *overrides,
                    *extra,
                    f"hydra.sweep.dir={out_dir / group}",
                    f"hydra.sweep.subdir={row}-seed${{trainer.seed}}",
                ]
            )
            if code:
                return stage.incomplete(runs_of([(group, row, seeds, overrides)])) or [
                    f"{group}/{row} (the multirun exited with {code})"
                ]
            continue
        for seed in seeds:
            run = out_dir / group / f"{row}-seed{seed}"
            run_overrides = [f"trainer.seed={seed}", *COMMON, *overrides, *extra]
            jobs.append(training_job(f"{group}/{run.name}", run_overrides, run))
    failed = run_jobs(jobs, n_jobs) if jobs else []
    for ckpt in out_dir.rglob("checkpoints"):
        shutil.rmtree(ckpt, ignore_errors=True)
    failed = failed or stage.incomplete(runs_of(planned))
    if not failed:
        stage.commit(
            runs_of(planned),
            superseded=[
                old
                for group, row, seeds, _ in planned
                for old in old_runs(runs_dir / group, row, seeds if keep_other_seeds else None)
            ],
        )
    return failed


def runs_of(planned: list) -> list:
    """The run folders of the planned rows, relative to the runs dir."""
    return [f"{group}/{row}-seed{k}" for group, row, seeds, _ in planned for k in seeds]


def collect(runs_dir: Path) -> dict:
    """group -> row -> per-seed records (summary.json), in seed order."""
    rows: dict = {}
    for path in summaries(runs_dir, "*/*-seed*/summary.json"):  # <group>/<row>-seed<k>/ only
        run_dir = path.parent
        group, (row, _, seed) = run_dir.parent.name, run_dir.name.rpartition("-seed")
        rows.setdefault(group, {}).setdefault(row, []).append(
            {
                "seed": int(seed),
                "run": str(run_dir.relative_to(runs_dir)),
                **json.loads(path.read_text()),
            }
        )
    for group in rows.values():
        for records in group.values():
            records.sort(key=lambda r: r["seed"])
    return rows


def describe(cfg: dict) -> str:
    """The recipe of a run in one line, from its saved config (.hydra/config.yaml, of any format:
    brought to the current layout first, so records from before and after a layout change read
    alike)."""
    cfg = upgrade(cfg, default_task=lambda data_name: "translation")
    m, task, t = cfg["model"], cfg["task"], cfg["trainer"]
    return (
        f"{m.get('n_encoder_layer') or m['n_layer']}+{m['n_layer']} layers, d {m['d_model']}, FFN "
        f"{round(m['mlp_ratio'] * m['d_model'])}, "
        f"{'pre' if m.get('norm_first', True) else 'post'}-LN, {t['max_steps']} updates of "
        f"{task['max_tokens']} tokens, label smoothing {task['label_smoothing']}, "
        f"{t['precision']}."
    )


def descriptions(runs_dir: Path, group: dict) -> dict:
    """Each distinct description of a group's runs -> the rows whose runs have it."""
    out: dict = {}
    for row, records in group.items():
        for r in records:
            cfg = yaml.safe_load((runs_dir / r["run"] / ".hydra/config.yaml").read_text())
            rows = out.setdefault(describe(cfg), [])
            if row not in rows:
                rows.append(row)
    return out


def provenance(group: dict) -> dict:
    """The device, torch and commit of a group's records: one value, or the distinct ones joined."""
    records = [r for recs in group.values() for r in recs]
    return {
        name: ", ".join(dict.fromkeys(str(r[key]) for r in records))
        for name, key in (
            ("device", "device_name"),
            ("torch", "torch_version"),
            ("git_sha", "git_sha"),
        )
    }


def significance(group: dict) -> dict:
    """metric -> "<row>_vs_mha" -> Welch's t-test of the row's per-seed test scores against mha's
    (2+ seeds each)."""
    base = group.get("mha", [])
    out: dict = {}
    for metric in TESTS:
        for row in ROWS[1:]:
            a, b = [r[metric] for r in group.get(row, [])], [r[metric] for r in base]
            if len(a) >= 2 and len(b) >= 2:
                out.setdefault(metric, {})[f"{row}_vs_mha"] = {**welch(a, b), "n": [len(a), len(b)]}
    return out


def sentence(metric: str, name: str, test: dict) -> str:
    verdict = "significant" if test["p"] < 0.05 else "not significant"
    return (
        f"{name.replace('_vs_', ' - ')} = {test['mean_diff']:+.2f} {TESTS[metric]}, t = "
        f"{test['t']:.2f}, p = {test['p']:.3f} (n = {test['n'][0]} vs {test['n'][1]} seeds): "
        f"{verdict} at 0.05."
    )


def per_seed(records: list, key: str) -> str:
    return ", ".join(f"{r[key]:.2f}" for r in records)


def source_lines(block: dict) -> list:
    """A table's recipe (from the configs) and device, torch and commit (from the summaries)."""
    described = block["description"]
    lines = (
        list(described)
        if len(described) == 1
        else [f"{', '.join(rows)}: {d}" for d, rows in described.items()]
    )
    p = block["provenance"]
    return [*lines, "", f"Device: {p['device']}; torch {p['torch']}; git {p['git_sha']}.", ""]


def group_table(heading: str, recs_by_row: dict, block: dict) -> list:
    # the runs trained N at once on one device: their wall times say nothing
    shared = block.get("shared_jobs", 1) > 1
    lines = [f"## {heading}", "", *source_lines(block)]
    if shared:
        lines += [
            (
                f"These runs trained {block['shared_jobs']} at once on one GPU (`--jobs "
                f"{block['shared_jobs']}`, each stopped at the device call's time limit and "
                "resumed from its checkpoint where needed), so their wall times measure a shared "
                "device and are not shown."
            ),
            "",
        ]
    header = ["row", "params", "MACs / token", "test BLEU", "per seed", "chrF", "BLEU (tok.)"]
    header += ["val BLEU (greedy)", "wall time (s), evaluation included"]
    lines += table_lines(
        header,
        [row_cells(row, recs_by_row[row], shared) for row in ROWS if recs_by_row.get(row)],
        "lrrrlrrrr",
    )
    first = next(iter(recs_by_row.values()))[0]
    lines += ["", f"sacreBLEU signature: `{first.get('bleu_signature', '?')}`", ""]
    if block["welch"]:
        lines += [
            "Welch's t-test (two-sided) of the per-seed test scores, each row against mha:",
            "",
        ]
        lines += [
            f"- {sentence(metric, name, test)}"
            for metric, tests in block["welch"].items()
            for name, test in tests.items()
        ]
        lines.append("")
    return lines


def row_cells(row: str, recs: list, shared: bool) -> list:
    """A row's cells in a group's table: size, scores over seeds and (unless the runs shared the
    device) wall time."""
    r0 = recs[0]
    return [
        row,
        f"{r0['params_total']:,}",
        f"{r0['flops_per_token'] / 6 / 1e6:.2f}M",
        mean_sd([r["test/bleu"] for r in recs]),
        per_seed(recs, "test/bleu"),
        mean_sd([r["test/chrf"] for r in recs]),
        mean_sd([r["test/bleu_tok"] for r in recs]),
        mean_sd([r["val/bleu"] for r in recs]),
        "-" if shared else mean_sd([r["wall_s"] for r in recs], 0),
    ]


def markdown(rows: dict, groups: dict, meta: dict) -> str:
    lines = [
        "# Translation: MoA vs MHA",
        "",
        (
            "- Command: `python3 scripts/reproduce_translation.py` (`--part "
            "multi30k,multi30k_fairseq,wmt`, `--seeds N`, `--rows`, `--seed-list`, `--jobs N`; "
            "`--tables-only` rebuilds this file from the run records)"
        ),
        f"- Device, torch and commit: under each table, from its run records; date {meta['date']}",
        "- Run records: `docs/results/runs/translation/<group>/<row>-seed<k>/`",
        (
            "- BLEU: sacreBLEU on detokenised text (13a tokenisation, signature below), beam 4, "
            "length penalty 0.6, the last 5 checkpoints averaged; `BLEU (tok.)` is BLEU on "
            "13a-tokenised text with compound splitting, the kind of number the MoA paper reported "
            "(it used Moses tokenisation): the two are not comparable with each other. MACs per "
            "token: forward multiply-accumulates per (source + target) token pair from the models' "
            "FLOP counter (training FLOPs / 6) at the mean training target length."
        ),
        "",
        *note_lines(meta),
    ]
    for group, heading in GROUPS.items():
        if group in rows:
            lines += group_table(heading, rows[group], groups[group])
    if WMT[0] in rows:
        r = rows[WMT[0]][WMT[1]][0]
        lines += [
            "## The WMT pipeline end to end on the local news data",
            "",
            (
                "The same mha architecture trained for 2000 updates on the 13,573 local pairs "
                "(older newstests, not the WMT14 training corpus), validated on newstest2013, "
                "tested on newstest2014 (3,003 sentences). The training set is about 0.3% of "
                "WMT14's, so the score is far below the paper's 27-28: this run shows that the "
                "pipeline works end to end, not what the models reach on WMT14."
            ),
            "",
            *source_lines(groups[WMT[0]])[-2:],
            (
                f"newstest2014: BLEU {r['test/bleu']:.2f}, chrF {r['test/chrf']:.2f}, BLEU (tok.) "
                f"{r['test/bleu_tok']:.2f}; {r['params_total']:,} parameters; {r['wall_s']:.0f} s."
            ),
            "",
        ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = DriverParser(
        __doc__,
        "translation",
        seeds_help="seeds 0..N-1 of every Multi30k row",
        jobs_help="N > 1: every (row, seed) as its own process, N at once on the one device (wall "
        "times then measure runs that share it); 1: one multirun per row, its seeds in turn",
    )
    parser.add_argument(
        "--seed-list",
        type=comma_list((), non_negative_int, "seeds (integers >= 0)"),
        help="only these seeds (a comma list, e.g. 2), keeping the row's other seeds' records "
        "(without "
        "it a row's old records all go before it reruns)",
    )
    parser.add_argument(
        "--part",
        type=comma_list(("all", *PARTS)),
        default=["all"],
        help=f"a comma list of all, {', '.join(PARTS)}",
    )
    parser.add_choices("--rows", ROWS)
    args, runs_dir = parser.parse_checked(argv)
    if not args.tables_only:
        parts = PARTS if "all" in args.part else args.part
        planned = plan(parts, args.rows, args.seed_list or list(range(args.seeds)))
        if not planned:
            fail(
                f"--part {','.join(args.part)} with --rows {','.join(args.rows)}: no run to "
                f"train (the {WMT[0]} part has the {WMT[1]} row only)"
            )
        check_overrides(
            [
                [f"trainer.seed={seeds[0]}", *COMMON, *o, *args.overrides]
                for _, _, seeds, o in planned
            ]
        )
        failed = train(
            planned,
            runs_dir,
            args.overrides,
            args.jobs,
            keep_other_seeds=args.seed_list is not None,
        )
        if failed:
            unfinished(failed, runs_dir / STAGING)
    rows = collect(runs_dir)
    if not rows:
        no_records(args.runs_dir)
    # how many runs shared the device, per group: this run's --jobs for the parts it trained (with
    # --tables-only: for the parts named, records trained N at once elsewhere), else the committed
    # file's
    before = previous_meta(args.out).get("shared_jobs", {})
    named = {
        "wmt_local" if part == "wmt" else part
        for part in (PARTS if "all" in args.part else args.part)
    }
    shared = {
        g: (
            args.jobs
            if g in named and (args.jobs > 1 or not args.tables_only)
            else before.get(g, 1)
        )
        for g in rows
    }
    groups = {
        group: {
            "description": descriptions(runs_dir, recs),
            "provenance": provenance(recs),
            "welch": significance(recs),
            "shared_jobs": shared[group],
        }
        for group, recs in rows.items()
    }
    # a rebuild keeps the measuring run's date and note
    kept = results_meta(args.out, args.tables_only)
    meta = {"date": kept["date"], "note": kept["note"], "shared_jobs": shared}
    write_text(
        args.out.with_suffix(".json"),
        json.dumps({"meta": meta, "groups": groups, "runs": rows}, indent=1),
    )
    text = markdown(rows, groups, meta)
    # scripts/time_translation_decoding.py's record
    decoding = args.out.parent / "translation_decoding.json"
    if decoding.is_file():
        from moa_train.results.decoding import markdown_section

        text += "\n" + "\n".join(markdown_section(json.loads(decoding.read_text())))
    write_text(args.out.with_suffix(".md"), text)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
