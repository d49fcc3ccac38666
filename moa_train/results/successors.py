"""The successors' small paper checks (docs/results/successors.md): MoH against MHA on WikiText-2
BPE, MAE against MHA on Multi30k, 3 seeds per row, all runs of a call trained at once on one GPU.

- moh_wt2 (`experiment=successors/moh_wt2/{mha,moh}`): MoH with 75% of its heads active per token
  against MHA of the same size. The MoH paper's claim, checked as "no worse": the 95% confidence
  interval of the test-perplexity difference (MoH - MHA, Welch, Welch-Satterthwaite degrees of
  freedom) lies below +2% of MHA's mean test perplexity.
- mae_multi30k (`experiment=successors/mae_multi30k/{mha,mae}`): MAE (block coordinate descent)
  against MHA of about the same parameters; test BLEU (beam 4) with its spread, the difference with
  its 95% interval and Welch's p.
- switchhead_wt2 (`experiment=successors/switchhead_wt2/{mha_wide,switchhead,mha_narrow}`):
  SwitchHead (2 heads, 5 experts, top-2) against MHA with 8 heads and MHA with SwitchHead's 2 heads,
  all three of equal parameters (matched through the MLP width) and rotary positions. The paper's
  ordering, checked as: SwitchHead no worse than the wide MHA (Welch's 95% interval of the
  difference below +2% of its perplexity, as for MoH), both better than the narrow MHA (each
  interval below 0), at fewer attention MACs per token (the attention modules' FLOP counter).

    python3 scripts/reproduce_successors.py --jobs 12      # train, evaluate, write the tables
    python3 scripts/reproduce_successors.py --tables-only  # rebuild the tables from the records

Records: docs/results/runs/successors/<check>/<row>-seed<k>/ (summary.json, metrics.jsonl, the saved
config); new runs are staged and replace the old records only once all of them finished.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from moa_train.results import (
    DriverParser,
    Staging,
    file_meta,
    mean_sd,
    no_records,
    run_jobs,
    staged_jobs,
    summaries,
    training_job,
    welch,
    write_results,
)
from moa_train.tables import table_lines

GROUP = "successors"
# check -> (rows, the baseline row, the test metric, its name, higher is better)
CHECKS = {
    "moh_wt2": (("mha", "moh"), "mha", "test/ppl", "test perplexity", False),
    "mae_multi30k": (("mha", "mae"), "mha", "test/bleu", "test BLEU", True),
    "switchhead_wt2": (
        ("mha_wide", "switchhead", "mha_narrow"),
        "mha_wide",
        "test/ppl",
        "test perplexity",
        False,
    ),
}
NO_WORSE = 0.02  # MoH: the interval's upper end below +2% of MHA's perplexity


def overrides(check: str, row: str, seed: int, extra: list) -> list:
    return [f"experiment={GROUP}/{check}/{row}", f"trainer.seed={seed}", *extra]


def names(checks: list, seeds: list) -> list:
    return [f"{c}/{row}-seed{k}" for c in checks for row in CHECKS[c][0] for k in seeds]


def jobs(checks: list, seeds: list, runs_dir: Path, extra: list, keep: bool) -> list:
    """The runs to train into <runs_dir>/.staging/ (keep: those finished there are not rerun, and an
    unfinished one resumes from its checkpoint: trainer.resume is auto)."""

    def job(name: str, run: Path):
        check, _, rest = name.partition("/")
        row, _, seed = rest.rpartition("-seed")
        return training_job(name, overrides(check, row, int(seed), extra), run)

    return staged_jobs(runs_dir, names(checks, seeds), job, keep)


def prepare_data(checks: list, extra: list) -> None:
    """Tokenise the LM check's data once before the concurrent runs start (see kv_tradeoff; the
    translation pairs' tokenizer is cached atomically, as the translation driver relies on)."""
    from moa_train.config import compose_train
    from moa_train.data import load_data

    lm = [c for c in ("moh_wt2", "switchhead_wt2") if c in checks]  # the same WikiText-2 BPE
    if lm:
        load_data(compose_train(overrides(lm[0], CHECKS[lm[0]][0][0], 0, extra)).data)


