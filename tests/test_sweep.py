"""Multiruns: a failing job is recorded while the others go on; the sweep summary lists every job;
one multirun writes one sweep folder, whatever it sweeps and whichever launcher runs its jobs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import write_blank_wikitext

ROOT = Path(__file__).resolve().parents[1]


def multirun(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m moa_train -m debug=tiny ...` in `cwd` (so the default sweep folder lands under
    cwd/outputs)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "moa_train",
            "-m",
            "debug=tiny",
            "trainer.max_steps=2",
            "trainer.eval_interval=2",
            *overrides,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def summary(sweep: Path) -> list:
    return [json.loads(line) for line in (sweep / "sweep_summary.jsonl").read_text().splitlines()]


def only_sweep_folder(cwd: Path) -> Path:
    """The one sweep folder of a debug=tiny multirun: under outputs/debug/, away from real ones."""
    multiruns = cwd / "outputs" / "debug" / "multiruns"
    folders = [p for p in multiruns.rglob("*") if (p / "multirun.yaml").is_file()]
    jobs = list(multiruns.rglob(".hydra"))
    assert not (cwd / "outputs" / "multiruns").exists()
    assert len(folders) == 1, folders
    assert all(folders[0] in job.parents for job in jobs), jobs  # every job inside it
    return folders[0]


@pytest.mark.slow
def test_failed_job_does_not_stop_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    # debug=tiny: moa_dense has 8 experts, moa 4; the up-front check takes moa_dense with each
    # top_k, so moa with top_k 5 fails at run time
    proc = multirun(ROOT, "model=moa_dense,moa", "model.top_k=2,5", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "1 of 4 jobs failed" in proc.stderr
    records = summary(sweep)
    assert len(records) == 4
    failed = [r for r in records if r["status"] == "failed"]
    overrides = failed[0]["overrides"] + " "
    assert len(failed) == 1 and "model=moa " in overrides and "model.top_k=5" in overrides
    assert "model.top_k" in failed[0]["error"]
    assert all(r["steps"] == 2 and r["val/loss"] > 0 for r in records if r["status"] == "ok")
    assert (sweep / failed[0]["job"] / "error.txt").is_file()
    assert "failed: error: model.top_k" in (sweep / "sweep_summary.md").read_text()


@pytest.mark.slow
def test_sweeping_the_model_keeps_one_sweep_folder(tmp_path):
    proc = multirun(tmp_path, "model=mha,moa")
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweep = only_sweep_folder(tmp_path)
    # named after the experiment without what the sweep varies (quickstart-${model.name}, model
    # swept)
    assert sweep.parent == tmp_path / "outputs" / "debug" / "multiruns" / "quickstart"
    assert [(r["overrides"].split()[-1], r["status"]) for r in summary(sweep)] == [
        ("model=mha", "ok"),
        ("model=moa", "ok"),
    ]


@pytest.mark.slow
def test_a_sweep_whose_jobs_all_fail_lists_them_and_exits_1(tmp_path):
    # WikiText-2 files of white space only: each job fails when it reads its data
    blank = write_blank_wikitext(tmp_path / "blank-data")
    proc = multirun(tmp_path, "model=mha,moa", f"data.root={blank}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "2 of 2 jobs failed" in proc.stderr
    sweep = only_sweep_folder(tmp_path)
    records = summary(sweep)
    assert [r["status"] for r in records] == ["failed", "failed"]
    assert (
        "\n| job | overrides | status |\n|---|---|---|\n| 0 | model=mha | failed: "
        in (sweep / "sweep_summary.md").read_text()
    )
    assert all("data split 'train' is empty" in r["error"] for r in records)


@pytest.mark.slow
def test_a_sweep_through_a_launcher_plugin_runs_each_job_in_its_own_process(tmp_path):
    # the [launchers] extra, which [dev] includes
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    blank = write_blank_wikitext(tmp_path / "blank-data")
    good = os.environ["MOA_DATA_DIR"]  # the synthetic data (conftest)
    proc = multirun(
        tmp_path,
        f"data.root={good},{blank}",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
    )
    # the job with blank data fails in its own process
    assert proc.returncode == 1, proc.stderr[-2000:]
    sweep = only_sweep_folder(tmp_path)
    records = {
        next(o for o in r["overrides"].split() if o.startswith("data.root=")): r
        for r in summary(sweep)
    }
    assert (
        records[f"data.root={good}"]["status"] == "ok"
        and records[f"data.root={good}"]["steps"] == 2
    )
    assert records[f"data.root={blank}"]["status"] == "failed"
    assert "data split 'train' is empty" in records[f"data.root={blank}"]["error"]
    # the jobs ran under submitit, not in this process
    assert list(sweep.glob(".submitit/*/*_log.out"))


def sweep_cfg(task: list, params: dict | None = None, name: str = "quickstart-${model.name}"):
    return OmegaConf.create(
        {
            "experiment_name": name,
            "model": {"name": "moas_dynamic"},
            "data": {"name": "wikitext2_char"},
            "hydra": {"overrides": {"task": task}, "sweeper": {"params": params}},
        }
    )


@pytest.mark.parametrize(
    "task, params, name, expected",
    [
        (["trainer.seed=0,1,2"], None, "quickstart-${model.name}", "quickstart-moas_dynamic"),
        (["trainer.seed=0,1,2"], None, "my__run", "my__run"),  # nothing dropped, nothing tidied
        (["model=mha,moa", "trainer.seed=0,1"], None, "quickstart-${model.name}", "quickstart"),
        (["model.name=mha,moa"], None, "${model.name}-${data.name}", "wikitext2_char"),
        # Optuna
        (
            ["trainer.seed=1"],
            {"model": "choice(mha,moa)"},
            "quickstart-${model.name}",
            "quickstart",
        ),
        (["data=a,b", "model=mha,moa"], None, "${model.name}-${data.name}", "multirun"),
        (
            ["experiment=moas_table1/mha,moas_table1/moa"],
            None,
            "quickstart-${model.name}",
            "multirun",
        ),
    ],
)
def test_sweep_folder_is_named_without_the_swept_values(task, params, name, expected):
    from moa_train.sweep import unswept_name

    assert unswept_name(sweep_cfg(task, params, name)) == expected


def test_sweep_summary_gives_the_shared_overrides_once(tmp_path):
    from moa_train.sweep import SweepSummary

    shared = ["debug=tiny", "data.root='/my data'", "trainer.max_steps=2"]
    for job, model in enumerate(("mha", "moa")):
        folder = tmp_path / str(job)
        (folder / ".hydra").mkdir(parents=True)
        OmegaConf.save(
            OmegaConf.create([*shared, f"model={model}"]), folder / ".hydra" / "overrides.yaml"
        )
    (tmp_path / "0" / "summary.json").write_text(json.dumps({"val/loss": 2.5, "steps": 2}))
    (tmp_path / "1" / "error.txt").write_text("error: model.top_k: too large\n")
    with pytest.raises(SystemExit):  # a job failed
        SweepSummary().on_multirun_end(
            OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
        )
    assert (tmp_path / "sweep_summary.md").read_text().splitlines() == [
        "Overrides of every job: `debug=tiny data.root='/my data' trainer.max_steps=2`",
        "",
        "| job | overrides | status | val/loss | steps |",
        "|---|---|---|---|---|",
        "| 0 | model=mha | ok | 2.5000 | 2 |",
        "| 1 | model=moa | failed: error: model.top_k: too large |  |  |",
    ]
    # the machine-readable summary keeps each job's whole command line
    assert [r["overrides"] for r in summary(tmp_path)] == [
        " ".join([*shared, f"model={model}"]) for model in ("mha", "moa")
    ]


def test_smoke_runs_write_under_outputs_debug(cli, tmp_path, monkeypatch):
    from moa_train.config import compose_train

    def folders(*overrides):
        hydra = compose_train(overrides, return_hydra_config=True).hydra
        return str(hydra.run.dir), str(hydra.sweep.dir)

    run, sweep = folders("model=mha")
    assert run.startswith("outputs/runs/quickstart-mha/")
    assert sweep.startswith("outputs/multiruns/quickstart-mha/")
    run, sweep = folders("model=mha", "debug=tiny")
    assert run.startswith("outputs/debug/runs/quickstart-mha/")
    assert sweep.startswith("outputs/debug/multiruns/quickstart-mha/")
    # a real smoke run, in Hydra's default folder under the cwd
    monkeypatch.chdir(tmp_path)
    assert cli("model=mha", "trainer.max_steps=2", run_dir=False)[0] == 0
    assert [p.relative_to(tmp_path).parts[:4] for p in tmp_path.rglob("summary.json")] == [
        ("outputs", "debug", "runs", "quickstart-mha")
    ]
