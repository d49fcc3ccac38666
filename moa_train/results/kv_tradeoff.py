"""The question: at equal realised KV cache bytes, does moas_kv reach a lower perplexity than
GQA/MQA, and at what parameter and compute cost? Trains the rows of configs/experiment/kv_tradeoff/
over seeds, evaluates them and writes docs/results/kv_tradeoff.{md,json,png}.

    python3 scripts/reproduce_kv_tradeoff.py --jobs 33    # 11 rows x 3 seeds at once, then tables
    python3 scripts/reproduce_kv_tradeoff.py --rows mha,moas_kv_b2 --seeds 2
    python3 scripts/reproduce_kv_tradeoff.py --tables-only   # rebuild from the committed records
    # only the MLA rows, added to the committed records (the others neither retrained nor moved)
    python3 scripts/reproduce_kv_tradeoff.py --rows mla_r64,mla_r128 --jobs 6
    # again after a time limit: finished runs kept, unfinished ones resumed
    python3 scripts/reproduce_kv_tradeoff.py --jobs 27 --keep-finished

Every argument and override is checked first (one `error:` line, exit 2, nothing touched). Phases:
(1) each (row, seed) as a single `moa-train experiment=kv_tradeoff/<row> mode=fast trainer.seed=<k>`
into <runs-dir>/.staging/<row>-seed<k>/ (--jobs at once; a run's output in <row>-seed<k>.log, kept
only if it fails); (2) each trained model, its final weights in fp32 on the full WikiText-2 valid
and test files: perplexity with hard routing (moas_kv's argmax scheme, what its cache stores; the
other rows as trained) and, for moas_kv, with soft routing as a reference; the realised KV cache
bytes per token (bf16) of the validation text prefilled block by block into the model's own cache
(moas_kv: a head pool that cannot overflow, so the bytes are exactly what the hard routing stores;
plus the share of tokens that the configured pool, model.kv_pool_slack, would have stored as MQA);
the hard routing's shares per layer. Written as kv_eval.json beside summary.json, then the
checkpoints are deleted; the new runs then replace the old records of the same rows and seeds in
<runs-dir>/, and only if every one of them trained and was evaluated (else the old records and
tables stay as they were, and the new runs wait in .staging/, where --keep-finished resumes them).
(3) tables, plot, Welch's t-tests of each moas_kv row against the GQA/MQA row of nearest realised
bytes and against the parameter-matched GQA row, and the verdict generated from those numbers.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path

from moa_train.results import (
    DriverParser,
    Staging,
    evaluate_each,
    evaluated,
    file_meta,
    no_records,
    note_lines,
    run_jobs,
    save_figure,
    shared_jobs,
    staged_jobs,
    summaries,
    training_job,
    welch,
    write_results,
)
from moa_train.tables import table_lines

GROUP = "kv_tradeoff"
ROWS = (
    "mha",
    "gqa4",
    "gqa2",
    "mqa",
    "moas_dynamic",
    "moas_kv_b1p5",
    "moas_kv_b2",
    "moas_kv_b4",
    "gqa2_pm",
    "mla_r64",
    "mla_r128",
)
# the fixed-scheme points each moas_kv row is compared with
BASELINES = ("mha", "gqa4", "gqa2", "mqa")
PARAM_MATCHED = "gqa2_pm"
ALPHA = 0.05


def is_kv(row: str) -> bool:
    return row.startswith("moas_kv")


def is_mla(row: str) -> bool:
    return row.startswith("mla")


def overrides(row: str, seed: int, extra: list) -> list:
    return [f"experiment={GROUP}/{row}", "mode=fast", f"trainer.seed={seed}", *extra]


def names(rows: list, seeds: list) -> list:
    return [f"{row}-seed{seed}" for row in rows for seed in seeds]


def jobs(rows: list, seeds: list, runs_dir: Path, extra: list, keep_finished: bool = False) -> list:
    """The runs to train, into <runs_dir>/.staging/. keep_finished: a run already finished there
    (holding summary.json) is kept and not rerun, and an unfinished one resumes from its last
    checkpoint (trainer.resume=auto), so that a driver stopped by a time limit picks up where it
    was."""

    def job(name: str, run: Path):
        row, _, seed = name.rpartition("-seed")
        return training_job(f"{GROUP}/{name}", overrides(row, int(seed), extra), run)

    return staged_jobs(runs_dir, names(rows, seeds), job, keep_finished)


def reproduce(
    rows: list, seeds: list, runs_dir: Path, extra: list, n_jobs: int, keep: bool
) -> None:
    """Train and evaluate the runs in the staging folder (keep: resuming what an interrupted call
    left there), then put them in place of the old records of the same names; a run that fails
    leaves the old records as they were (exit 1)."""
    stage = Staging(runs_dir, resume=keep)
    hint = "; --keep-finished resumes them"
    prepare_data(extra)
    failed = run_jobs(jobs(rows, seeds, runs_dir, extra, keep), n_jobs)
    stage.stop_if_failed(failed, hint)
    evaluate_runs(stage.root)
    stage.commit(names(rows, seeds), "kv_eval.json", hint=hint)


def prepare_data(extra: list) -> None:
    """Tokenise the data once (BPE training included) before the runs start: otherwise every one of
    the concurrent runs would train the same tokenizer at once, and all but one would throw theirs
    away (the cache is atomic)."""
    from moa_train.config import compose_train
    from moa_train.data import load_data

    load_data(compose_train([f"experiment={GROUP}/mha", *extra]).data)


def _pass(model, split, batch: int, block: int, device) -> dict:
    """One full pass over `split` in fp32: summed NLL, target tokens, and per layer the hard
    routing's counts per choice (choice names from the records)."""
    import torch
    import torch.nn.functional as F

    from moa_train.data.batches import sequential_windows

    nll, count, shares, names = 0.0, 0, None, None
    with torch.no_grad():
        for x, y in sequential_windows(split.tokens, batch, block, device):
            logits, routings = model(x)
            nll += float(
                F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
            )
            count += y.numel()
            if routings and routings[0] is not None:
                names = routings[0].choice_names
                chosen = [
                    r.probs.argmax(-1) if r.chosen is None else r.chosen[:, 0] for r in routings
                ]
                counts = torch.stack(
                    [torch.bincount(c, minlength=len(names)) for c in chosen]
                ).double()
                shares = counts if shares is None else shares + counts
    out = {"loss": nll / count}
    if shares is not None:
        shares = shares / shares.sum(-1, keepdim=True)
        out["shares"] = {
            f"layer{i}": dict(zip(names, map(float, row), strict=True))
            for i, row in enumerate(shares)
        }
    return out


