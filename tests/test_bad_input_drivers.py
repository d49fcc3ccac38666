"""Issue 28: the result drivers (moa_train/results/) check every argument and override before they
touch anything (one `error:` line, exit 2), build new run records beside the old ones and put them
in place only once the new set is complete, and never write tables from an empty or partial set.

The drivers run on copies of the committed records; training, evaluation and torchrun are replaced
by stand-ins that write records (or fail), so nothing here trains."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from moa_train.results import decoding, kv_tradeoff, moas_table1, multigpu, translation
from moa_train.results import run_jobs as real_run_jobs

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
STAGING = ".staging"  # where the new records wait, in the runs dir (named in the error lines)


def tree(folder: Path, skip: str = "") -> dict:
    """Every file (its bytes) and folder under `folder`, less the top-level entry `skip`."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
        if p.relative_to(folder).parts[0] != skip
    }


def committed(tmp_path: Path, name: str, tables: bool = False) -> tuple:
    """(runs dir, --out) of a copy of the committed records of `name` (and its tables)."""
    runs, out = tmp_path / "runs", tmp_path / "out" / name
    shutil.copytree(RESULTS / "runs" / name, runs)
    out.parent.mkdir()
    for suffix in (".json", ".md", ".png") if tables else ():
        if (RESULTS / name).with_suffix(suffix).is_file():
            shutil.copy((RESULTS / name).with_suffix(suffix), out.with_suffix(suffix))
    return runs, out


def stop(capsys, call) -> tuple:
    """(exit code, stderr lines) of `call()`, which must end the driver."""
    with pytest.raises(SystemExit) as stopped:
        call()
    return stopped.value.code, [line for line in capsys.readouterr().err.splitlines() if line]


def refused(capsys, call, code: int = 2) -> str:
    """The one stderr line of `call()`, which must exit with `code`."""
    got, err = stop(capsys, call)
    assert got == code and len(err) == 1 and err[0].startswith("error: "), (got, err)
    return err[0]


def one_line(code, err: list) -> str:
    """The line of a driver whose runs failed: exit 1."""
    assert code == 1 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


def cases(*pairs) -> list:
    """pytest params of (argv, the error line's start), each named by its argv."""
    return [pytest.param(argv, message, id=" ".join(argv) or "(none)") for argv, message in pairs]


def never(*args, **kwargs):
    raise AssertionError("the driver started work")


def fake_record(src: Path, run: Path) -> None:
    """A new run record at `run`: the committed one at `src` (no evaluation), marked as new."""
    skip = shutil.ignore_patterns("official_eval.json", "kv_eval.json")
    shutil.copytree(src, run, ignore=skip, dirs_exist_ok=True)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "new_record": True}))


def is_new(run: Path) -> bool:
    return json.loads((run / "summary.json").read_text()).get("new_record", False)


def run_dir(job) -> Path:
    return Path(job.cmd[-1].partition("=")[2])


# --- moas_table1 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    cases(
        (["trainer.max_step=3"], "error: trainer.max_step: Key 'max_step' not in 'TrainerConfig'"),
        (["trainer.max_steps=-3"], "error: trainer.max_steps: must be a positive integer, got -3"),
        (["--seeds", "0"], "error: --seeds: must be a positive integer, got 0"),
        (["--jobs", "0"], "error: --jobs: must be a positive integer, got 0"),
        (["--modes"], "error: --modes: expected at least one argument"),
    ),
)
def test_table1_refuses_bad_input_before_touching_the_records(
    argv, message, tmp_path, monkeypatch, capsys
):
    runs, out = committed(tmp_path, "moas_table1")
    before = tree(runs)
    for name in ("run_command", "run_jobs", "evaluate_runs"):
        monkeypatch.setattr(moas_table1, name, never)
    args = ["--modes", "faithful", "--runs-dir", str(runs), "--out", str(out), *argv]
    assert refused(capsys, lambda: moas_table1.main(args)).startswith(message)
    assert tree(runs) == before and not any(out.parent.iterdir())


