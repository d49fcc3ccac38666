"""`trainer.eval_only` from the command line: the run's own config (from its checkpoint) without the
training overrides repeated, results in RUN/eval/<date_time>/, the run's own files untouched, no
other folder made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# a moa run whose shape differs from debug=tiny's defaults (4 experts, k 2): only its own config
# loads its weights
RUN = (
    "model=moa",
    "model.n_head=4",
    "model.n_experts=6",
    "model.top_k=3",
    "trainer.max_steps=10",
    "trainer.eval_interval=10",
)


@pytest.fixture(scope="module")
def moa_run(train_run, tmp_path_factory) -> tuple:
    run_dir = tmp_path_factory.mktemp("moa_run")
    summary, _ = train_run(run_dir, *RUN)
    return run_dir, summary


def files_of(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_eval_only_evaluates_with_the_runs_own_config_into_its_eval_folder(
    moa_run, cli, tmp_path, monkeypatch
):
    run_dir, summary = moa_run
    before = files_of(run_dir)
    monkeypatch.chdir(tmp_path)  # Hydra's default run folders would appear here
    code, output, _ = cli("trainer.eval_only=true", f"trainer.resume={run_dir}", run_dir=False)
    assert code == 0, output
    (folder,) = (run_dir / "eval").iterdir()
    result = json.loads((folder / "eval.json").read_text())
    # the final evaluation of the run used the same weights (step 10) and the same fixed evaluation
    # windows
    for key in ("val/loss", "test/loss"):
        assert result[key] == pytest.approx(summary[key], abs=1e-6), key
    assert result["steps"] == 10 and result["checkpoint"].endswith("step_0000010.pt")
    assert (folder / "eval.log").is_file() and (folder / ".hydra" / "overrides.yaml").is_file()
    after = files_of(run_dir)
    # summary.json etc. untouched
    assert {k: v for k, v in after.items() if k.parts[0] != "eval"} == before
    assert not list(tmp_path.rglob("outputs"))  # no stray run folder


def test_eval_only_with_resume_auto_reads_the_run_folder_given(moa_run, cli, tmp_path):
    run_dir, summary = moa_run
    code, output, _ = cli("trainer.eval_only=true", f"hydra.run.dir={run_dir}")
    assert code == 0, output
    results = [json.loads(p.read_text()) for p in (run_dir / "eval").glob("*/eval.json")]
    assert results and all(
        r["val/loss"] == pytest.approx(summary["val/loss"], abs=1e-6) for r in results
    )


def test_eval_only_refuses_another_model_in_one_line(moa_run, cli, tmp_path, monkeypatch):
    run_dir, _ = moa_run
    monkeypatch.chdir(tmp_path)
    evals = sorted((run_dir / "eval").glob("*")) if (run_dir / "eval").is_dir() else []
    code, output, err = cli(
        "trainer.eval_only=true", f"trainer.resume={run_dir}", "model=gqa", run_dir=False
    )
    assert code == 2 and "Traceback" not in output, output
    assert (
        len(err) == 1
        and err[0].startswith("error: model.name:")
        and "'moa'" in err[0]
        and "'gqa'" in err[0]
    )
    now = sorted((run_dir / "eval").glob("*")) if (run_dir / "eval").is_dir() else []
    assert now == evals and not list(tmp_path.rglob("outputs"))  # nothing created


def test_eval_config_takes_evaluation_overrides_and_the_runs_training_settings(moa_run, make_cfg):
    from moa_train.train.checkpoint import find_checkpoint, load_checkpoint
    from moa_train.train.eval_run import eval_config

    run_dir, _ = moa_run
    run_cfg = load_checkpoint(find_checkpoint(run_dir))["config"]
    overrides = [
        "trainer.eval_iters=1",
        "task.average_last=2",
        "trainer.max_steps=7",
        "trainer.eval_only=true",
    ]
    cfg = make_cfg(*overrides, "trainer.device=cpu", f"trainer.resume={run_dir}")
    out = eval_config(cfg, run_cfg, overrides)
    # evaluation settings: the command line's
    assert out.trainer.eval_iters == 1 and out.task.average_last == 2
    assert out.trainer.max_steps == 10  # training settings: the run's
    assert out.model.n_experts == 6 and out.model.top_k == 3 and out.model.name == "moa"
    assert out.trainer.device == "cpu" and out.trainer.eval_only
