"""The reproduction drivers' shared pieces: the job pool (--jobs N), replacing only the rerun seeds,
the translation driver's plan of runs and its tables (config-derived descriptions, per-group
provenance, Welch's t-tests)."""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY_CPU_RUN
from moa_train.results import STAGING, Job, old_runs, run_jobs, single_run

FAKE = """import sys, time
from pathlib import Path
out = Path(sys.argv[1])
(out / (sys.argv[2] + '.start')).write_text(repr(time.time()))
time.sleep(0.3)
print('last words of', sys.argv[2])
(out / (sys.argv[2] + '.end')).write_text(repr(time.time()))
sys.exit(int(sys.argv[3]))
"""


def test_run_jobs_runs_at_most_n_at_once_and_reports_failures(tmp_path, capsys):
    names = ["a", "b", "bad", "c", "d"]
    jobs = [
        Job(
            name,
            [sys.executable, "-c", FAKE, str(tmp_path), name, str(int(name == "bad"))],
            tmp_path / "logs" / f"{name}.log",
        )
        for name in names
    ]
    assert run_jobs(jobs, 2, poll_s=0.05) == ["bad"]
    spans = {
        n: (
            float((tmp_path / f"{n}.start").read_text()),
            float((tmp_path / f"{n}.end").read_text()),
        )
        for n in names
    }
    # how many fakes were running when each one started, from the fakes' own time stamps
    overlap = [sum(s <= start < e for s, e in spans.values()) for start, _ in spans.values()]
    assert max(overlap) == 2
    # kept on failure only
    assert sorted((tmp_path / "logs").iterdir()) == [tmp_path / "logs" / "bad.log"]
    assert "last words of bad" in (tmp_path / "logs" / "bad.log").read_text()
    err = capsys.readouterr().err
    assert "bad failed" in err and "last words of bad" in err and "last words of a" not in err


def test_old_runs_are_only_the_rows_rerun_seeds(tmp_path):
    for name in ("mha-seed0", "mha-seed1", "mha-seed2", "moa-seed2", "mha_x-seed2"):
        (tmp_path / "g" / name).mkdir(parents=True)
    assert [p.name for p in old_runs(tmp_path / "g", "mha", [2])] == ["mha-seed2"]
    assert [p.name for p in old_runs(tmp_path / "g", "mha")] == [
        "mha-seed0",
        "mha-seed1",
        "mha-seed2",
    ]


@pytest.fixture
def experiments(tmp_path, monkeypatch):
    """A config folder holding both translation groups' experiments (whatever the checkout has)."""
    from moa_train.results import translation

    for group in translation.GROUPS:
        for row in translation.ROWS:
            path = tmp_path / "configs" / "experiment" / group / f"{row}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("# @package _global_\n")
    monkeypatch.setattr(translation, "config_dir", lambda: tmp_path / "configs")
    return translation


def test_translation_jobs_are_single_runs_of_the_chosen_rows_and_seeds(
    experiments, tmp_path, monkeypatch
):
    translation = experiments
    runs, staged = tmp_path / "runs", tmp_path / "runs" / STAGING
    for name in ("mha-seed0", "mha-seed1", "mha-seed2", "mha-seed2/checkpoints"):
        (runs / "multi30k_fairseq" / name).mkdir(parents=True)
    pooled = []
    monkeypatch.setattr(
        translation, "run_jobs", lambda jobs, n: pooled.extend(jobs) or ["multi30k/mha-seed2"]
    )
    planned = translation.plan(["multi30k", "multi30k_fairseq"], ["mha"], [2])
    assert translation.train(planned, runs, ["trainer.max_steps=5"], 4, keep_other_seeds=True) == [
        "multi30k/mha-seed2"
    ]
    # a run failed: the old records stay
    assert sorted(p.name for p in (runs / "multi30k_fairseq").iterdir()) == [
        "mha-seed0",
        "mha-seed1",
        "mha-seed2",
    ]
    assert [job.name for job in pooled] == ["multi30k/mha-seed2", "multi30k_fairseq/mha-seed2"]
    job = pooled[1]
    assert job.cmd[1:] == [
        "-m",
        "moa_train",
        "trainer.seed=2",
        *translation.COMMON,
        "experiment=multi30k_fairseq/mha",
        "trainer.max_steps=5",
        f"hydra.run.dir={staged / 'multi30k_fairseq' / 'mha-seed2'}",
    ]
    assert job.log == staged / "multi30k_fairseq" / "mha-seed2.log"
    # one multirun per row with --jobs 1; once all have finished, each row's runs replace all of its
    # old records (the row is remade with seeds 0 and 1)
    for name in ("moa-seed0", "moa-seed5", "moa_sparse-seed1"):
        (runs / "multi30k" / name).mkdir(parents=True)
    commands = []

    def multirun(cmd):
        commands.append(cmd)
        sweep = Path(cmd[-2].partition("=")[2])
        for seed in (0, 1):
            run = sweep / cmd[-1].partition("=")[2].replace("${trainer.seed}", str(seed))
            run.mkdir(parents=True)
            (run / "summary.json").write_text("{}")
        return 0

    monkeypatch.setattr(translation, "run_command", multirun)
    assert (
        translation.train(
            translation.plan(["multi30k"], ["moa", "moa_sparse"], [0, 1]), runs, [], 1
        )
        == []
    )
    assert [c[3:5] for c in commands] == [["-m", "trainer.seed=0,1"]] * 2
    assert commands[1][-3:] == [
        "experiment=multi30k/moa_sparse",
        f"hydra.sweep.dir={staged / 'multi30k'}",
        "hydra.sweep.subdir=moa_sparse-seed${trainer.seed}",
    ]
    assert sorted(p.name for p in (runs / "multi30k").iterdir()) == [
        f"{row}-seed{k}" for row in ("moa", "moa_sparse") for k in (0, 1)
    ]
    assert all((run / "summary.json").is_file() for run in (runs / "multi30k").iterdir())
    assert not staged.exists()