def reproduce(checks: list, seeds: list, runs_dir: Path, extra: list, n: int, keep: bool) -> None:
    stage = Staging(runs_dir, resume=keep)
    hint = "; --keep-finished resumes them"
    prepare_data(checks, extra)
    failed = run_jobs(jobs(checks, seeds, runs_dir, extra, keep), n)
    stage.stop_if_failed(failed, hint)
    stage.commit(names(checks, seeds), hint=hint)


# --- tables ---------------------------------------------------------------------------------------


def collect(runs_dir: Path) -> dict:
    """check -> row -> per-seed summaries, in seed order."""
    out: dict = {}
    for path in summaries(runs_dir, "*/*-seed*/summary.json"):
        check, (row, _, seed) = path.parent.parent.name, path.parent.name.rpartition("-seed")
        if check in CHECKS:
            record = {"seed": int(seed), "run": f"{check}/{path.parent.name}"}
            if check == "switchhead_wt2":
                record["attention_macs"] = attention_macs(path.parent)
            out.setdefault(check, {}).setdefault(row, []).append(
                {**record, **json.loads(path.read_text())}
            )
    for rows in out.values():
        for records in rows.values():
            records.sort(key=lambda r: r["seed"])
    return out


def attention_macs(run: Path) -> int:
    """Forward MACs per token of the attention layers of a run's model (its saved config rebuilt
    on the CPU): the attention modules' FLOP counter (6 x MACs: forward and backward) / 6, at the
    training block size."""
    from omegaconf import OmegaConf

    from moa_train.models import build_model

    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    model = build_model(cfg.model, cfg.data.vocab_size)
    return sum(b.attn.flops_per_token(cfg.trainer.block_size) for b in model.blocks) // 6


def welch_interval(a: list, b: list, level: float = 0.95) -> dict:
    """mean(a) - mean(b) with its Welch confidence interval (Welch-Satterthwaite degrees of
    freedom) and two-sided p-value (the drivers' `welch` test)."""
    from scipy import stats

    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff, se = statistics.mean(a) - statistics.mean(b), math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se > 0 else math.inf
    half = stats.t.ppf(0.5 + level / 2, df) * se
    p = welch(a, b)["p"] if se > 0 else (0.0 if diff else 1.0)
    return {
        "diff": diff,
        "low": float(diff - half),
        "high": float(diff + half),
        "df": float(df),
        "p": p,
        "level": level,
    }


def summarise(table: dict) -> dict:
    out = {}
    for check, rows in table.items():
        names_, base, metric, label, _ = CHECKS[check]
        res = {"metric": metric, "label": label, "rows": {}}
        for row in names_:
            recs = rows.get(row, [])
            if not recs:
                continue
            values = [r[metric] for r in recs]
            res["rows"][row] = {
                "seeds": [r["seed"] for r in recs],
                "values": values,
                "mean": statistics.mean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else None,
                "params": recs[0].get("params_total"),
                "flops_per_token": recs[0].get("flops_per_token"),
                **{k: recs[0][k] for k in ("attention_macs",) if k in recs[0]},
                "val": [r.get("val/loss") for r in recs],
                "steps": [r.get("steps") for r in recs],
                "device": ", ".join(dict.fromkeys(str(r.get("device_name")) for r in recs)),
                "torch": ", ".join(dict.fromkeys(str(r.get("torch_version")) for r in recs)),
                "git_sha": ", ".join(dict.fromkeys(str(r.get("git_sha")) for r in recs)),
                "runs": [r["run"] for r in recs],
            }
        other = [r for r in names_ if r != base]
        if base in res["rows"] and other and other[0] in res["rows"]:
            a, b = res["rows"][other[0]]["values"], res["rows"][base]["values"]
            if len(a) >= 2 and len(b) >= 2:
                test = welch_interval(a, b)
                test["row"] = other[0]
                if check == "moh_wt2":
                    bound = NO_WORSE * res["rows"][base]["mean"]
                    test["bound"] = bound
                    test["no_worse"] = bool(test["high"] < bound)
                res["test"] = test
        if check == "switchhead_wt2":
            res["ordering"] = ordering(res["rows"])
        out[check] = res
    return out