def test_table1_replaces_the_old_records_only_with_a_complete_new_set(
    tmp_path, monkeypatch, capsys
):
    """A failed run leaves every old record and the tables as they were; a complete set replaces
    the rows of the mode it trained (all their seeds: the rows are remade with 2 seeds)."""
    runs, out = committed(tmp_path, "moas_table1", tables=True)
    before, tables = tree(runs), tree(out.parent)
    failing = ["fast/moas_static-seed1"]

    def fake_jobs(jobs, n):
        for job in jobs:
            if job.name in failing:
                run_dir(job).mkdir(parents=True)
                job.log.write_text("Traceback: CUDA out of memory")
            else:
                fake_record(RESULTS / "runs/moas_table1" / job.name, run_dir(job))
        return [j.name for j in jobs if j.name in failing]

    monkeypatch.setattr(moas_table1, "run_jobs", fake_jobs)
    monkeypatch.setattr(
        moas_table1,
        "official_eval",
        lambda run: json.loads(
            (
                RESULTS / "runs/moas_table1" / run.parent.name / run.name / "official_eval.json"
            ).read_text()
        ),
    )
    args = ["--modes", "fast", "--seeds", "2", "--jobs", "2", "--runs-dir", str(runs)]
    code, err = stop(capsys, lambda: moas_table1.main([*args, "--out", str(out)]))
    assert tree(runs, skip=STAGING) == before and tree(out.parent) == tables
    line = one_line(code, err)
    assert "fast/moas_static-seed1" in line and STAGING in line
    failing.clear()
    moas_table1.main([*args, "--out", str(out)])
    assert not (runs / STAGING).exists()
    assert sorted(p.name for p in (runs / "fast").iterdir()) == [
        f"{row}-seed{k}" for row in sorted(moas_table1.ROWS) for k in (0, 1)
    ]
    assert all(is_new(run) for run in (runs / "fast").iterdir())
    assert {k: v for k, v in tree(runs).items() if k.startswith("faithful")} == {
        k: v for k, v in before.items() if k.startswith("faithful")
    }
    rebuilt = json.loads(out.with_suffix(".json").read_text())["results"]
    assert rebuilt["fast"]["rows"]["mha"]["seeds"] == [0, 1]


def test_table1_tables_are_not_built_from_unevaluated_or_unfinished_records(
    tmp_path, monkeypatch, capsys
):
    runs, out = committed(tmp_path, "moas_table1")
    # a driver that did not finish left a run in the staging folder: not a record
    stray = runs / STAGING / "fast" / "mha-seed9"
    stray.parent.mkdir(parents=True)
    shutil.copytree(runs / "fast" / "mha-seed0", stray)
    moas_table1.main(["--tables-only", "--runs-dir", str(runs), "--out", str(out)])
    capsys.readouterr()
    saved = json.loads(out.with_suffix(".json").read_text())["results"]
    assert saved == json.loads((RESULTS / "moas_table1.json").read_text())["results"]
    # a record without its evaluation: refused, the tables left as they were
    tables = tree(out.parent)
    (runs / "faithful" / "mha-seed3" / "official_eval.json").unlink()
    args = ["--tables-only", "--runs-dir", str(runs), "--out", str(out)]
    line = refused(capsys, lambda: moas_table1.main(args))
    assert "mha-seed3: a run record without official_eval.json" in line
    assert tree(out.parent) == tables


def test_table1_will_not_wipe_old_records_that_an_interrupted_replacement_left_aside(
    tmp_path, monkeypatch, capsys
):
    runs, out = committed(tmp_path, "moas_table1")
    aside = runs / STAGING / ".replaced" / "fast" / "mha-seed0"
    shutil.copytree(runs / "fast" / "mha-seed0", aside)
    before = tree(runs)
    monkeypatch.setattr(moas_table1, "run_command", never)
    args = ["--modes", "fast", "--seeds", "1", "--runs-dir", str(runs), "--out", str(out)]
    line = refused(capsys, lambda: moas_table1.main(args))
    assert "holds old records that an interrupted driver was replacing" in line
    assert tree(runs) == before