def _kv_bytes(model, split, batch: int, block: int, device, exact_pool: bool) -> dict:
    """Realised cache bytes per token (bf16) of `split` prefilled block by block into the model's
    cache, and the share of token-layers stored as a fallback scheme. exact_pool: moas_kv pools of
    n_head x max_len (no fallback)."""
    import torch

    from moa_train.data.batches import sequential_windows

    modules = [b.attn for b in model.blocks if hasattr(b.attn, "kv_pool_slack")]
    saved = [m.kv_pool_slack for m in modules]
    if exact_pool:
        for m in modules:
            m.kv_pool_slack = m.n_head / m.budget_heads()
    total, tokens, fallbacks = 0.0, 0, 0
    try:
        with torch.no_grad():
            for x, _ in sequential_windows(split.tokens, batch, block, device):
                cache = model.init_cache(x.shape[0], x.shape[1], dtype=torch.bfloat16)
                model.prefill(x, torch.full((x.shape[0],), x.shape[1]), cache)
                total += cache.realised_bytes_per_token() * x.numel()
                tokens += x.numel()
                fallbacks += cache.overflow()
    finally:
        model.release_cache()
        for m, slack in zip(modules, saved, strict=True):
            m.kv_pool_slack = slack
    return {
        "kv_bytes_per_token": total / tokens,
        "fallback_share": fallbacks / (tokens * len(model.blocks)),
    }


