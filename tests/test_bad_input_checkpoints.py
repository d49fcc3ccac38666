"""Checkpoints that must stop a run in one line and stay as they are: a damaged file is never
converted into a verified one, a pickled file is refused naming the global it holds (the convert
command only for the old format's NumPy objects), a payload of a blocked module stops a resume
with no fallback; a divergence names only a sane checkpoint as its recovery point; a trainer
refused at the run folder's lock or for a changed model writes nothing into the folder."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from conftest import read_jsonl
from moa_train.api import load_run
from moa_train.train.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    convert_main,
    file_sha256,
    load_checkpoint,
    sidecar,
)
from moa_train.train.guard import MAX_SANE_WEIGHT, DivergedError, sane
from moa_train.train.loop import train

TINY = ("model=mha", "model.n_head=4", "trainer.eval_interval=5", "trainer.log_interval=1")
FIVE = (*TINY, "trainer.max_steps=5")
TEN = (*TINY, "trainer.max_steps=10", "trainer.keep_checkpoints=2")


class Opens:
    """Unpickling this creates `marker` (io.open): the proof that loading ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class Shell:
    """Unpickling this runs a shell command (os.system: posix.system, a module torch blocks)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def rewrite(path, change) -> None:
    """`change(state)` written back with a recomputed sidecar (which hides nothing)."""
    state = load_checkpoint(path)
    change(state)
    torch.save(state, path)
    sidecar(path).write_text(f"{file_sha256(path)}  {path.name}\n")


def old_format(state: dict) -> None:
    """As moa_train wrote checkpoints before weights_only loading: NumPy's RNG state as an array."""
    state["rng"]["numpy"] = np.random.get_state()


def converted(path, capsys) -> tuple:
    """(exit code, stderr lines) of `python3 -m moa_train.train.checkpoint convert PATH
    --trust-pickle`."""
    code = convert_main(["convert", str(path), "--trust-pickle"])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def files(folder) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# --- 1. pickled and damaged checkpoints -----------------------------------------------------------


def test_convert_refuses_a_file_that_fails_its_hash(train_run, tmp_path, capsys):
    train_run(tmp_path, *FIVE)
    folder = tmp_path / "checkpoints"
    path = folder / "step_0000005.pt"
    rewrite(path, old_format)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensors: torch reads it without noticing
    path.write_bytes(bytes(data))
    before = files(folder)
    code, err = converted(path, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: checkpoint {path} is damaged: its sha256 differs"), err
    assert "not converted" in err[0]
    assert files(folder) == before  # no new sidecar for a file that failed its hash


def test_old_checkpoint_names_its_numpy_global_and_the_convert_command(train_run, tmp_path, capsys):
    train_run(tmp_path, *FIVE)
    path = tmp_path / "checkpoints" / "step_0000005.pt"
    rewrite(path, old_format)
    with pytest.raises(UnsafeCheckpointError) as refused:
        load_checkpoint(path)
    line = str(refused.value)
    assert "\n" not in line
    assert "numpy._core.multiarray._reconstruct" in line or "numpy.core" in line, line
    assert f"python3 -m moa_train.train.checkpoint convert {path} --trust-pickle" in line
    assert converted(path, capsys)[0] == 0
    assert load_checkpoint(path)["step"] == 5


@pytest.mark.parametrize("payload", [Opens, Shell], ids=["io.open", "posix.system"])
@pytest.mark.parametrize("with_old_numpy", [False, True], ids=["alone", "after-old-numpy"])
def test_other_globals_are_named_and_never_converted(
    train_run, tmp_path, capsys, payload, with_old_numpy
):
    """A file naming a global the old format never held gets no advice to convert it, also when an
    old-format NumPy array comes first (torch's error names only the first global it meets), and
    convert refuses it without running it."""
    train_run(tmp_path, *FIVE)
    folder = tmp_path / "checkpoints"
    path = folder / "step_0000005.pt"
    marker = tmp_path / "payload-ran"

    def carry(state):
        if with_old_numpy:
            old_format(state)
        state["config"] = {**state["config"], "x": payload(marker)}

    rewrite(path, carry)
    name = "io.open" if payload is Opens else "posix.system"
    for load in (lambda: load_checkpoint(path), lambda: load_run(tmp_path)):
        with pytest.raises(UnsafeCheckpointError) as refused:
            load()
        line = str(refused.value)
        assert "\n" not in line and f"it names {name}" in line, line
        assert "--trust-pickle" not in line, line
        assert "not recommended" in line
    before = files(folder)
    code, err = converted(path, capsys)
    assert code == 2 and len(err) == 1 and f"it names {name}" in err[0], err
    assert "not converted" in err[0]
    assert not marker.exists()
    assert files(folder) == before


def test_blocked_module_payload_stops_resume_load_run_and_eval_only(cli, tmp_path):
    """torch reports a global of a blocked module (os, sys) in other words than "Unsupported
    global"; such a file was taken for a damaged one and skipped: resume, load_run and eval_only
    went on from the older checkpoint."""
    run = tmp_path / "run"
    assert cli(*TEN)[0] == 0
    folder = run / "checkpoints"
    path = folder / "step_0000010.pt"
    marker = tmp_path / "payload-ran"
    rewrite(path, lambda state: state.update(wandb_id=Shell(marker)))
    before = files(folder), (run / "metrics.jsonl").read_bytes()
    for result in (
        cli(*TINY, "trainer.max_steps=12", "trainer.keep_checkpoints=2"),
        cli("trainer.eval_only=true", f"trainer.resume={run}"),
    ):
        code, output, err = result
        assert code == 2, output
        assert len(err) == 1 and err[0].startswith(f"error: checkpoint {path} is refused"), output
        assert "it names posix.system" in err[0] and "Traceback" not in output
    with pytest.raises(CheckpointError, match=r"it names posix\.system"):
        load_run(run)
    assert not marker.exists()
    # no fallback: nothing set aside, trained or evaluated
    assert (files(folder), (run / "metrics.jsonl").read_bytes()) == before
    assert not (run / "eval").exists()
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r] == list(
        range(1, 11)
    )


