"""The results drivers (moa_train.results.*): where the translation runs land, that a rerun does not
count old runs, and which date (and note) a results file carries: a fresh run today's, a
`--tables-only` rebuild the committed one's. No training: the drivers' training steps are replaced
and the committed run records (or fake ones) are read."""

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest

from moa_train.results import STAGING, moas_table1, multigpu, results_meta, translation

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs/results"
MODULES = {
    "moas_table1": (moas_table1, "train"),
    "translation": (translation, "train"),
    "multigpu": (multigpu, "launch"),
}


@pytest.fixture(autouse=True)
def _no_results_env(monkeypatch):
    monkeypatch.delenv("RESULTS_DATE", raising=False)
    monkeypatch.delenv("RESULTS_NOTE", raising=False)


def copy_results(name: str, dest: Path) -> Path:
    """The committed docs/results/<name>.{md,json} (and <name>_notes.md, <name>_decoding.json)
    copied into dest; returns the --out path."""
    for path in RESULTS.glob(f"{name}*"):
        if path.is_file() and path.name in (
            f"{name}.md",
            f"{name}.json",
            f"{name}_notes.md",
            f"{name}_decoding.json",
        ):
            shutil.copy(path, dest / path.name)
    return dest / name


def fake_translation_run(run: Path, bleu: float) -> None:
    run.mkdir(parents=True)
    (run / "summary.json").write_text(
        json.dumps(
            {
                "test/bleu": bleu,
                "test/chrf": 50.0,
                "test/bleu_tok": bleu + 1,
                "val/bleu": bleu,
                "wall_s": 100.0,
                "params_total": 1000,
                "flops_per_token": 6e6,
                "device_name": "cpu",
                "torch_version": "2",
                "git_sha": "abc",
            }
        )
    )


def test_translation_runs_land_in_row_folders(tmp_path, monkeypatch):
    """Each Multi30k job's Hydra sweep folder resolves to <runs>/.staging/multi30k/<row>-seed<k>/
    (the committed layout, the row from the experiment, not model.name: moa_sparse's is moa), and
    once all have finished they replace the rows' old folders (every seed: the rows are remade)."""
    from hydra.core.hydra_config import HydraConfig

    from moa_train.config import compose_train

    for old in ("mha-seed0", "mha-seed4", "moa_sparse-seed3"):
        fake_translation_run(tmp_path / "multi30k" / old, 1.0)
    (tmp_path / "multi30k" / "mha-seed4" / "checkpoints").mkdir()
    cmds = []

    def fake_run(cmd):
        cmds.append(cmd)
        sweeps = dict(o.split("=", 1) for o in cmd[4:])
        row = sweeps["experiment"].split("/")[-1]
        old = len(list((tmp_path / "multi30k").glob(f"{row}-seed*")))
        assert old == {"mha": 2, "moa": 0, "moa_sparse": 1}[row], "old runs deleted too early"
        for seed in sweeps["trainer.seed"].split(","):
            fake_translation_run(Path(sweeps["hydra.sweep.dir"]) / f"{row}-seed{seed}", 2.0)
        return 0

    monkeypatch.setattr(translation, "run_command", fake_run)
    planned = translation.plan(["multi30k"], translation.ROWS, [0, 1, 2])
    assert translation.train(planned, tmp_path, [], 1) == []
    assert sorted(p.name for p in (tmp_path / "multi30k").iterdir()) == [
        f"{row}-seed{k}" for row in sorted(translation.ROWS) for k in (0, 1, 2)
    ]
    assert not (tmp_path / STAGING).exists()
    jobs = set()
    try:
        for cmd in cmds:
            assert cmd[1:4] == ["-m", "moa_train", "-m"]
            sweeps = dict(o.split("=", 1) for o in cmd[4:])
            for experiment in sweeps["experiment"].split(","):
                for seed in sweeps["trainer.seed"].split(","):
                    job = {**sweeps, "experiment": experiment, "trainer.seed": seed}
                    cfg = compose_train(
                        [f"{k}={v}" for k, v in job.items()], return_hydra_config=True
                    )
                    HydraConfig.instance().set_config(cfg)
                    run_dir = Path(cfg.hydra.sweep.dir) / cfg.hydra.sweep.subdir
                    row = experiment.split("/")[-1]
                    staged = tmp_path / STAGING
                    assert run_dir == staged / "multi30k" / f"{row}-seed{seed}", run_dir
                    jobs.add(str(run_dir.relative_to(staged)))
    finally:
        HydraConfig.instance().cfg = None
    assert jobs == {f"multi30k/{row}-seed{k}" for row in translation.ROWS for k in (0, 1, 2)}
    committed = json.loads((RESULTS / "translation.json").read_text())["runs"]["multi30k"]
    assert {r["run"] for recs in committed.values() for r in recs} <= jobs  # the committed layout