def evaluate_run(run: Path, batch: int = 32) -> dict:
    """kv_eval.json's figures for one trained run (see the module docstring)."""
    import torch
    from omegaconf import OmegaConf

    import moa_train
    from moa_train.data import load_data

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = moa_train.load_run(run, map_location=str(device))
    data = load_data(OmegaConf.merge(cfg.data, {"split": "official"}))
    block = cfg.trainer.block_size
    out = {}
    for split in ("val", "test"):
        res = _pass(model, data.splits[split], batch, block, device)
        out[f"{split}/loss"], out[f"{split}/ppl"] = res["loss"], math.exp(res["loss"])
        if split == "val" and "shares" in res:
            out["shares"] = res["shares"]
    out.update(_kv_bytes(model, data.splits["val"], batch, block, device, exact_pool=True))
    out["pool_fallback_share"] = _kv_bytes(
        model, data.splits["val"], batch, block, device, exact_pool=False
    )["fallback_share"]
    kv_modules = [b.attn for b in model.blocks if hasattr(b.attn, "kv_pool_slack")]
    if kv_modules:
        for m in kv_modules:
            m.inference_routing = "soft"
        for split in ("val", "test"):
            out[f"{split}/loss_soft"] = _pass(model, data.splits[split], batch, block, device)[
                "loss"
            ]
            out[f"{split}/ppl_soft"] = math.exp(out[f"{split}/loss_soft"])
    return out


def evaluate_runs(runs_dir: Path) -> None:
    # the BPE tokenizer goes with the checkpoints: rebuilt from the data, it is not a record
    evaluate_each(
        summaries(runs_dir, "*/summary.json"),
        "kv_eval.json",
        evaluate_run,
        lambda run, r: (
            f"{run.name}: val ppl {r['val/ppl']:.2f} test ppl {r['test/ppl']:.2f} "
            f"KV {r['kv_bytes_per_token']:.0f} B/token"
        ),
        ("checkpoints", "tokenizer.json"),
    )


def collect(runs_dir: Path) -> dict:
    """row -> per-seed records (summary.json + kv_eval.json), by seed."""
    table: dict = {}
    for path in summaries(runs_dir, "*/summary.json"):
        run = path.parent
        row, _, seed = run.name.rpartition("-seed")
        kv_file = evaluated(path, "kv_eval.json")
        record = {
            "seed": int(seed),
            "run": run.name,
            **json.loads(path.read_text()),
            **json.loads(kv_file.read_text()),
            "setup": setup(run),
        }
        table.setdefault(row, []).append(record)
    for records in table.values():
        records.sort(key=lambda r: r["seed"])
    return table


def setup(run: Path) -> str:
    """The run's data and model sizes, from its saved config (.hydra/config.yaml)."""
    import yaml

    path = run / ".hydra" / "config.yaml"
    if not path.is_file():
        return "sizes unknown (no .hydra/config.yaml)"
    cfg = yaml.safe_load(path.read_text())
    m, d, t = cfg["model"], cfg["data"], cfg["trainer"]
    return (
        f"{d['name']} (vocabulary {d['vocab_size']}), {m['n_layer']} layers, d {m['d_model']}, "
        f"{m['n_head']} heads of {m['d_model'] // m['n_head']}, block {t['block_size']}, batch "
        f"{t['batch_size']}, {t['max_steps']} steps, dropout {m['dropout']}"
    )


def _mean(values: list) -> float:
    return statistics.mean(values)


def _sd(values: list) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _mean_shares(records: list) -> dict:
    if "shares" not in records[0]:
        return {}
    return {
        site: {c: _mean([r["shares"][site][c] for r in records]) for c in choices}
        for site, choices in records[0]["shares"].items()
    }