def ordering(rows: dict) -> dict | None:
    """SwitchHead's paper ordering from the rows' per-seed test perplexities and attention MACs:
    SwitchHead no worse than the wide MHA (the Welch interval of the difference below +2% of its
    perplexity), both better than the narrow MHA (each interval below 0), fewer attention MACs."""
    if any(len(rows.get(r, {}).get("values", [])) < 2 for r in CHECKS["switchhead_wt2"][0]):
        return None
    pairs = {
        "switchhead-mha_wide": ("switchhead", "mha_wide"),
        "switchhead-mha_narrow": ("switchhead", "mha_narrow"),
        "mha_wide-mha_narrow": ("mha_wide", "mha_narrow"),
    }
    tests = {k: welch_interval(rows[a]["values"], rows[b]["values"]) for k, (a, b) in pairs.items()}
    bound = NO_WORSE * rows["mha_wide"]["mean"]
    macs = rows["switchhead"]["attention_macs"] / rows["mha_wide"]["attention_macs"]

    def steps(edge: str) -> dict:
        """Each step of the ordering, judged on the difference's `edge`: "high" (the interval's
        upper end: significant) or "diff" (the means alone)."""
        return {
            "switchhead_about_wide": bool(tests["switchhead-mha_wide"][edge] < bound),
            "switchhead_beats_narrow": bool(tests["switchhead-mha_narrow"][edge] < 0),
            "wide_beats_narrow": bool(tests["mha_wide-mha_narrow"][edge] < 0),
            "fewer_attention_macs": bool(macs < 1),
        }

    parts = steps("high")
    return {
        "tests": tests,
        "bound": bound,
        "attention_macs_ratio": macs,
        **parts,
        "holds": all(parts.values()),
        "means_in_order": all(steps("diff").values()),  # no significance asked
    }


def switchhead_verdict(res: dict) -> str:
    order = res.get("ordering")
    if order is None:
        return "No test: fewer than 2 seeds of a row."
    lines = []
    for key, t in order["tests"].items():
        lines.append(f"- {interval_line(key.replace('-', ' - '), t, 'test perplexity')}")
    said = {True: "yes", False: "no"}
    parts = (
        f"- SwitchHead about the wide MHA (upper end below +2% of its perplexity = "
        f"+{order['bound']:.3f}): {said[order['switchhead_about_wide']]}; SwitchHead better than "
        f"the narrow MHA: {said[order['switchhead_beats_narrow']]}; the wide MHA better than the "
        f"narrow one: {said[order['wide_beats_narrow']]}; SwitchHead's attention MACs per token "
        f"{order['attention_macs_ratio']:.2f}x the wide MHA's."
    )
    claim = (
        "The paper's ordering (SwitchHead about the wide MHA, both better than the narrow one, at "
        "fewer attention MACs)"
    )
    if order["holds"]:
        answer = f"{claim} holds here."
    elif order["means_in_order"]:  # the direction is right, the tests cannot tell it from noise
        answer = (
            f"{claim} is not shown here: the means fall in its order, but not every step of it "
            "is significant at these seeds."
        )
    else:
        answer = f"{claim} does not hold here: the means do not fall in its order."
    lines += [parts, "", answer]
    return "\n".join(lines)


def interval_line(name: str, t: dict, unit: str) -> str:
    """`name = diff unit, 95% CI [low, high] (Welch, df), p` of a `welch_interval` result."""
    return (
        f"{name} = {t['diff']:+.3f} {unit}, 95% CI [{t['low']:+.3f}, {t['high']:+.3f}] "
        f"(Welch, df {t['df']:.1f}), p = {t['p']:.3f}"
    )