@pytest.mark.parametrize(
    "driver", [moas_table1, kv_tradeoff, translation, multigpu], ids=lambda d: d.__name__
)
def test_no_tables_from_an_empty_runs_dir(driver, tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    args = ["--tables-only", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "t")]
    assert refused(capsys, lambda: driver.main(args)).startswith("error: --runs-dir: no ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


# --- kv_tradeoff ----------------------------------------------------------------------------------


def no_training(jobs, n):
    """run_jobs for the refusals: an empty job list is fine (nothing trains), anything else is
    not, and n < 1 would loop forever."""
    assert n >= 1 and not jobs, "the driver started training"
    return []


@pytest.mark.parametrize(
    "argv, message",
    cases(
        # issue 28: trained nothing and rewrote the tables with today's date and another command
        (["--seeds", "0"], "error: --seeds: must be a positive integer, got 0"),
        # issue 28: looped forever with no output
        (["--jobs", "0"], "error: --jobs: must be a positive integer, got 0"),
        (["--rows", ""], "error: --rows: got ''; give a comma list of mha, gqa4, gqa2, mqa, "),
        (["--rows", "mha", "trainer.max_stpes=5"], "error: trainer.max_stpes: Key 'max_stpes'"),
        (["--rows", "mha", "trainer.max_steps=0"], "error: trainer.max_steps: must be a positive"),
    ),
)
def test_kv_tradeoff_refuses_bad_input_before_touching_records_or_tables(
    argv, message, tmp_path, monkeypatch, capsys
):
    runs, out = committed(tmp_path, "kv_tradeoff", tables=True)
    before, tables = tree(runs), tree(out.parent)
    monkeypatch.setattr(kv_tradeoff, "prepare_data", lambda extra: None)
    monkeypatch.setattr(kv_tradeoff, "run_jobs", no_training)
    args = ["--runs-dir", str(runs), "--out", str(out), *argv]
    assert refused(capsys, lambda: kv_tradeoff.main(args)).startswith(message)
    assert tree(runs) == before and tree(out.parent) == tables


@pytest.mark.parametrize("how", ["failure", "interrupt"])
def test_kv_tradeoff_keeps_the_old_records_until_the_new_set_is_complete(
    how, tmp_path, monkeypatch, capsys
):
    """A failed or interrupted driver leaves the old records and tables; --keep-finished then
    resumes from the staged runs, and the complete set replaces the same rows and seeds only."""
    runs, out = committed(tmp_path, "kv_tradeoff", tables=True)
    before, tables = tree(runs), tree(out.parent)
    monkeypatch.setenv("RESULTS_DATE", "2026-12-02")
    monkeypatch.setattr(kv_tradeoff, "prepare_data", lambda extra: None)
    monkeypatch.setattr(
        kv_tradeoff,
        "evaluate_run",
        lambda run: json.loads(
            (RESULTS / "runs/kv_tradeoff" / run.name / "kv_eval.json").read_text()
        ),
    )
    trained, stops = [], {"kv_tradeoff/mha-seed1": how}

    def fake_jobs(jobs, n):
        for job in jobs:
            trained.append(job.name)
            if stops.get(job.name) == "interrupt":
                raise KeyboardInterrupt
            if stops.get(job.name) == "failure":
                job.log.write_text("killed")
                return [job.name]
            fake_record(RESULTS / "runs/kv_tradeoff" / run_dir(job).name, run_dir(job))
        return []

    monkeypatch.setattr(kv_tradeoff, "run_jobs", fake_jobs)
    args = ["--rows", "mha", "--seeds", "2", "--runs-dir", str(runs), "--out", str(out)]
    if how == "interrupt":
        with pytest.raises(KeyboardInterrupt):
            kv_tradeoff.main(args)
        assert tree(runs, skip=STAGING) == before and tree(out.parent) == tables
    else:
        code, err = stop(capsys, lambda: kv_tradeoff.main(args))
        assert tree(runs, skip=STAGING) == before and tree(out.parent) == tables
        line = one_line(code, err)
        assert "1 run(s) failed or did not finish: kv_tradeoff/mha-seed1" in line
        assert "--keep-finished resumes them" in line
    stops.clear()
    trained.clear()
    kv_tradeoff.main([*args, "--keep-finished"])
    assert trained == ["kv_tradeoff/mha-seed1"]  # seed 0 was staged, finished
    assert not (runs / STAGING).exists()
    assert is_new(runs / "mha-seed0") and is_new(runs / "mha-seed1")
    assert not is_new(runs / "mha-seed2") and not is_new(runs / "gqa4-seed0")
    res = json.loads(out.with_suffix(".json").read_text())["results"]
    # every committed row is still there (the study's 9 and the MLA rows added later)
    committed_rows = {p.name.rpartition("-seed")[0] for p in runs.glob("*-seed*")}
    assert len(committed_rows) >= 9
    assert res["rows"]["mha"]["seeds"] == [0, 1, 2] and set(res["rows"]) == committed_rows


def test_kv_tradeoff_tables_are_not_built_from_unevaluated_records(tmp_path, capsys):
    runs, out = committed(tmp_path, "kv_tradeoff", tables=True)
    tables = tree(out.parent)
    (runs / "gqa2-seed1" / "kv_eval.json").unlink()
    args = ["--tables-only", "--runs-dir", str(runs), "--out", str(out)]
    line = refused(capsys, lambda: kv_tradeoff.main(args))
    assert "gqa2-seed1: a run record without kv_eval.json" in line
    assert tree(out.parent) == tables


def test_run_jobs_refuses_a_pool_of_no_processes():
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        real_run_jobs([], 0)


# --- translation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    cases(
        (["--seeds", "0"], "error: --seeds: must be a positive integer, got 0"),
        (["--jobs", "0"], "error: --jobs: must be a positive integer, got 0"),
        (["--seed-list", "-1"], "error: --seed-list: got '-1'; give a comma list of seeds"),
        (["--rows", ","], "error: --rows: got ','; give a comma list of mha, moa, moa_sparse"),
        (["--part", "wmt", "--rows", "moa"], "error: --part wmt with --rows moa: no run to train"),
        (["--part", "multi30k", "trainer.max_stpes=1"], "error: trainer.max_stpes: Key"),
    ),
)
def test_translation_refuses_bad_input_before_touching_records_or_tables(
    argv, message, tmp_path, monkeypatch, capsys
):
    runs, out = committed(tmp_path, "translation", tables=True)
    before, tables = tree(runs), tree(out.parent)
    monkeypatch.setattr(translation, "run_command", never)
    monkeypatch.setattr(translation, "run_jobs", never)
    args = ["--runs-dir", str(runs), "--out", str(out), *argv]
    assert refused(capsys, lambda: translation.main(args)).startswith(message)
    assert tree(runs) == before and tree(out.parent) == tables


