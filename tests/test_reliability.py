"""Reliability: checkpoints hold every state and are verified, a damaged one is skipped, SIGTERM /
SIGINT / SIGKILL mid-run resume to exactly the losses of an uninterrupted run, non-finite steps are
skipped on the device and too many in a row stop the run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from copy import deepcopy

import pytest
import torch

from conftest import REPO, read_jsonl
from moa_train.train.checkpoint import CheckpointError, file_sha256, load_checkpoint, sidecar
from moa_train.train.guard import DivergedError
from moa_train.train.loop import Trainer
from moa_train.train.preemption import Preempted
from moa_train.train.tasks import LMTask

TINY = ("model=mha", "model.n_head=4")
# 15 steps, logged every 5 and checkpointed every 5 (the last two kept): a stop at step 7 or 12 is
# mid-window
RUN = (
    *TINY,
    "trainer.max_steps=15",
    "trainer.log_interval=5",
    "trainer.eval_interval=5",
    "trainer.keep_checkpoints=2",
)

needs_main_thread = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers need the main thread",
)


def by_step(records: list, key: str) -> list:
    return [(r["step"], r[key]) for r in records if key in r]


@pytest.fixture(scope="module")
def straight(train_run, tmp_path_factory):
    """metrics.jsonl of RUN without interruption."""
    return train_run(tmp_path_factory.mktemp("straight"), *RUN)[1]


def assert_same_run(records: list, reference: list) -> None:
    """Every train and val line once, with exactly the uninterrupted run's values (CPU: bit for
    bit)."""
    for key in ("train/loss", "val/loss"):
        assert by_step(records, key) == by_step(reference, key), key


def signal_at(monkeypatch, step: int, signum: int) -> None:
    """Deliver `signum` to this process while step `step` is being trained."""
    original = Trainer.train_step

    def train_step(self, log_step, batches=None):
        if self.step + 1 == step:
            os.kill(os.getpid(), signum)
        return original(self, log_step, batches)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def nan_loss_at(monkeypatch, calls) -> None:
    """Multiply the training loss by NaN on these (1-based) calls of the LM loss, one per step
    here."""
    original, count = LMTask.loss, iter(range(1, 10**9))

    def loss(self, model, batch, all_aux):
        total, ce, aux, routings = original(self, model, batch, all_aux)
        return (total * float("nan") if next(count) in calls else total), ce, aux, routings

    monkeypatch.setattr(LMTask, "loss", loss)


# --- checkpoints ----------------------------------------------------------------------------------


def test_checkpoint_holds_every_state_and_its_hash(train_run, tmp_path):
    train_run(tmp_path, *TINY, "trainer.max_steps=5", "trainer.eval_interval=5")
    path = tmp_path / "checkpoints" / "step_0000005.pt"
    assert sidecar(path).read_text() == f"{file_sha256(path)}  step_0000005.pt\n"
    state = load_checkpoint(path)
    assert {
        "model",
        "optimizer",
        "scheduler",
        "step",
        "tokens_seen",
        "best_val",
        "rng",
        "data",
        "wandb_id",
        "config",
        "guard",
        "window",
    } <= set(state)
    assert set(state["rng"]) == {"python", "numpy", "torch"} | (
        {"cuda"} if torch.cuda.is_available() else set()
    )
    assert state["step"] == 5 and state["config"]["trainer"]["max_steps"] == 5
    # best.pt: a second name, not a copy
    assert os.path.samefile(path, tmp_path / "checkpoints" / "best.pt")


@needs_main_thread
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_checkpoints_the_step_and_resume_matches(
    train_run, straight, tmp_path, monkeypatch, signum
):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal_at(monkeypatch, 7, signum)
    with pytest.raises(
        Preempted, match=f"stopped by {signal.Signals(signum).name} at step 7"
    ) as stopped:
        train_run(tmp_path, *RUN)
    assert stopped.value.exit_code == 128 + signum
    # the folder to resume
    assert str(stopped.value).endswith(f"the same command with hydra.run.dir={tmp_path}")
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the previous handlers are back
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.pt")) == [
        "step_0000005.pt",
        "step_0000007.pt",
    ]
    monkeypatch.undo()
    _, records = train_run(tmp_path, *RUN)
    assert_same_run(records, straight)  # the step-10 loss averages steps 6..10 across the stop


@needs_main_thread
@pytest.mark.parametrize("damage", ["flip a byte", "truncate"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(
    train_run, straight, tmp_path, monkeypatch, caplog, damage
):
    signal_at(monkeypatch, 12, signal.SIGTERM)
    with pytest.raises(Preempted):
        train_run(tmp_path, *RUN)
    latest = tmp_path / "checkpoints" / "step_0000012.pt"
    data = bytearray(latest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    latest.write_bytes(bytes(data))
    monkeypatch.undo()
    with caplog.at_level(logging.INFO):
        _, records = train_run(tmp_path, *RUN)
    assert "step_0000012.pt is damaged: its sha256 differs" in caplog.text
    assert "step_0000010.pt at step 10" in caplog.text
    assert_same_run(records, straight)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.pt"))
    # the damaged one is out of the way, set aside
    assert kept == ["step_0000010.pt", "step_0000015.pt"]
    assert (tmp_path / "checkpoints" / "step_0000012.pt.failed").read_bytes() == bytes(data)


def test_no_readable_checkpoint_is_an_error(train_run, tmp_path):
    train_run(tmp_path, *TINY, "trainer.max_steps=5", "trainer.eval_interval=5")
    # step_0000005.pt and best.pt (one file, two names)
    for path in (tmp_path / "checkpoints").glob("*.pt"):
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(
        CheckpointError, match=r"no readable checkpoint .*step_0000005\.pt, best\.pt"
    ):
        train_run(tmp_path, *TINY, "trainer.max_steps=10")


def test_checkpoint_without_sidecar_loads_with_a_warning(train_run, tmp_path, caplog):
    train_run(tmp_path, *TINY, "trainer.max_steps=5", "trainer.eval_interval=5")
    path = tmp_path / "checkpoints" / "step_0000005.pt"
    sidecar(path).unlink()
    with caplog.at_level(logging.WARNING):
        assert load_checkpoint(path)["step"] == 5
    assert "loaded without verification" in caplog.text


# --- kill a training process ----------------------------------------------------------------------

KILL_RUN = (
    *TINY,
    "trainer.max_steps=120",
    "trainer.log_interval=1",
    "trainer.eval_interval=40",
    "trainer.save_interval=10",
    "trainer.keep_checkpoints=2",
)


@pytest.fixture(scope="module")
def straight_120(train_run, tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("straight_120"), *KILL_RUN)[1]


def last_step(path) -> int:
    """The step of the last complete line: the running process may be half-way through writing the
    next one."""
    text = path.read_text() if path.is_file() else ""
    lines = text[: text.rfind("\n") + 1].splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_killed_training_process_resumes_to_the_same_losses(
    train_run, straight_120, data_root, cache_dir, tmp_path, signum
):
    env = {
        **os.environ,
        "MOA_DATA_DIR": str(data_root),
        "MOA_CACHE_DIR": str(cache_dir),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moa_train",
            "debug=tiny",
            "trainer.device=cpu",
            *KILL_RUN,
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while (
        last_step(tmp_path / "metrics.jsonl") < 35
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    killed_at = last_step(tmp_path / "metrics.jsonl")
    assert 35 <= killed_at < 120, err
    if signum == signal.SIGTERM:
        assert proc.returncode == 143, err
        assert f"stopped by SIGTERM at step {killed_at}" in err and "Traceback" not in err, err
        assert (tmp_path / "checkpoints" / f"step_{killed_at:07d}.pt").is_file()
    else:
        assert proc.returncode == -signal.SIGKILL
    _, records = train_run(tmp_path, *KILL_RUN)
    assert [s for s, _ in by_step(records, "train/loss")] == list(range(1, 121))  # each step once
    assert_same_run(records, straight_120)


def test_the_signal_handler_logs_nothing_and_the_main_thread_announces_the_stop_once(caplog):
    """The handler only records the signal: a log write from inside it can land in the middle of
    the main thread's write to the same file ("reentrant call inside BufferedWriter", a traceback on
    stderr; seen once in the suite). The warning comes from the main thread's first read of
    `received`, and once."""
    from moa_train.train.preemption import StopSignals

    stop = StopSignals()
    with caplog.at_level(logging.WARNING, logger="moa_train.train.preemption"):
        stop._handle(signal.SIGTERM, None)
        assert caplog.records == []
        assert stop.received == signal.SIGTERM and stop.received == signal.SIGTERM
    assert [r.getMessage() for r in caplog.records] == [
        "SIGTERM: finishing this step, then writing a checkpoint (send it again to exit at once)"
    ]


def test_second_signal_exits_at_once(tmp_path):
    script = (
        "import os, signal, time\n"
        "from moa_train.train.preemption import StopSignals\n"
        "stop = StopSignals().install()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "assert stop.received == signal.SIGTERM\n"
        "print('first signal noted', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(5)\n"
        "print('not reached')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 130, proc.stderr
    assert proc.stdout == "first signal noted\n"
    assert "SIGINT again: exiting at once" in proc.stderr


# --- non-finite steps -----------------------------------------------------------------------------


def snapshot(trainer) -> tuple:
    return deepcopy(trainer.model.state_dict()), deepcopy(trainer.optimizer.state_dict())


def assert_same_state(a: tuple, b: tuple) -> None:
    weights_a, optim_a = a
    weights_b, optim_b = b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    for pid, state in optim_a["state"].items():
        assert all(torch.equal(v, optim_b["state"][pid][k]) for k, v in state.items())


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("source", ["loss", "gradient"])
def test_non_finite_step_is_skipped(make_cfg, tmp_path, monkeypatch, fused, source):
    trainer = Trainer(
        make_cfg("trainer.device=cpu", "model=moa", "model.n_head=4", f"optim.fused={fused}"),
        tmp_path,
    )
    trainer.train_step(False)  # a good step first: AdamW has state to keep
    before = snapshot(trainer)
    if source == "loss":
        nan_loss_at(monkeypatch, {1})
        hook = None
    else:  # a finite loss with an infinite gradient
        hook = trainer.model.lm_head.weight.register_hook(lambda g: g * float("inf"))
    _, _, _, norm, bad = trainer.train_step(False)
    assert bad.item() and not torch.isfinite(norm)
    # neither the weights nor the AdamW moments and count moved
    assert_same_state(snapshot(trainer), before)
    assert (trainer.guard.skipped.item(), trainer.guard.streak.item()) == (1, 1)
    monkeypatch.undo()
    if hook is not None:
        hook.remove()
    _, _, _, _, bad = trainer.train_step(False)
    assert not bad.item()
    after = snapshot(trainer)
    assert not torch.equal(after[0]["lm_head.weight"], before[0]["lm_head.weight"])
    assert (
        trainer.guard.skipped.item(),
        trainer.guard.streak.item(),
        trainer.guard.longest.item(),
    ) == (1, 0, 1)


def test_skipped_steps_are_counted_and_left_out_of_the_loss(train_run, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, {3})
    summary, records = train_run(tmp_path, *TINY, "trainer.max_steps=10", "trainer.log_interval=5")
    train = [r for r in records if "train/loss" in r]
    assert [(r["step"], r["train/skipped_steps"]) for r in train] == [(5, 1), (10, 1)]
    # not NaN: the mean of the applied steps
    assert all(r["train/loss"] == r["train/loss"] for r in train)
    assert summary["skipped_steps"] == 1


def test_max_bad_steps_stops_and_keeps_the_last_good_checkpoint(train_run, tmp_path, monkeypatch):
    # steps 7, 8, 9 are 3 in a row; step 10 saves, logs at 4, 8, 12
    nan_loss_at(monkeypatch, set(range(7, 100)))
    with pytest.raises(
        DivergedError,
        match=r"trainer.max_bad_steps: 4 steps in a row .*stopped at step 10.*"
        r"step_0000005\.pt",
    ):
        train_run(
            tmp_path,
            *TINY,
            "trainer.max_steps=20",
            "trainer.max_bad_steps=3",
            "trainer.log_interval=4",
            "trainer.eval_interval=5",
        )
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == [
        "best.pt",
        "step_0000005.pt",
    ]
    assert [
        r["train/skipped_steps"]
        for r in read_jsonl(tmp_path / "metrics.jsonl")
        if "train/loss" in r
    ] == [0, 2]


@needs_main_thread
def test_tensorboard_shows_each_step_once_after_a_resume(train_run, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    signal_at(monkeypatch, 12, signal.SIGTERM)
    with pytest.raises(Preempted):
        train_run(tmp_path, *RUN, "trainer.log_interval=1", "logger=tensorboard")
    # back to step 10: steps 11 and 12 run twice
    (tmp_path / "checkpoints" / "step_0000012.pt").unlink()
    monkeypatch.undo()
    _, records = train_run(tmp_path, *RUN, "trainer.log_interval=1", "logger=tensorboard")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    shown, logged = events.Scalars("train/loss"), by_step(records, "train/loss")
    assert [e.step for e in shown] == [s for s, _ in logged]  # each step once, in order
    # a flat approx: pytest >= 9.2 refuses nested sequences such as [(step, value)]
    assert [e.value for e in shown] == pytest.approx([v for _, v in logged])


@needs_main_thread
@pytest.mark.parametrize("split", ["val", "test"])
def test_signal_during_evaluation_stops_it_and_resume_matches(
    train_run, straight, tmp_path, monkeypatch, split
):
    """A SIGTERM while evaluating ends the evaluation before its next batch (a long beam search used
    to run to its end); the step's checkpoint is written, and the resumed run evaluates that step
    first."""
    original, batches = Trainer.evaluate, []

    def evaluate(self, which, prefix, final=False):
        if which != split or (split == "val" and self.step != 10):
            return original(self, which, prefix, final)
        os.kill(os.getpid(), signal.SIGTERM)
        hook = self.model.register_forward_pre_hook(lambda module, args: batches.append(1))
        try:
            return original(self, which, prefix, final)
        finally:
            hook.remove()

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    step = 10 if split == "val" else 15
    with pytest.raises(Preempted, match=f"stopped by SIGTERM at step {step}"):
        train_run(tmp_path, *RUN)
    assert batches == []  # not one evaluation batch after the signal
    assert (tmp_path / "checkpoints" / f"step_{step:07d}.pt").is_file()
    logged = read_jsonl(tmp_path / "metrics.jsonl")
    # the stopped evaluation's
    assert not [r for r in logged if f"{split}/loss" in r and r["step"] == step]
    monkeypatch.undo()
    _, records = train_run(tmp_path, *RUN)
    assert_same_run(records, straight)
    assert by_step(records, "test/loss") == by_step(straight, "test/loss")