def test_translation_refuses_a_missing_experiment_before_deleting_anything(experiments, tmp_path):
    (tmp_path / "configs/experiment/multi30k_fairseq/moa.yaml").unlink()
    (tmp_path / "runs/multi30k_fairseq/mha-seed0").mkdir(parents=True)
    with pytest.raises(SystemExit, match="experiment=multi30k_fairseq/moa: no such experiment"):
        experiments.train(
            experiments.plan(["multi30k_fairseq"], ["mha", "moa"], [0]), tmp_path / "runs", [], 2
        )
    assert (tmp_path / "runs/multi30k_fairseq/mha-seed0").is_dir()


def test_table1_jobs_match_the_multirun(tmp_path):
    from moa_train.results import moas_table1

    (tmp_path / "fast" / "mha-seed0").mkdir(parents=True)
    jobs = moas_table1.jobs("fast", 2, tmp_path, ["trainer.max_steps=3"])
    assert (tmp_path / "fast" / "mha-seed0").is_dir()  # nothing is deleted before the runs finish
    assert [j.name for j in jobs] == [f"fast/{r}-seed{s}" for r in moas_table1.ROWS for s in (0, 1)]
    assert jobs[1].cmd[1:] == [
        "-m",
        "moa_train",
        "experiment=moas_table1/mha",
        "mode=fast",
        "trainer.seed=1",
        "trainer.save_interval=500",
        "trainer.max_steps=3",
        f"hydra.run.dir={tmp_path / 'fast' / 'mha-seed1'}",
    ]


def test_single_run_keeps_a_repeated_key_once_like_the_sweeper(tmp_path):
    cmd = single_run(["a=1", "b=2", "+c=3", "a=4"], tmp_path)
    assert cmd[3:] == ["a=4", "b=2", "+c=3", f"hydra.run.dir={tmp_path}"]


def fake_run(
    root: Path, group: str, row: str, seed: int, bleu: float, sha: str, post_ln: bool
) -> None:
    run = root / group / f"{row}-seed{seed}"
    (run / ".hydra").mkdir(parents=True)
    config = {
        "model": {
            "name": row,
            "n_layer": 6 if post_ln else 3,
            "n_encoder_layer": 6 if post_ln else 3,
            "d_model": 512 if post_ln else 256,
            "mlp_ratio": 4.0,
            "norm_first": not post_ln,
        },
        "trainer": {"max_steps": 5000 if post_ln else 3000, "precision": "bf16"},
    }
    if post_ln:  # the current layout (config_format 2): translation's keys under task
        config["config_format"] = 2
        config["data"] = {"name": "wmt14_en_de", "tasks": ["translation"]}
        config["task"] = {"name": "translation", "max_tokens": 4096, "label_smoothing": 0.1}
    else:  # format 1, as the 2026-12-01 records: in data and trainer, the task unresolved
        config["data"] = {
            "name": "multi30k_en_de",
            "task": "translation",
            "max_tokens": 8192,
            "root": "${oc.env:MOA_DATA_DIR,null}",
        }
        config["task"] = {"name": "${data.task}"}
        config["trainer"]["label_smoothing"] = 0.1
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {
        "params_total": 1000 + len(row),
        "flops_per_token": 6e6,
        "test/bleu": bleu,
        "test/chrf": 50.0,
        "test/bleu_tok": bleu + 0.5 * seed,
        "val/bleu": bleu - 1,
        "wall_s": 100.0 + seed,
        "device_name": "GPU A" if seed < 2 else "GPU B",
        "torch_version": "2.11",
        "git_sha": sha,
        "bleu_signature": "sig",
    }
    (run / "summary.json").write_text(json.dumps(summary))