def summarise(table: dict) -> dict:
    rows = {}
    for row in [r for r in ROWS if r in table] + sorted(set(table) - set(ROWS)):
        recs = table[row]
        entry = {
            "model": recs[0].get("model", row),
            "params": recs[0]["params_non_embedding"],
            "flops_per_token": recs[0]["flops_per_token"],
            "kv_bytes_per_token": _mean([r["kv_bytes_per_token"] for r in recs]),
            "kv_bytes_per_seed": [r["kv_bytes_per_token"] for r in recs],
            "pool_fallback_share": _mean([r["pool_fallback_share"] for r in recs]),
            "val_ppl": [r["val/ppl"] for r in recs],
            "test_ppl": [r["test/ppl"] for r in recs],
            "val_loss": [r["val/loss"] for r in recs],
            "test_loss": [r["test/loss"] for r in recs],
            "shares": _mean_shares(recs),
            "seeds": [r["seed"] for r in recs],
            "runs": [r["run"] for r in recs],
            "tokens_seen": recs[0]["tokens_seen"],
            "setup": recs[0]["setup"],
            "device": recs[0]["device_name"],
            "torch": recs[0]["torch_version"],
            "git_sha": recs[0]["git_sha"],
        }
        if "val/ppl_soft" in recs[0]:
            entry["val_ppl_soft"] = [r["val/ppl_soft"] for r in recs]
            entry["test_ppl_soft"] = [r["test/ppl_soft"] for r in recs]
        rows[row] = entry
    return {"rows": rows, "comparisons": comparisons(rows)}


def comparisons(rows: dict) -> list:
    """Each moas_kv row against the baseline of nearest realised KV bytes (by log ratio) and the
    parameter-matched GQA row: Welch's t-test on the per-seed test loss (log perplexity)."""
    out = []
    baselines = [b for b in BASELINES if b in rows]
    for row in [r for r in rows if is_kv(r)]:
        r = rows[row]
        targets = []
        if baselines:
            targets.append(("nearest KV bytes", nearest_bytes(r, baselines, rows)))
        if PARAM_MATCHED in rows:
            targets.append(("parameter-matched", PARAM_MATCHED))
        line = frontier_comparison(row, rows)
        if line is not None:
            out.append(line)
        out += [pair_comparison(row, other, kind, rows) for kind, other in targets]
    return out + mla_comparisons(rows)


def nearest_bytes(r: dict, candidates: list, rows: dict) -> str:
    """The row of `candidates` whose realised KV bytes per token are nearest r's (in ratio)."""
    return min(
        candidates,
        key=lambda b: abs(math.log(r["kv_bytes_per_token"] / rows[b]["kv_bytes_per_token"])),
    )


def pair_comparison(row: str, other: str, kind: str, rows: dict) -> dict:
    """Row `row` against row `other`: the ratios of bytes, parameters and FLOPs, both test
    perplexities and Welch's test of the test losses (where both have two seeds or more)."""
    r, o = rows[row], rows[other]
    test = (
        welch(r["test_loss"], o["test_loss"])
        if min(len(r["test_loss"]), len(o["test_loss"])) > 1
        else None
    )
    return {
        "row": row,
        "against": other,
        "kind": kind,
        "kv_bytes_ratio": r["kv_bytes_per_token"] / o["kv_bytes_per_token"],
        "test_ppl": _mean(r["test_ppl"]),
        "against_test_ppl": _mean(o["test_ppl"]),
        "params_ratio": r["params"] / o["params"],
        "flops_ratio": r["flops_per_token"] / o["flops_per_token"],
        "welch_test_loss": test,
    }


def mla_comparisons(rows: dict) -> list:
    """Each MLA row against the fixed-scheme line at its realised bytes (where two baselines
    bracket them) and against the moas_kv row of nearest realised bytes."""
    out = []
    budgets = [b for b in rows if is_kv(b)]
    for row in [r for r in rows if is_mla(r)]:
        r = rows[row]
        line = frontier_comparison(row, rows)
        if line is not None:
            out.append(line)
        if budgets:
            other = nearest_bytes(r, budgets, rows)
            out.append(pair_comparison(row, other, "nearest moas_kv bytes", rows))
    return out


def frontier(rows: dict, kv_bytes: float) -> dict | None:
    """The fixed-scheme line (MHA/GQA/MQA rows) at `kv_bytes`: the test loss interpolated linearly
    in log bytes between the two baseline rows whose realised bytes bracket it, with the variance of
    that interpolated mean (from the two rows' seeds); None outside the baselines' range (no
    extrapolation)."""
    points = sorted((math.log(rows[b]["kv_bytes_per_token"]), b) for b in BASELINES if b in rows)
    x = math.log(kv_bytes)
    for (xa, a), (xb, b) in itertools.pairwise(points):
        if xa <= x <= xb:
            w = (xb - x) / (xb - xa) if xb > xa else 1.0
            parts = [(w, rows[a]["test_loss"]), (1 - w, rows[b]["test_loss"])]
            return {
                "rows": (a, b),
                "weight": w,
                "loss": sum(c * _mean(v) for c, v in parts),
                "parts": [(c * c * _sd(v) ** 2 / len(v), len(v)) for c, v in parts],
            }
    return None