def verdict(check: str, res: dict) -> str:
    if check == "switchhead_wt2":
        return switchhead_verdict(res)
    test = res.get("test")
    if test is None:
        return "No test: fewer than 2 seeds of a row."
    interval = interval_line(f"{test['row']} - mha", test, res["label"])
    if check == "moh_wt2":
        holds = "holds" if test["no_worse"] else "is not shown"
        return (
            f'{interval}. The bound for "no worse" is +2% of MHA\'s perplexity = '
            f"+{test['bound']:.3f}: "
            f"the interval's upper end is {'below' if test['no_worse'] else 'above'} it, so the "
            f"paper's claim (75% of the heads do as well as all of them) {holds} here."
        )
    sig = "significant" if test["p"] < 0.05 else "not significant"
    return f"{interval}: {sig} at 0.05."


HEADINGS = {
    "moh_wt2": "MoH (75% of heads active) against MHA, WikiText-2 BPE",
    "mae_multi30k": "MAE (block coordinate descent) against MHA, Multi30k En-De",
    "switchhead_wt2": "SwitchHead against MHA of equal parameters (8 and 2 heads), WikiText-2 BPE",
}


def check_table(r: dict) -> list:
    """A check's rows: parameters, each row's attention MACs per token (forward, all layers) where
    the check records them (switchhead_wt2), training FLOPs per token, the metric per seed."""
    macs = all("attention_macs" in v for v in r["rows"].values())
    return table_lines(
        ["row", "params", *(["attention MACs / token"] if macs else [])]
        + ["FLOPs / token (training)", r["label"], "per seed", "steps"],
        [
            [row, f"{v['params']:,}", *([f"{v['attention_macs']:,}"] if macs else [])]
            + [f"{v['flops_per_token']:,}", mean_sd(v["values"])]
            + [", ".join(f"{x:.2f}" for x in v["values"]), ", ".join(map(str, v["steps"]))]
            for row, v in r["rows"].items()
        ],
        "lrr" + ("r" if macs else "") + "rll",
    )


def markdown(res: dict, meta: dict) -> str:
    lines = [
        "# Successors: small paper checks",
        "",
        f"- Command: `{meta['command']}` (`--tables-only` rebuilds this file from the run records)",
        f"- Date: {meta['date']}",
    ]
    if meta.get("note"):
        lines.append(f"- Note: {meta['note']}")
    lines.append(
        "- Records: `docs/results/runs/successors/<check>/<row>-seed<k>/` (summary.json, "
        "metrics.jsonl, the saved config); the runs of one call trained at once on one GPU, so "
        "their wall times are not compared."
    )
    for check, r in res.items():
        rows = r["rows"]
        first = next(iter(rows.values()))
        lines += [
            "",
            f"## {HEADINGS[check]}",
            "",
            f"Device: {first['device']}; torch {first['torch']}; git {first['git_sha']}.",
            "",
            *check_table(r),
            "",
            verdict(check, r),
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = DriverParser(__doc__, GROUP)
    parser.add_choices("--checks", tuple(CHECKS))
    parser.add_keep_finished()
    args, runs_dir = parser.parse_checked(
        argv, lambda a: [overrides(c, CHECKS[c][0][0], 0, a.overrides) for c in a.checks]
    )
    if not args.tables_only:
        seeds = list(range(args.seeds))
        reproduce(args.checks, seeds, runs_dir, args.overrides, args.jobs, args.keep_finished)
    table = collect(runs_dir)
    if not table:
        no_records(args.runs_dir)
    res = summarise(table)
    meta = file_meta(
        args, "reproduce_successors.py", args.jobs, overrides=args.overrides, keep_command=True
    )
    write_results(args.out, {"meta": meta, "results": res}, markdown(res, meta))


if __name__ == "__main__":
    main()
