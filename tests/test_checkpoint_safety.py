"""Checkpoints and resume under hostile files and faults: nothing runs on load, nothing good is
deleted, nothing non-finite is offered, changed settings are honoured or refused, each step is
logged once, readers fall back."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, read_jsonl
from moa_train.api import load_run
from moa_train.config import ConfigError
from moa_train.train import checkpoint as ckpt
from moa_train.train.checkpoint import CheckpointError, file_sha256, load_checkpoint, sidecar
from moa_train.train.guard import DivergedError
from moa_train.train.loop import Trainer, train

TINY = ("model=mha", "model.n_head=4")
FIVE = (*TINY, "trainer.max_steps=5", "trainer.eval_interval=5", "trainer.log_interval=1")
TEN = (
    *TINY,
    "trainer.max_steps=10",
    "trainer.eval_interval=5",
    "trainer.log_interval=1",
    "trainer.keep_checkpoints=2",
)


def steps(records: list) -> list:
    return [r["step"] for r in records if "train/loss" in r]


class Payload:
    """Unpickling this creates `marker`: the proof that loading ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_with_sidecar(state: dict, path) -> None:
    # a new file, as a writer replaces one: best.pt, a second name of the old one, keeps its bytes
    path.unlink()
    torch.save(state, path)
    # a recomputed sidecar hides nothing
    sidecar(path).write_text(f"{file_sha256(path)}  {path.name}\n")


# --- nothing runs on load -------------------------------------------------------------------------


def test_pickle_payload_is_refused_and_never_runs(train_run, tmp_path):
    run = tmp_path / "run"
    train_run(run, *FIVE)
    marker = tmp_path / "payload-ran"
    path = run / "checkpoints" / "step_0000005.pt"
    state = load_checkpoint(path)
    write_with_sidecar({**state, "config": {**state["config"], "x": Payload(marker)}}, path)
    for load in (lambda: load_checkpoint(path), lambda: load_run(run)):
        with pytest.raises(CheckpointError, match=r"is refused: it names io\.open") as refused:
            load()
        assert "\n" not in str(refused.value)
        assert "--trust-pickle" not in str(refused.value)  # no advice to run it
    # a resume (auto) finds it and refuses it too
    with pytest.raises(CheckpointError, match=r"it names io\.open"):
        train_run(run, *TINY, "trainer.max_steps=10")
    assert not marker.exists()


def old_format(path) -> None:
    """Rewrite a checkpoint as moa_train wrote them before weights_only loading: NumPy's RNG state
    as an array."""
    state = load_checkpoint(path)
    state["rng"]["numpy"] = np.random.get_state()
    write_with_sidecar(state, path)