def frontier_test(losses: list, line: dict) -> dict | None:
    """Welch-Satterthwaite t-test of mean(losses) against the interpolated line (two-sided)."""
    from scipy import stats

    parts = [(_sd(losses) ** 2 / len(losses), len(losses)), *line["parts"]]
    var = sum(v for v, _ in parts)
    if len(losses) < 2 or var == 0:
        return None
    df = var**2 / sum(v * v / (n - 1) for v, n in parts if n > 1)
    t = (_mean(losses) - line["loss"]) / math.sqrt(var)
    return {
        "t": t,
        "p": float(2 * stats.t.sf(abs(t), df)),
        "df": df,
        "mean_diff": _mean(losses) - line["loss"],
    }


def frontier_comparison(row: str, rows: dict) -> dict | None:
    r = rows[row]
    line = frontier(rows, r["kv_bytes_per_token"])
    if line is None:
        return None
    a, b = line["rows"]
    near = a if line["weight"] >= 0.5 else b
    return {
        "row": row,
        "against": f"{a}..{b} line",
        "kind": "fixed-scheme line at equal KV bytes",
        "kv_bytes_ratio": 1.0,
        "test_ppl": _mean(r["test_ppl"]),
        "against_test_ppl": math.exp(line["loss"]),
        "params_ratio": r["params"] / rows[near]["params"],
        "flops_ratio": r["flops_per_token"] / rows[near]["flops_per_token"],
        "welch_test_loss": frontier_test(r["test_loss"], line),
    }


def verdict_line(c: dict) -> str:
    test = c["welch_test_loss"]
    diff = c["test_ppl"] - c["against_test_ppl"]
    if test is None:
        outcome = "one seed: no test"
    elif test["p"] < ALPHA:
        outcome = (
            f"{'lower' if diff < 0 else 'higher'} perplexity, significant (p = {test['p']:.3g})"
        )
    else:
        outcome = f"no significant difference (p = {test['p']:.3g})"
    return (
        f"{c['row']} vs {c['against']} ({c['kind']}; KV bytes {c['kv_bytes_ratio']:.2f}x): test "
        f"ppl {c['test_ppl']:.2f} vs {c['against_test_ppl']:.2f} ({diff:+.2f}): {outcome}; "
        f"parameters {c['params_ratio']:.3f}x, training FLOPs/token {c['flops_ratio']:.3f}x."
    )