def test_translation_collect_counts_each_seed_once(tmp_path):
    """Runs left in the nested folders of the old sweep subdir (multi30k/multi30k/<row>-seed<k>) are
    not counted."""
    for row in translation.ROWS:
        for seed in (0, 1):
            fake_translation_run(tmp_path / "multi30k" / f"{row}-seed{seed}", 30.0 + seed)
            fake_translation_run(tmp_path / "multi30k" / "multi30k" / f"{row}-seed{seed}", 10.0)
    fake_translation_run(tmp_path / "wmt_local" / "mha-seed0", 5.0)
    rows = translation.collect(tmp_path)
    assert set(rows) == {"multi30k", "wmt_local"}
    for row in translation.ROWS:
        assert [r["seed"] for r in rows["multi30k"][row]] == [0, 1]
        assert [r["test/bleu"] for r in rows["multi30k"][row]] == [30.0, 31.0]
    block = {
        "description": {"a recipe.": ["mha"]},
        "provenance": translation.provenance(rows["multi30k"]),
        "welch": translation.significance(rows["multi30k"]),
    }
    assert "| mha | 1,000 | 1.00M | 30.50 +- 0.71 | 30.00, 31.00 |" in "\n".join(
        translation.group_table("h", rows["multi30k"], block)
    )


def test_results_meta(tmp_path, monkeypatch):
    out = tmp_path / "x"
    out.with_suffix(".json").write_text(
        json.dumps({"meta": {"date": "2000-01-01", "note": "old", "command": "c"}})
    )
    today = dt.date.today().isoformat()
    assert results_meta(out, True) == {"date": "2000-01-01", "note": "old", "command": "c"}
    assert results_meta(out, False) == {"date": today, "note": None, "command": None}
    assert results_meta(tmp_path / "missing", True) == {
        "date": today,
        "note": None,
        "command": None,
    }
    monkeypatch.setenv("RESULTS_DATE", "2001-02-03")
    monkeypatch.setenv("RESULTS_NOTE", "new")
    for tables_only in (True, False):
        assert results_meta(out, tables_only)["date"] == "2001-02-03"
        assert results_meta(out, tables_only)["note"] == "new"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_tables_only_reproduces_committed_files(name, tmp_path):
    """`--tables-only` rebuilds docs/results/<name>.{md,json} byte for byte from the committed
    records."""
    module, _ = MODULES[name]
    if not (RESULTS / "runs" / name).is_dir():
        pytest.skip(f"no committed {name} records")
    out = copy_results(name, tmp_path)
    module.main(["--tables-only", "--out", str(out)])
    for suffix in (".md", ".json"):
        assert out.with_suffix(suffix).read_bytes() == (RESULTS / f"{name}{suffix}").read_bytes(), (
            suffix
        )