# --- 2. the recovery point a divergence names -----------------------------------------------------


def test_sane_is_finite_weights_below_the_bound_and_a_finite_validation():
    assert sane(0, 3.2) and sane(0, None)  # no validation yet: the weights decide
    assert not sane(0, float("nan")) and not sane(0, float("inf"))
    assert not sane(1, 3.2)  # a weight above MAX_SANE_WEIGHT
    assert MAX_SANE_WEIGHT == 1e4


def test_divergence_names_only_a_sane_checkpoint(train_run, tmp_path):
    """A finite but huge lr leaves finite weights of ~1e28 and a NaN validation loss: such a
    checkpoint was named as the recovery point "from before", and resuming from it failed the same
    way. The stop names the newest sane one, which pruning keeps (trainer.keep_checkpoints=1)."""
    folder = tmp_path / "checkpoints"
    good = folder / "step_0000005.pt"
    train_run(tmp_path, *FIVE)
    huge = (*TINY, "trainer.max_steps=40", "optim.lr=1e30", "trainer.max_bad_steps=5")
    with pytest.raises(DivergedError, match="stopped at step 11") as stopped:
        train_run(tmp_path, *huge)
    assert f"the last good checkpoint is {good} (finite weights" in str(stopped.value)
    assert f"trainer.resume={good}" in str(stopped.value)
    insane = load_checkpoint(folder / "step_0000010.pt")
    assert insane["health"]["large_weights"] > 0 and math.isnan(insane["health"]["val"])
    assert insane["last_sane"] == str(good) and load_checkpoint(good)["health"]["sane"]
    # resumed from the insane one (auto: the newest), the stop still names the sane one
    with pytest.raises(DivergedError, match=f"the last good checkpoint is {good} "):
        train_run(tmp_path, *huge)
    # the advice works
    _, records = train_run(tmp_path, *TINY, "trainer.max_steps=7", f"trainer.resume={good}")
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 8))
    assert all(math.isfinite(r["val/loss"]) for r in records if "val/loss" in r)


def test_a_run_with_no_sane_checkpoint_names_none(make_cfg, tmp_path):
    cfg = make_cfg("trainer.device=cpu", *TINY, "trainer.max_steps=20", "optim.lr=1e30")
    with pytest.raises(DivergedError, match=r"last good checkpoint is none \(no checkpoint"):
        train(cfg, tmp_path)


# --- 3. the run folder is taken before anything is written into it --------------------------------


def written(run) -> dict:
    """What a refused trainer must leave as it was: Hydra's record of the run, its log, its metrics
    and checkpoints."""
    paths = [
        *run.glob(".hydra/*"),
        run / "train.log",
        run / "metrics.jsonl",
        *run.glob("checkpoints/*"),
    ]
    return {str(p.relative_to(run)): p.read_bytes() for p in paths if p.is_file()}


def test_trainer_refused_at_the_lock_writes_nothing(cli, tmp_path, monkeypatch):
    """Two trainers started together both pass the precheck; the one refused at the lock had
    already rewritten .hydra/config.yaml and overrides.yaml and written into train.log."""
    import json
    import socket
    import subprocess
    import sys

    import moa_train.__main__ as entry

    run = tmp_path / "run"
    assert cli(*FIVE)[0] == 0
    before = written(run)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    precheck = entry.precheck

    def other_trainer_starts(*args, **kwargs):  # right after this one's precheck
        cfg = precheck(*args, **kwargs)
        lock = {"pid": other.pid, "host": socket.gethostname()}
        (run / "train.lock").write_text(json.dumps(lock))
        return cfg

    monkeypatch.setattr(entry, "precheck", other_trainer_starts)
    try:
        code, output, err = cli(*TINY, "trainer.max_steps=10", "optim.lr=0.002")
    finally:
        other.kill()
        other.wait()
    assert code == 2 and len(err) == 1, output
    assert f"is in use by process {other.pid}" in err[0]
    assert written(run) == before


def test_resume_refused_for_a_changed_model_writes_nothing(cli, tmp_path):
    run = tmp_path / "run"
    assert cli(*FIVE)[0] == 0
    before = written(run)
    code, output, err = cli(*TEN, "model.n_layer=3")
    assert code == 2 and len(err) == 1, output
    assert "trainer.resume: model.n_layer is 2 in the checkpoint but 3 now" in err[0]
    assert written(run) == before
    assert not (run / "train.lock").exists()  # released


def test_default_run_folder_is_the_one_locked(cli, tmp_path, monkeypatch):
    """The precheck takes the lock of the time-stamped default folder; Hydra resolves that name
    again, maybe a second later: it is given the folder the precheck took."""
    import datetime as dt

    import hydra.core.utils

    clock = iter(range(10**6))

    class Ticking(dt.datetime):
        @classmethod
        def now(cls, tz=None):  # a second later at each look
            return dt.datetime(2030, 1, 1, tzinfo=tz) + dt.timedelta(seconds=next(clock))

    monkeypatch.setattr(hydra.core.utils, "datetime", Ticking)
    monkeypatch.chdir(tmp_path)
    assert cli(*FIVE, run_dir=False)[0] == 0
    (run,) = (tmp_path / "outputs" / "debug" / "runs").glob("*/*")  # debug=tiny: a smoke run
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "checkpoints").is_dir()
    assert not (run / "train.lock").exists()