def answer(res: dict) -> list:
    """The verdict, generated from the comparisons."""
    # at equal realised bytes: the fixed-scheme line interpolated at each budget's bytes where the
    # baselines bracket them, else the baseline of nearest bytes
    near = []
    for row in dict.fromkeys(c["row"] for c in res["comparisons"] if is_kv(c["row"])):
        mine = [c for c in res["comparisons"] if c["row"] == row]
        near += [c for c in mine if c["kind"].startswith("fixed-scheme line")][:1] or [
            c for c in mine if c["kind"] == "nearest KV bytes"
        ]
    if not near:  # (the MLA rows' lines, if any, still follow)
        return [
            "No moas_kv row and baseline to compare.",
            *[verdict_line(c) for c in res["comparisons"]],
            *mla_answer(res),
        ]
    wins = [
        c
        for c in near
        if c["welch_test_loss"]
        and c["welch_test_loss"]["p"] < ALPHA
        and c["test_ppl"] < c["against_test_ppl"]
    ]
    losses = [
        c
        for c in near
        if c["welch_test_loss"]
        and c["welch_test_loss"]["p"] < ALPHA
        and c["test_ppl"] > c["against_test_ppl"]
    ]
    equal = "GQA/MQA at equal realised KV bytes"
    if len(wins) == len(near):
        head = (
            f"Yes: every moas_kv budget reaches a significantly lower test perplexity than {equal}."
        )
    elif wins:
        head = (
            f"Partly: {len(wins)} of {len(near)} moas_kv budgets "
            f"({', '.join(c['row'] for c in wins)}) reach a significantly lower test perplexity "
            f"than {equal}."
        )
    elif losses:
        head = (
            f"No: no moas_kv budget beats {equal}, and {len(losses)} of {len(near)} are "
            f"significantly worse ({', '.join(c['row'] for c in losses)})."
        )
    else:
        head = f"No: no moas_kv budget differs significantly from {equal}."
    lines = [
        head
        + " Each budget is compared with the MHA/GQA/MQA line interpolated in log bytes at its "
        "realised "
        "bytes where two baselines bracket them, else with the baseline of nearest bytes; Welch's "
        f"t-test on the per-seed test loss, {ALPHA:.0%} level."
    ]
    off = [c for c in near if not 0.8 <= c["kv_bytes_ratio"] <= 1.25]
    if off:
        lines.append(
            "Caveat: realised bytes differ from the compared row by more than 25% for "
            + ", ".join(f"{c['row']} ({c['kv_bytes_ratio']:.2f}x {c['against']})" for c in off)
            + "."
        )
    lines += [verdict_line(c) for c in res["comparisons"]]
    return lines + mla_answer(res)


def mla_answer(res: dict) -> list:
    """One line on the MLA rows (none without them): where they sit against the fixed-scheme line at
    their realised bytes."""
    mla = [
        c
        for c in res["comparisons"]
        if is_mla(c["row"]) and c["kind"].startswith("fixed-scheme line")
    ]
    if not mla:
        return []
    said = []
    for c in mla:
        test = c["welch_test_loss"]
        if test is None or test["p"] >= ALPHA:
            said.append(f"{c['row']} on it")
        else:
            side = "below" if c["test_ppl"] < c["against_test_ppl"] else "above"
            said.append(f"{c['row']} significantly {side} it")
    # MLA trains with rotary positions, the line's rows with a learned table: the answer says so
    # where it is given, so that a reader of this line alone cannot credit the cache with the gap
    return [
        "MLA against the MHA/GQA/MQA line at equal realised KV bytes (MLA with rotary positions, "
        "the line with learned ones: not the cache alone): " + "; ".join(said) + "."
    ]


def fmt(values: list, digits: int = 2) -> str:
    return f"{_mean(values):.{digits}f} +- {_sd(values):.{digits}f}"


def shares_text(shares: dict) -> str:
    return "; ".join(
        f"{site[5:]}: " + "/".join(f"{v:.2f}" for v in choice.values())
        for site, choice in shares.items()
    )


TABLE_HEADER = (
    "row",
    "params",
    "train GFLOPs/token",
    "KV bytes/token",
    "val ppl",
    "test ppl",
    "val ppl, soft",
    "test ppl, soft",
    "fallback",
    "shares per layer (mha/gqa/mqa)",
)


def row_cells(row: str, r: dict) -> list:
    soft = [fmt(r[k]) if k in r else "" for k in ("val_ppl_soft", "test_ppl_soft")]
    return [
        row,
        f"{r['params']:,}",
        f"{r['flops_per_token'] / 1e9:.4f}",
        f"{r['kv_bytes_per_token']:.0f}",
        fmt(r["val_ppl"]),
        fmt(r["test_ppl"]),
        *soft,
        f"{r['pool_fallback_share']:.3f}",
        shares_text(r["shares"]),
    ]


def mla_note(rows: dict) -> list:
    """The MLA rows' bullet (none without them): what their cache holds, and their positions."""
    if not any(is_mla(r) for r in rows):
        return []
    return [
        (
            "- MLA rows (mla_r<rank>): the cache holds the latent and the one rotary key per token "
            "and layer (kv_lora_rank + qk_rope_head_dim values), read in the absorbed form; the "
            "bytes are realised as for the other rows. MLA's positions are rotary (its decoupled "
            "key) where the other rows learn a position table: the one setting that differs."
        )
    ]