def fake_step(name: str):
    """The driver's training step (MODULES) replaced: the committed records copied into the
    folder it trains into (translation's train() stands for the whole training, replacing the
    records included: it does nothing)."""
    src = RESULTS / "runs" / name

    def table1(mode, seeds, out_dir, extra) -> int:
        shutil.copytree(src / mode, out_dir / mode)
        return 0

    def multigpu(model, gpus, args, run_dir) -> int:
        shutil.copytree(src / run_dir.name, run_dir)
        return 0

    return {"moas_table1": table1, "multigpu": multigpu}.get(name, lambda *a, **k: None)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_fresh_run_gets_todays_date(name, tmp_path, monkeypatch):
    """After (here: faked) training the date is today's and translation's hand-written note is
    dropped; the committed file's date and note belong to the runs that made it."""
    module, step = MODULES[name]
    if not (RESULTS / "runs" / name).is_dir():
        pytest.skip(f"no committed {name} records")
    monkeypatch.setattr(module, step, fake_step(name))
    if name == "moas_table1":
        monkeypatch.setattr(module, "evaluate_runs", lambda *a, **k: None)
    runs = tmp_path / "runs"
    shutil.copytree(RESULTS / "runs" / name, runs)
    out = copy_results(name, tmp_path)
    committed = json.loads(out.with_suffix(".json").read_text())
    previous = committed["meta"] = {**committed["meta"], "date": "2000-01-01"}  # surely not today
    out.with_suffix(".json").write_text(json.dumps(committed))
    argv = ["--out", str(out)] + (["--gpus", "1"] if name == "multigpu" else [])
    module.main([*argv, "--runs-dir", str(runs)])
    meta = json.loads(out.with_suffix(".json").read_text())["meta"]
    assert meta["date"] == dt.date.today().isoformat()
    assert f"date {meta['date']}" in out.with_suffix(".md").read_text()
    if name == "translation":
        assert previous["note"] and meta["note"] is None
        assert previous["note"] not in out.with_suffix(".md").read_text()
    if name == "multigpu":
        assert meta["command"] == (
            f"python3 scripts/bench_multigpu.py --out {out} --gpus 1 --runs-dir {runs}"
        )
    monkeypatch.setenv("RESULTS_DATE", "2001-02-03")
    module.main(["--tables-only", "--out", str(out)])  # a rebuild keeps the (new) file's date
    monkeypatch.delenv("RESULTS_DATE")
    module.main(["--tables-only", "--out", str(out)])
    assert json.loads(out.with_suffix(".json").read_text())["meta"]["date"] == "2001-02-03"


def test_table1_rerun_starts_from_clean_row_folders(tmp_path, monkeypatch):
    """A Table 1 rerun trains into an empty staging folder (runs in old folders of the same seeds
    would resume (trainer.resume=auto) and keep their old official_eval.json), and its complete set
    then replaces all of its rows' old folders; other folders stay."""
    for old in ("mha-seed0", "moas_dynamic-seed2", "notes"):
        (tmp_path / "fast" / old).mkdir(parents=True)
    (tmp_path / "fast" / "mha-seed0" / "official_eval.json").write_text("{}")
    (tmp_path / STAGING / "fast" / "mha-seed1").mkdir(parents=True)  # an interrupted rerun's
    launched, official = [], {"official_valid/loss": 1.5, "official_test/loss": 1.6}

    def multirun(cmd):
        launched.append(cmd)
        sweep = Path(dict(o.split("=", 1) for o in cmd[4:])["hydra.sweep.dir"])
        assert not sweep.exists(), "nothing to resume"
        for row in moas_table1.ROWS:
            for seed in (0, 1):
                (sweep / f"{row}-seed{seed}").mkdir(parents=True)
                (sweep / f"{row}-seed{seed}" / "summary.json").write_text("{}")
        return 0

    monkeypatch.setattr(moas_table1, "run_command", multirun)
    monkeypatch.setattr(moas_table1, "official_eval", lambda run: official)
    moas_table1.reproduce(["fast"], 2, tmp_path, [], 1)
    assert len(launched) == 1
    assert sorted(p.name for p in (tmp_path / "fast").iterdir()) == [
        *(f"{row}-seed{k}" for row in sorted(moas_table1.ROWS) for k in (0, 1)),
        "notes",
    ]
    assert json.loads((tmp_path / "fast" / "mha-seed0" / "official_eval.json").read_text()) == (
        official
    )
    assert not (tmp_path / STAGING).exists()