def test_translation_tables_per_group_from_fake_records(tmp_path):
    from scipy import stats

    from moa_train.results import translation

    runs, bleu = (
        tmp_path / "runs",
        {"mha": [30.0, 30.4, 29.8], "moa": [31.0, 31.3, 30.9], "moa_sparse": [30.1, 29.5]},
    )
    for row, scores in bleu.items():
        for seed, score in enumerate(scores):
            fake_run(runs, "multi30k", row, seed, score, "aaa", post_ln=False)
            fake_run(
                runs,
                "multi30k_fairseq",
                row,
                seed,
                score - 5,
                "bbb" if seed else "ccc",
                post_ln=True,
            )
    out = tmp_path / "out" / "translation"
    translation.main(["--tables-only", "--runs-dir", str(runs), "--out", str(out)])
    text, saved = (
        out.with_suffix(".md").read_text(),
        json.loads(out.with_suffix(".json").read_text()),
    )
    modern = text.index("## Multi30k En->De, modern recipe")
    fairseq = text.index(
        "## Multi30k En->De, fairseq-faithful model and loss (the MoA code's recipe scaled to "
        "Multi30k)"
    )
    assert (
        "3+3 layers, d 256, FFN 1024, pre-LN, 3000 updates of 8192 tokens, label smoothing 0.1, "
        "bf16." in text[modern:fairseq]
    )
    assert (
        "6+6 layers, d 512, FFN 2048, post-LN, 5000 updates of 4096 tokens, label smoothing 0.1, "
        "bf16." in text[fairseq:]
    )
    assert "Device: GPU A, GPU B; torch 2.11; git aaa." in text[modern:fairseq]
    assert "Device: GPU A, GPU B; torch 2.11; git ccc, bbb." in text[fairseq:]
    for group, shift in (("multi30k", 0.0), ("multi30k_fairseq", -5.0)):
        for metric, unit in (("test/bleu", "BLEU"), ("test/bleu_tok", "BLEU (tok.)")):
            for row in ("moa", "moa_sparse"):
                a = [
                    b + shift + (0.5 * s if metric == "test/bleu_tok" else 0)
                    for s, b in enumerate(bleu[row])
                ]
                b = [
                    v + shift + (0.5 * s if metric == "test/bleu_tok" else 0)
                    for s, v in enumerate(bleu["mha"])
                ]
                t, p = stats.ttest_ind(a, b, equal_var=False)
                test = saved["groups"][group]["welch"][metric][f"{row}_vs_mha"]
                assert test["t"] == pytest.approx(t) and test["p"] == pytest.approx(p)
                assert test["n"] == [len(a), 3]
                verdict = "significant" if p < 0.05 else "not significant"
                assert (
                    f"{row} - mha = {sum(a) / len(a) - sum(b) / 3:+.2f} {unit}, t = {t:.2f}, p = "
                    f"{p:.3f} (n = {len(a)} vs 3 seeds): {verdict} at 0.05."
                ) in text
    moa = saved["groups"]["multi30k"]["welch"]["test/bleu"]["moa_vs_mha"]
    # the example's moa is clearly better
    assert moa["p"] < 0.05 and "moa - mha = +1.00 BLEU" in text
    assert saved["groups"]["multi30k_fairseq"]["provenance"]["git_sha"] == "ccc, bbb"