def markdown(res: dict, meta: dict) -> str:
    rows = res["rows"]
    first = next(iter(rows.values()))
    lines = [
        "# KV cache trade-off: moas_kv against GQA/MQA at equal realised KV bytes",
        "",
        (
            f"{first['setup']} (the first row's run; configs/experiment/kv_tradeoff/): "
            f"{first['tokens_seen']:,} training tokens for every row."
        ),
        "",
        (
            f"- Command: `{meta['command']}` (`--tables-only` rebuilds these tables from the run "
            "records)"
        ),
        (
            f"- Device: {meta['device']}; torch {meta['torch']}; git {meta['git_sha']}; date "
            f"{meta['date']}"
        ),
        (
            "- Run records (metrics.jsonl, summary.json, kv_eval.json, train.log): "
            "`docs/results/runs/kv_tradeoff/<row>-seed<k>/`"
        ),
        (
            "- Perplexity: the final weights in fp32 on the full official valid and test files; "
            "moas_kv with hard routing (each token's argmax scheme, what its cache stores), soft "
            "routing as a reference."
        ),
        (
            "- KV bytes/token: realised, in a bf16 cache, over all layers: the validation text "
            "prefilled block by block into each model's own cache, its used slots per token "
            "(moas_kv: a head pool that cannot overflow). Fallback: the share of token-layers the "
            "pool sized by model.kv_pool_slack would have stored as MQA instead."
        ),
        (
            "- Shares: the hard routing's share of tokens per layer, mha/gqa/mqa (moas_dynamic: "
            "its argmax branch, though it mixes all three)."
        ),
        *mla_note(rows),
        "",
        *note_lines(meta),
        "## Answer",
        "",
        *[f"- {line}" for line in answer(res)],
        "",
        "## Table",
        "",
        *table_lines(TABLE_HEADER, [row_cells(row, r) for row, r in rows.items()], "lrrrrrrrrl"),
    ]
    seeds = ", ".join(sorted({str(len(r["seeds"])) for r in rows.values()}))
    lines += [
        "",
        (
            f"Mean +- standard deviation over seeds ({seeds} per row). Plot: kv_tradeoff.png (test "
            "perplexity against realised KV bytes per token)."
        ),
        "",
    ]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    from moa_train.metrics.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    rows = res["rows"]
    base = [b for b in BASELINES if b in rows]
    if base:
        ax.plot(
            [rows[b]["kv_bytes_per_token"] for b in base],
            [_mean(rows[b]["test_ppl"]) for b in base],
            "k--",
            lw=0.8,
            label="MHA / GQA / MQA",
        )
    for row, r in rows.items():
        marker = "o" if is_kv(row) else ("s" if row in BASELINES else "D" if is_mla(row) else "^")
        ax.errorbar(
            r["kv_bytes_per_token"],
            _mean(r["test_ppl"]),
            yerr=_sd(r["test_ppl"]),
            fmt=marker,
            capsize=3,
            label=row,
        )
    ax.set_xscale("log", base=2)
    ax.set(
        xlabel="realised KV cache bytes per token (bf16, all layers)",
        ylabel="test perplexity",
        title="WikiText-2 BPE: perplexity against KV cache size",
    )
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=120, metadata={"Software": None})
    plt.close(fig)


def main(argv=None) -> None:
    parser = DriverParser(__doc__, GROUP)
    parser.add_choices("--rows", ROWS)
    parser.add_keep_finished()
    args, runs_dir = parser.parse_checked(
        argv, lambda a: [overrides(row, 0, a.overrides) for row in a.rows]
    )
    if not args.tables_only:
        seeds = list(range(args.seeds))
        reproduce(args.rows, seeds, runs_dir, args.overrides, args.jobs, args.keep_finished)
    table = collect(runs_dir)
    if not table:
        no_records(args.runs_dir, "evaluated runs")
    res = summarise(table)
    jobs = shared_jobs(args)
    first = next(iter(res["rows"].values()))
    meta = file_meta(args, "reproduce_kv_tradeoff.py", jobs, first, jobs=jobs)
    write_results(args.out, {"meta": meta, "results": res}, markdown(res, meta))
    plot(res, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