def test_translation_keeps_the_old_records_when_a_run_fails(tmp_path, monkeypatch, capsys):
    runs, out = committed(tmp_path, "translation", tables=True)
    before, tables = tree(runs), tree(out.parent)

    def fake_jobs(jobs, n):
        fake_record(RESULTS / "runs/translation" / jobs[0].name, run_dir(jobs[0]))
        return [jobs[1].name]

    monkeypatch.setattr(translation, "run_jobs", fake_jobs)
    args = ["--part", "multi30k", "--rows", "mha", "--seeds", "2", "--jobs", "2"]
    code, err = stop(
        capsys, lambda: translation.main([*args, "--runs-dir", str(runs), "--out", str(out)])
    )
    assert tree(runs, skip=STAGING) == before and tree(out.parent) == tables
    line = one_line(code, err)
    assert "multi30k/mha-seed1" in line and str(runs / STAGING) in line


# --- multigpu -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    cases(
        (["--gpus", "0"], "error: --gpus: must be a positive integer, got 0"),
        (["--models", "mha", "foo"], "error: --models: unknown foo; allowed: "),
        (["--models"], "error: --models: expected at least one argument"),
        (["--steps", "10"], "error: --steps: 10 logs fewer than two windows of --log-interval 10"),
        (["trainer.max_stpes=3"], "error: trainer.max_stpes: Key 'max_stpes'"),
    ),
)
def test_multigpu_refuses_bad_input_before_touching_records_or_tables(
    argv, message, tmp_path, monkeypatch, capsys
):
    runs, out = committed(tmp_path, "multigpu", tables=True)
    before, tables = tree(runs), tree(out.parent)
    monkeypatch.setattr(multigpu.subprocess, "run", never)
    args = ["--runs-dir", str(runs), "--out", str(out), *argv]
    assert refused(capsys, lambda: multigpu.main(args)).startswith(message)
    assert tree(runs) == before and tree(out.parent) == tables


def test_multigpu_keeps_the_old_records_when_a_run_fails(tmp_path, monkeypatch, capsys):
    runs, out = committed(tmp_path, "multigpu", tables=True)
    before, tables = tree(runs), tree(out.parent)
    calls = []

    def fake_torchrun(cmd, **kwargs):
        run = Path(cmd[-1].partition("=")[2])
        calls.append(run.name)
        if len(calls) == 1:
            fake_record(RESULTS / "runs/multigpu" / run.name, run)
            return subprocess.CompletedProcess(cmd, 0)
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(multigpu.subprocess, "run", fake_torchrun)
    args = ["--models", "mha", "--runs-dir", str(runs), "--out", str(out)]
    code, err = stop(capsys, lambda: multigpu.main(args))
    assert tree(runs, skip=STAGING) == before and tree(out.parent) == tables
    assert calls == ["mha-1gpu", "mha-2gpu"] and "mha-2gpu (exit 1)" in one_line(code, err)


# --- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    cases(
        (["--max-sentences", "0"], "error: --max-sentences: must be a positive integer, got 0"),
        (["--precisions", "fp16"], "error: --precisions: got 'fp16'; give a comma list of fp32"),
        (["--precisions", ""], "error: --precisions: got ''; give a comma list of fp32, bf16"),
        ([], "error: {run}: no checkpoint (checkpoints/step_*.pt)"),
    ),
)
def test_decoding_refuses_bad_input_before_writing(argv, message, tmp_path, capsys):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    out = tmp_path / "out" / "translation_decoding.json"
    args = [str(run), "--device", "cpu", "--out", str(out), *argv]
    line = refused(capsys, lambda: decoding.main(args))
    assert line.startswith(message.format(run=run)) and not out.parent.exists()
