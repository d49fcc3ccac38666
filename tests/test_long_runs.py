"""Long runs and what a run folder records: trainer.max_time and early stopping stop with a
checkpoint and say why, and a resume goes on; the command of a finished run, run again, leaves its
folder as it is; eval.json records what the checkpoint was trained on and a failed evaluation leaves
no folder; W&B gets nothing at a step the run never had."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moa_train.config import ConfigError, parse_duration
from moa_train.sweep import finished, job_record
from moa_train.train.schedule import EarlyStopping

TINY = ("model=mha", "model.n_head=4")
# 20 steps, logged and validated every 5
RUN = (*TINY, "trainer.max_steps=20", "trainer.log_interval=5", "trainer.eval_interval=5")
# every validation after the first fails to improve on it by 100 nats
NO_PROGRESS = ("trainer.early_stopping.patience=2", "trainer.early_stopping.min_delta=100")


def files_of(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def losses(records: list) -> dict:
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.fixture(scope="module")
def straight(train_run, tmp_path_factory) -> list:
    """metrics.jsonl of RUN without a stop."""
    return train_run(tmp_path_factory.mktemp("straight"), *RUN)[1]


# --- trainer.max_time -----------------------------------------------------------------------------


def test_max_time_takes_seconds_or_dd_hh_mm_ss():
    assert parse_duration(None) is None
    assert parse_duration(90) == 90.0 and parse_duration(0.5) == 0.5
    assert parse_duration("5400") == 5400.0
    assert parse_duration("00:01:30:00") == 5400.0  # Lightning's DD:HH:MM:SS
    assert parse_duration("2:00:00:05") == 2 * 86400 + 5
    for bad in ("1h30m", "01:30:00", 0, -5, True, "nan", ""):
        with pytest.raises(ConfigError, match=r"^trainer\.max_time: got .* DD:HH:MM:SS"):
            parse_duration(bad)


def test_max_time_stops_with_a_checkpoint_and_a_resume_goes_on(train_run, straight, tmp_path):
    """A limit that the first step passes: the run stops after it with that step's checkpoint, no
    final test, summary.json saying why; the same command without the limit trains on to exactly
    the losses of an uninterrupted run."""
    summary, records = train_run(tmp_path, *RUN, "trainer.max_time=0.000001")
    assert summary["stop_reason"] == "max_time" and summary["steps"] == 1
    assert "trainer.max_time=1e-06 reached" in summary["stop_detail"]
    assert f"hydra.run.dir={tmp_path}" in summary["stop_detail"]  # how to go on
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["stop_reason"] == "max_time" and "test/loss" not in on_disk
    assert not [r for r in records if "test/loss" in r]
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*.pt")] == ["step_0000001.pt"]
    # what reads a run's records does not take it for finished: the sweep summary, the results
    # drivers' staging and their --keep-finished
    assert not finished(tmp_path)
    record = job_record(tmp_path)
    assert record["status"] == "failed" and "max_time" in record["error"]

    summary, records = train_run(tmp_path, *RUN)
    assert summary["stop_reason"] == "max_steps" and summary["steps"] == 20
    assert finished(tmp_path) and job_record(tmp_path)["status"] == "ok"
    assert "test/loss" in summary
    assert losses(records) == losses(straight)


# --- early stopping -------------------------------------------------------------------------------


def test_early_stopping_counts_validations_without_a_large_enough_fall():
    stopper = EarlyStopping(patience=2, min_delta=0.1)
    for step, value in [(1, 5.0), (2, 4.95), (3, 4.85), (4, 4.88)]:
        stopper.update(value, step)
        assert not stopper.done, step  # 4.85: more than 0.1 below 5.0, a new best
    stopper.update(4.8, 5)  # below 4.85, but by less than min_delta
    assert stopper.done and stopper.best == 4.85 and stopper.best_step == 3
    off = EarlyStopping(patience=None, min_delta=0.0)
    for step in range(10):
        off.update(5.0, step)
    assert off.waited == 9 and not off.done  # counted, never stopped


def test_early_stopping_stops_with_a_checkpoint_tests_and_says_why(train_run, tmp_path):
    summary, records = train_run(tmp_path, *RUN, *NO_PROGRESS)
    # validations at 5 (the best), 10 and 15 (no fall of 100 nats): stopped at 15
    assert summary["steps"] == 15 and summary["stop_reason"] == "early_stopping"
    assert "in 2 validations (trainer.early_stopping.patience=2)" in summary["stop_detail"]
    assert max(losses(records)) == 15
    assert (tmp_path / "checkpoints" / "step_0000015.pt").is_file()
    assert [r["step"] for r in records if "test/loss" in r] == [15]  # the final test ran

    # the same command again: the run is finished, its folder stays as it is
    before = files_of(tmp_path)
    assert train_run(tmp_path, *RUN, *NO_PROGRESS)[0] == summary
    assert files_of(tmp_path) == before
    # with early stopping off it trains on to trainer.max_steps
    summary, records = train_run(tmp_path, *RUN)
    assert summary["steps"] == 20 and summary["stop_reason"] == "max_steps"
    assert sorted(losses(records)) == [5, 10, 15, 20]


# --- a finished run, run again --------------------------------------------------------------------


def test_rerunning_a_finished_runs_command_changes_nothing_in_its_folder(cli, tmp_path):
    """Its summary.json, metrics.jsonl, train.log (its last line) and .hydra/ stay byte for byte;
    one line says why."""
    run = ("model=mha", "model.n_head=4", "trainer.max_steps=10")
    code, output, _ = cli(*run)
    assert code == 0, output
    before = files_of(tmp_path / "run")
    code, output, err = cli(*run)
    assert code == 0, output
    assert len(err) == 1 and "this run finished at step 10; nothing to train" in err[0], err
    assert "raise trainer.max_steps" in err[0] and "trainer.eval_only=true" in err[0]
    assert files_of(tmp_path / "run") == before
    # a raised max_steps trains on
    code, output, _ = cli("model=mha", "model.n_head=4", "trainer.max_steps=15")
    assert code == 0, output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 15


def test_a_run_stopped_in_its_final_test_is_tested_when_run_again(train_run, tmp_path):
    """summary.json of an earlier step is not the record of the newest checkpoint: the final
    evaluations still run."""
    first, _ = train_run(tmp_path, *TINY, "trainer.max_steps=10")
    train_run(tmp_path, *TINY, "trainer.max_steps=15")
    stale = dict(first)  # as if the session that trained to 15 died in its final test
    (tmp_path / "summary.json").write_text(json.dumps(stale))
    summary, records = train_run(tmp_path, *TINY, "trainer.max_steps=15")
    assert summary["steps"] == 15 and "test/loss" in summary
    assert [r["step"] for r in records if "test/loss" in r] == [15]


# --- evaluation records ---------------------------------------------------------------------------


def test_a_failed_evaluation_leaves_no_folder_and_keeps_earlier_ones(
    train_run, make_cfg, cli, tmp_path, monkeypatch
):
    from moa_train.train import eval_run
    from moa_train.train.loop import Trainer, train

    def broken(self):
        raise ConfigError("eval: broken on purpose")

    run_dir = tmp_path / "trained"
    summary, _ = train_run(run_dir, *TINY, "trainer.max_steps=5", "trainer.eval_interval=5")
    evaluate = ("trainer.eval_only=true", f"hydra.run.dir={run_dir}")
    with monkeypatch.context() as m:
        m.setattr(Trainer, "eval_only", broken)
        code, output, err = cli(*evaluate)
    assert code == 2 and err[-1] == "error: eval: broken on purpose", output
    assert not (run_dir / "eval").exists()  # not even an empty eval/

    monkeypatch.setattr(eval_run, "stamp", lambda: "good")
    code, output, _ = cli(*evaluate)
    assert code == 0, output
    good = json.loads((run_dir / "eval" / "good" / "eval.json").read_text())
    # what the evaluated checkpoint was trained on
    assert good["tokens_seen"] == summary["tokens_seen"] == 5 * 4 * 32 and good["steps"] == 5

    monkeypatch.setattr(Trainer, "eval_only", broken)
    monkeypatch.setattr(eval_run, "stamp", lambda: "bad")
    code, output, err = cli(*evaluate)
    assert code == 2 and err[-1] == "error: eval: broken on purpose", output
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == ["good"]
    assert (run_dir / "eval" / "good" / "eval.log").is_file()
    # in-process, with trainer.resume=auto: the same
    cfg = make_cfg("trainer.device=cpu", "trainer.eval_only=true", "trainer.resume=auto")
    with pytest.raises(ConfigError, match="broken on purpose"):
        train(cfg, run_dir)
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == ["good"]


# --- W&B ------------------------------------------------------------------------------------------


class FakeRun:
    """What WandbSink asks of a W&B run, recording each log's step."""

    id = "fake"

    def __init__(self):
        self.logged = []  # (step, keys)

    def log(self, data: dict, step: int | None = None) -> None:
        self.logged.append((step, sorted(data)))

    def finish(self) -> None:
        pass


def test_wandb_gets_everything_at_steps_the_run_had(train_run, tmp_path, monkeypatch):
    """The utilisation charts and heatmap of the end go to the last step (a log without a step
    went to step 6 of a 5-step run)."""
    wandb = pytest.importorskip("wandb")
    run = FakeRun()
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    train_run(tmp_path, "model=moa", "model.n_head=4", "logger=wandb", "trainer.max_steps=5")
    steps = [step for step, _ in run.logged]
    assert None not in steps and max(steps) == 5
    charts = [step for step, keys in run.logged if any(k.startswith("charts/") for k in keys)]
    assert charts and set(charts) == {5}