def test_old_checkpoint_is_refused_then_converted_with_the_trust_flag(train_run, tmp_path):
    run = tmp_path / "run"
    train_run(run, *FIVE)
    path = run / "checkpoints" / "step_0000005.pt"
    old_format(path)
    with pytest.raises(CheckpointError, match=r"convert .* --trust-pickle"):
        load_checkpoint(path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "moa_train.train.checkpoint", "convert", str(run)]
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and refused.stderr.startswith("error: --trust-pickle"), (
        refused.stderr
    )
    with pytest.raises(CheckpointError, match="--trust-pickle"):  # untouched without the flag
        load_checkpoint(path)
    done = subprocess.run(
        [*command, "--trust-pickle"], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(path)["step"] == 5
    _, records = train_run(run, *TINY, "trainer.max_steps=7", "trainer.log_interval=1")
    assert steps(records) == list(range(1, 8))


def test_rng_state_round_trips_through_a_safe_load(tmp_path):
    np.random.seed(3)
    state = ckpt.rng_state()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    expected = np.random.rand(4)
    ckpt.set_rng_state(torch.load(buffer, weights_only=True))
    assert np.array_equal(np.random.rand(4), expected)


# --- nothing good is deleted; readers fall back ---------------------------------------------------


def test_damaged_sidecar_keeps_its_checkpoint(train_run, tmp_path, caplog):
    _, _ = train_run(tmp_path, *TEN)
    path = tmp_path / "checkpoints" / "step_0000010.pt"
    data = path.read_bytes()
    sidecar(path).write_text("garbage\n")
    with caplog.at_level(logging.WARNING):
        assert load_run(tmp_path)[0] is not None  # the reader takes step 5
        _, records = train_run(
            tmp_path,
            *TINY,
            "trainer.max_steps=12",
            "trainer.eval_interval=5",
            "trainer.log_interval=1",
            "trainer.keep_checkpoints=2",
        )
    assert "sidecar step_0000010.pt.sha256 is damaged" in caplog.text
    kept = tmp_path / "checkpoints" / "step_0000010.pt.failed"
    assert kept.read_bytes() == data  # set aside, not deleted
    assert steps(records) == list(range(1, 13))


def test_load_run_falls_back_past_a_damaged_checkpoint(train_run, tmp_path, caplog):
    train_run(tmp_path, *TEN)
    folder = tmp_path / "checkpoints"
    expected = load_checkpoint(folder / "step_0000005.pt")["model"]
    latest = folder / "step_0000010.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        model, _ = load_run(tmp_path)
    assert "step_0000010.pt is damaged" in caplog.text
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert latest.is_file()  # a reader changes nothing


# --- nothing non-finite is offered ----------------------------------------------------------------


def test_non_finite_weights_are_never_checkpointed(train_run, make_cfg, tmp_path):
    train_run(tmp_path, *FIVE)
    good = tmp_path / "checkpoints" / "step_0000005.pt"
    # not validated: as if a check were missing
    cfg = make_cfg("trainer.device=cpu", *TEN, "optim.lr=inf")
    with pytest.raises(
        DivergedError, match=rf"not finite at step 10.*last good checkpoint is {good}"
    ):
        train(cfg, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.pt")) == [
        "step_0000005.pt"
    ]
    fresh = tmp_path / "fresh"
    with pytest.raises(DivergedError, match=r"not finite at step 5.*last good checkpoint is none"):
        train(make_cfg("trainer.device=cpu", *FIVE, "optim.lr=inf"), fresh)
    assert not list(fresh.rglob("*.pt"))


# --- changed settings on resume -------------------------------------------------------------------


def test_resume_honours_a_new_lr_and_schedule(train_run, make_cfg, tmp_path):
    train_run(tmp_path, *FIVE, "optim.lr=0.001")
    trainer = Trainer(
        make_cfg(
            "trainer.device=cpu",
            *TEN,
            "optim.lr=0.002",
            "optim.weight_decay=0.05",
            "schedule=cosine",
            "schedule.warmup_steps=0",
        ),
        tmp_path,
    )
    trainer.maybe_resume()
    decay = next(g for g in trainer.optimizer.param_groups if g["name"] == "decay")
    factor = trainer.scheduler.lr_lambdas[0](5)  # cosine at step 5 of 10
    assert factor < 1
    assert decay["lr"] == pytest.approx(0.002 * factor) and decay["weight_decay"] == 0.05
    trainer.scheduler.step()
    assert decay["lr"] == pytest.approx(0.002 * trainer.scheduler.lr_lambdas[0](6))


def test_resume_refuses_a_changed_architecture_or_data(train_run, tmp_path):
    train_run(tmp_path, *FIVE)
    for override, words in (
        ("model.dropout=0.3", r"model.dropout is 0\.\d+ in the checkpoint but 0.3 now"),
        ("data.split=moas_paper", "data.split is 'official' in the checkpoint but 'moas_paper'"),
    ):
        with pytest.raises(ConfigError, match=words):
            train_run(tmp_path, *TINY, "trainer.max_steps=10", override)
    assert steps(read_jsonl(tmp_path / "metrics.jsonl")) == [1, 2, 3, 4, 5]


# --- each step once -------------------------------------------------------------------------------


def test_run_killed_before_its_first_checkpoint_logs_each_step_once(
    train_run, tmp_path, monkeypatch
):
    def killed(*args, **kwargs):
        # a kill during the first save: the steps before it are logged, no checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr("moa_train.train.schedule.save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train_run(tmp_path, *FIVE)
    assert steps(read_jsonl(tmp_path / "metrics.jsonl")) == [1, 2, 3, 4, 5]
    monkeypatch.undo()
    _, records = train_run(tmp_path, *FIVE)
    assert steps(records) == [1, 2, 3, 4, 5]


def test_partial_last_metrics_line_is_dropped_on_resume(train_run, tmp_path):
    train_run(tmp_path, *FIVE)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')  # a full disk or a kill mid-line
    _, records = train_run(tmp_path, *TINY, "trainer.max_steps=7", "trainer.log_interval=1")
    assert steps(records) == list(range(1, 8))


def test_folder_with_only_best_pt_resumes_from_it(train_run, tmp_path, caplog):
    train_run(tmp_path, *FIVE)
    (tmp_path / "checkpoints" / "step_0000005.pt").unlink()  # best.pt is its second name
    with caplog.at_level(logging.INFO):
        _, records = train_run(tmp_path, *TINY, "trainer.max_steps=7", "trainer.log_interval=1")
    assert "best.pt at step 5" in caplog.text
    assert steps(records) == list(range(1, 8))


def test_temp_files_of_an_interrupted_save_are_removed(train_run, tmp_path):
    train_run(tmp_path, *FIVE)
    stale = tmp_path / "checkpoints" / ".step_0000010.pt.4242.tmp"
    stale.write_bytes(b"x" * 1000)
    train_run(tmp_path, *TINY, "trainer.max_steps=6")
    assert not stale.exists()


def test_readers_take_no_lock(train_run, tmp_path):
    train_run(tmp_path, *FIVE)
    # a trainer holds the folder
    (tmp_path / "train.lock").write_text('{"pid": 1, "host": "elsewhere"}\n')
    assert load_run(tmp_path)[1].trainer.max_steps == 5


def test_no_readable_checkpoint_names_load_run(train_run, tmp_path):
    train_run(tmp_path, *FIVE)
    for path in (tmp_path / "checkpoints").glob("*.pt"):
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="load_run: no readable checkpoint"):
        load_run(tmp_path)


def test_trainer_takes_the_run_folder_lock(train_run, tmp_path):
    import json
    import socket

    lock = tmp_path / "train.lock"
    # alive: our parent
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(
        ConfigError, match=f"in use by process {os.getppid()} on host {socket.gethostname()}"
    ):
        train_run(tmp_path, *FIVE)
    # cannot be judged from here
    lock.write_text(json.dumps({"pid": 12345, "host": "another-host"}))
    with pytest.raises(ConfigError, match="in use by process 12345 on host another-host"):
        train_run(tmp_path, *FIVE)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()
    lock.unlink()
    train_run(tmp_path, *FIVE)
    assert not lock.exists()  # released at the end