def test_kv_tradeoff_driver_trains_evaluates_and_rebuilds_its_tables(tmp_path, monkeypatch):
    """scripts/reproduce_kv_tradeoff.py at a tiny size on CPU: runs, kv_eval.json per run (hard and
    soft perplexity, realised KV bytes, shares), tables with the Welch comparisons, and
    `--tables-only` rebuilding them byte for byte."""
    from moa_train.results import kv_tradeoff

    monkeypatch.setenv("RESULTS_DATE", "2026-12-02")
    runs, out = tmp_path / "runs", tmp_path / "out" / "kv_tradeoff"
    tiny = [
        *TINY_CPU_RUN,
        "trainer.max_steps=8",
        "trainer.eval_interval=8",
        "data.vocab_size=300",
    ]
    kv_tradeoff.main(
        [
            "--rows",
            "mha,moas_kv_b2,gqa2_pm",
            "--seeds",
            "2",
            "--jobs",
            "2",
            "--runs-dir",
            str(runs),
            "--out",
            str(out),
            *tiny,
        ]
    )
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == [
        f"{row}-seed{k}" for row in ("gqa2_pm", "mha", "moas_kv_b2") for k in (0, 1)
    ]
    for run in runs.iterdir():
        assert not (run / "checkpoints").exists() and not (run / "tokenizer.json").exists()
        assert (run / "metrics.jsonl").is_file() and (run / "train.log").is_file()
    kv = json.loads((runs / "moas_kv_b2-seed0" / "kv_eval.json").read_text())
    assert {
        "val/ppl",
        "test/ppl",
        "val/ppl_soft",
        "test/ppl_soft",
        "kv_bytes_per_token",
        "pool_fallback_share",
    } <= set(kv)
    assert set(kv["shares"]) == {"layer0", "layer1"} and sum(
        kv["shares"]["layer0"].values()
    ) == pytest.approx(1.0)
    # 2 layers x stored heads x head_dim 8 x 2 (K, V) x 2 bytes: between MQA's and MHA's
    assert 2 * 1 * 8 * 2 * 2 <= kv["kv_bytes_per_token"] <= 2 * 4 * 8 * 2 * 2
    mha = json.loads((runs / "mha-seed0" / "kv_eval.json").read_text())
    assert mha["kv_bytes_per_token"] == 2 * 4 * 8 * 2 * 2 and "val/ppl_soft" not in mha
    res = json.loads(out.with_suffix(".json").read_text())["results"]
    kinds = {(c["row"], c["against"]) for c in res["comparisons"]}
    assert kinds == {("moas_kv_b2", "mha"), ("moas_kv_b2", "gqa2_pm")}
    assert all(c["welch_test_loss"] is not None for c in res["comparisons"])
    md = out.with_suffix(".md").read_text()
    assert "## Answer" in md and "moas_kv_b2 vs mha" in md and out.with_suffix(".png").is_file()
    before = {s: out.with_suffix(s).read_bytes() for s in (".md", ".json")}
    kv_tradeoff.main(["--tables-only", "--runs-dir", str(runs), "--out", str(out)])
    assert {s: out.with_suffix(s).read_bytes() for s in (".md", ".json")} == before
    # run again after a time limit: the runs that finished in the staging folder are kept (no job),
    # an unfinished one resumes
    staged = runs / STAGING
    shutil.copytree(runs / "mha-seed0", staged / "mha-seed0")
    (staged / "mha-seed1").mkdir()
    resumed = kv_tradeoff.jobs(["mha"], [0, 1], runs, [], keep_finished=True)
    assert [job.name for job in resumed] == ["kv_tradeoff/mha-seed1"]
    assert (staged / "mha-seed1").is_dir()
    # the staged set complete (and evaluated): it replaces the old records without training
    shutil.rmtree(staged / "mha-seed1")
    shutil.copytree(runs / "mha-seed1", staged / "mha-seed1")
    kv_tradeoff.main(
        [
            "--rows",
            "mha",
            "--seeds",
            "2",
            "--jobs",
            "2",
            "--keep-finished",
            "--runs-dir",
            str(runs),
            "--out",
            str(out),
            *tiny,
        ]
    )
    assert {s: out.with_suffix(s).read_bytes() for s in (".md", ".json")} == before
    assert not staged.exists()


def test_kv_tradeoff_adds_the_mla_rows_to_the_records_without_touching_the_others(
    tmp_path, monkeypatch
):
    """`--rows mla_r64` trains and evaluates only the MLA row into a runs dir that holds the other
    rows' records: those stay byte for byte, the MLA runs join them, and the tables include MLA
    (its realised bytes = the latent + the rotary key per token-layer, its comparison with the
    MHA/GQA/MQA line at equal bytes, the answer's MLA line)."""
    from moa_train.results import kv_tradeoff

    monkeypatch.setenv("RESULTS_DATE", "2026-12-06")
    runs, out = tmp_path / "runs", tmp_path / "out" / "kv_tradeoff"
    tiny = [
        *TINY_CPU_RUN,
        "model.d_model=128",
        "trainer.max_steps=4",
        "trainer.eval_interval=4",
        "data.vocab_size=300",
    ]
    common = ["--seeds", "2", "--jobs", "2", "--runs-dir", str(runs), "--out", str(out)]
    kv_tradeoff.main(["--rows", "mha,mqa", *common, *tiny])
    before = {p: p.read_bytes() for p in sorted(runs.rglob("*")) if p.is_file()}
    kv_tradeoff.main(["--rows", "mla_r64", *common, *tiny])
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == [
        f"{row}-seed{k}" for row in ("mha", "mla_r64", "mqa") for k in (0, 1)
    ]
    kv = json.loads((runs / "mla_r64-seed0" / "kv_eval.json").read_text())
    # the rank-64 latent + the 16-channel rotary key: 2 layers x 80 values x 2 bytes = 320, between
    # MQA's 2 x 2 x 32 x 2 = 256 and MHA's 1024 at d_model 128
    assert kv["kv_bytes_per_token"] == 2 * (64 + 16) * 2 and kv["fallback_share"] == 0
    res = json.loads(out.with_suffix(".json").read_text())["results"]
    assert list(res["rows"]) == ["mha", "mqa", "mla_r64"]
    line = [c for c in res["comparisons"] if c["row"] == "mla_r64"]
    assert [c["against"] for c in line] == ["mqa..mha line"]
    md = out.with_suffix(".md").read_text()
    assert "- MLA rows (mla_r<rank>)" in md and "MLA against the MHA/GQA/MQA line" in md
    assert "No moas_kv row and baseline to compare." in md  # the moas_kv answer as before
    tables = {s: out.with_suffix(s).read_bytes() for s in (".md", ".json")}
    kv_tradeoff.main(["--tables-only", "--runs-dir", str(runs), "--out", str(out)])
    assert {s: out.with_suffix(s).read_bytes() for s in (".md", ".json")} == tables


def test_kv_tradeoff_compares_each_budget_with_the_fixed_scheme_line_at_equal_bytes():
    """The answer compares a moas_kv row with the MHA/GQA/MQA line interpolated in log bytes at its
    realised bytes (Welch-Satterthwaite over both bracketing rows' seeds), and with the nearest row
    when no two rows bracket it."""
    from moa_train.results import kv_tradeoff

    def row(kv_bytes, losses, params=100):
        return {
            "kv_bytes_per_token": kv_bytes,
            "test_loss": losses,
            "test_ppl": [math.exp(x) for x in losses],
            "params": params,
            "flops_per_token": 10,
        }

    rows = {
        "mqa": row(1000, [3.00, 3.02, 3.04]),
        "gqa2": row(4000, [2.80, 2.82, 2.84]),
        "moas_kv_b1p5": row(2000, [2.80, 2.81, 2.82], 101),
        "moas_kv_b4": row(8000, [2.90, 2.95, 3.00]),
    }
    line = kv_tradeoff.frontier(rows, 2000)
    # log 2000: halfway in log bytes
    assert line["rows"] == ("mqa", "gqa2") and line["weight"] == pytest.approx(0.5)
    assert line["loss"] == pytest.approx(2.92)
    assert kv_tradeoff.frontier(rows, 8000) is None  # past the largest baseline: no extrapolation
    comps = kv_tradeoff.comparisons(rows)
    b1p5 = [c for c in comps if c["row"] == "moas_kv_b1p5"]
    assert [c["kind"] for c in b1p5] == ["fixed-scheme line at equal KV bytes", "nearest KV bytes"]
    test = b1p5[0]["welch_test_loss"]
    assert test["mean_diff"] == pytest.approx(-0.11) and test["p"] < 0.01 and 2 <= test["df"] <= 6
    # against the nearer end of the line (a tie: mqa)
    assert b1p5[0]["params_ratio"] == pytest.approx(1.01)
    b4 = [c for c in comps if c["row"] == "moas_kv_b4"]
    assert [(c["kind"], c["against"]) for c in b4] == [("nearest KV bytes", "gqa2")]
    lines = kv_tradeoff.answer({"rows": rows, "comparisons": comps})
    # b1p5 beats the line; b4 (nearest: gqa2, 2x its bytes) is worse: partly, with the caveat on the
    # bytes
    assert lines[0].startswith("Partly: 1 of 2 moas_kv budgets (moas_kv_b1p5)")
    assert any(line.startswith("Caveat") and "moas_kv_b4 (2.00x gqa2)" in line for line in lines)
