"""The trainer's schedule, one component per concern: validation and when it runs (Evaluator),
when to write a checkpoint, which one is best and which the final test averages (Checkpointer),
when validation has stopped improving (EarlyStopping), and the throughput of the steps between
(Meter). `Trainer.fit` asks them at each step."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

from moa_train.train import distributed
from moa_train.train.checkpoint import (
    checkpoints_in,
    drop_later_checkpoints,
    load_latest,
    remove_temp_files,
    save_checkpoint,
    step_checkpoints,
)
from moa_train.train.guard import sane
from moa_train.validation import ConfigError


class Every:
    """Something done every `interval` steps and at the last."""

    interval: int

    def due(self, step: int, last: bool) -> bool:
        return step % self.interval == 0 or last


class Evaluator(Every):
    """Validation, every `trainer.eval_interval` steps and at the last: the val split evaluated
    through `evaluate(split, prefix)` (the trainer's: its forward, precision and stop signals), its
    metrics logged with the best value so far, its task metric handed to the checkpointer (which
    checkpoint is best) and to early stopping. `last`: the latest validation's metrics (the
    summary's); `pending` marks a validation a signal stopped, recorded in the checkpoint so the
    resumed process runs it first."""

    def __init__(self, interval: int, evaluate, checkpointer, early_stopping):
        self.interval, self.evaluate = interval, evaluate
        self.checkpointer, self.early_stopping = checkpointer, early_stopping
        self.pending, self.last = False, {}

    def validate(self, step: int, logger) -> tuple:
        """(val metrics, whether they are the best so far) of the validation at `step`, logged.
        EvaluationStopped by a signal leaves it pending: the checkpoint written next records it
        for the resumed process."""
        self.pending = True
        val = self.evaluate("val", "val")
        self.pending = False
        metric = self.checkpointer.metric
        is_best = self.checkpointer.is_best(val)
        self.early_stopping.update(val[metric], step)
        logger.log(step, {**val, f"{metric}_best": self.checkpointer.best})
        self.last = val
        return val, is_best

    def state_dict(self) -> dict:
        """Its checkpoint key: pending_eval."""
        return {"pending_eval": self.pending}

    def load_state_dict(self, state: dict) -> None:
        self.pending = state["pending_eval"]


class EarlyStopping:
    """trainer.early_stopping: a validation improves when its metric (lower is better) is below the
    best so far by more than `min_delta` (Lightning's rule); the run is done once `patience`
    validations in a row have not (off for a null or 0 patience). Validations are counted whether
    it is on or not, and the count is part of the checkpoint, so a resumed run counts on."""

    def __init__(self, patience: int | None, min_delta: float):
        self.patience, self.min_delta = patience or 0, min_delta
        self.best, self.best_step, self.waited = math.inf, None, 0

    def update(self, value: float, step: int) -> None:
        if value < self.best - self.min_delta:
            self.best, self.best_step, self.waited = value, step, 0
        else:
            self.waited += 1

    @property
    def done(self) -> bool:
        return 0 < self.patience <= self.waited

    def reason(self, metric: str) -> str:
        return (
            f"{metric} has not fallen below its best, {self.best:.4f} at step {self.best_step}, by "
            f"more than trainer.early_stopping.min_delta={self.min_delta:g} in {self.waited} "
            f"validations (trainer.early_stopping.patience={self.patience})"
        )

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "waited": self.waited}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.waited = state["best"], state["best_step"], state["waited"]


def resume_target(resume, run_dir: Path) -> Path | None:
    """The checkpoint file or run folder to resume from, following trainer.resume = auto | true |
    false | PATH."""
    if resume in (False, "false", None):
        return None
    if resume in (True, "true", "auto"):
        if not checkpoints_in(run_dir):
            if resume == "auto":
                return None
            raise ConfigError(
                f"trainer.resume: true but the run folder {run_dir} holds no checkpoint; "
                "use auto, false or a PATH"
            )
        return run_dir
    target = Path(str(resume)).expanduser()
    if not checkpoints_in(target):
        raise ConfigError(
            f"trainer.resume: {resume!r} is neither a checkpoint file nor a run folder with one"
        )
    return target


class Checkpointer(Every):
    """Checkpoints of a run folder: the one to resume from (`trainer.resume`); written every
    `trainer.save_interval` steps (null: at each validation), at the last step and when stopping;
    the best by the task's metric (lower is better) kept as best.pt; the last
    `trainer.keep_checkpoints` step files kept, or `task.average_last` if more, for the final test's
    average, and the newest sane one (guard.sane): the recovery point a divergence names. Each
    checkpoint records its health and that one."""

    def __init__(self, cfg, run_dir: Path, dist, metric: str):
        t = cfg.trainer
        self.folder, self.dist, self.metric = Path(run_dir) / "checkpoints", dist, metric
        self.interval = t.save_interval or t.eval_interval
        self.keep = max(t.keep_checkpoints, cfg.task.average_last or 0)
        self.best = math.inf
        self.val = None  # the latest validation's metric: part of the next checkpoint's health
        self.last = None  # the newest checkpoint written or resumed from
        self.last_sane = None  # the newest sane checkpoint written or resumed from
        self.resumed_from = None  # (checkpoint path, its step) when the run resumed
        self.failed = ()  # newer checkpoints the resume skipped: they failed their check

    def state_dict(self) -> dict:
        """Its checkpoint key: best_val (the best validation metric so far)."""
        return {"best_val": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best_val"]

    def is_best(self, metrics: dict) -> bool:
        """Whether this validation beats every earlier one; the best value is updated."""
        self.val = metrics[self.metric]
        better = self.val < self.best
        self.best = min(self.best, self.val)
        return better

    def load(self, resume, map_location) -> tuple | None:
        """(path, state) of the newest checkpoint that verifies and reads under what
        `trainer.resume` names; None where there is nothing to resume."""
        target = resume_target(resume, self.folder.parent)
        if target is None:
            return None
        path, state, self.failed = load_latest(target, map_location)
        return path, state

    def resumed(self, path: Path, state: dict) -> None:
        self.last, self.resumed_from = path, (path, state["step"])
        health = state["health"]
        self.val = health["val"]
        named = path if health["sane"] else state["last_sane"]
        # where it was written, or beside this one (a run folder moved since)
        found = [Path(named), path.parent / Path(named).name] if named else []
        self.last_sane = next((p.absolute() for p in found if p.is_file()), None)

    def start(self, step: int) -> None:
        """Before the first step: leftovers of an interrupted write removed and, on a resumed run,
        the checkpoints of later steps set aside (the run's history continues from `step`)."""
        if self.dist.main:
            remove_temp_files(self.folder)
            if self.resumed_from is not None:
                drop_later_checkpoints(self.folder, step, self.failed)

    def write(self, state: dict, is_best: bool, large_weights: int) -> None:
        """The checkpoint of `state`, recording its health (`large_weights`: weights above
        guard.MAX_SANE_WEIGHT) and the newest sane checkpoint, which pruning keeps."""
        path = self.folder / f"step_{state['step']:07d}.pt"
        good = sane(large_weights, self.val)
        last_sane = path.absolute() if good else self.last_sane
        state = {
            **state,
            "health": {"sane": good, "large_weights": large_weights, "val": self.val},
            "last_sane": None if last_sane is None else str(last_sane),
        }
        if self.dist.main:
            self.last = save_checkpoint(state, self.folder, self.keep, is_best, last_sane)
        self.last_sane = last_sane
        distributed.barrier(self.dist)  # no rank reads checkpoints/ while rank 0 writes

    def history(self) -> list:
        """The run's step checkpoints, oldest first: its own, after those of the folder it resumed
        from (up to the resumed step) when that is another one (trainer.resume=PATH from a new run
        folder)."""
        paths = step_checkpoints(self.folder) if self.folder.is_dir() else []
        if self.resumed_from is not None:
            source, step = self.resumed_from
            if source.parent.resolve() != self.folder.resolve():
                paths = [
                    p for p in step_checkpoints(source.parent) if p.name <= f"step_{step:07d}.pt"
                ] + paths
        return paths


class Meter:
    """Throughput over windows of steps; the device is synchronised at both ends so a window times
    only its steps (evaluation and checkpoint writing restart it)."""

    def __init__(self, sync):
        # step_ms: every closed window's mean, for the summary's median
        self.sync, self.step_ms = sync, []
        self.restart()

    def restart(self) -> None:
        self.sync()
        self.t0, self.steps, self.tokens = time.perf_counter(), 0, 0

    def add(self, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens

    def close(self) -> tuple:
        """(ms per step, tokens per second) of the window; a new one starts."""
        self.sync()
        elapsed = time.perf_counter() - self.t0
        step_ms, tok_s = 1000 * elapsed / self.steps, self.tokens / elapsed
        self.step_ms.append(step_ms)
        self.restart()
        return step_ms, tok_s

    def median_step_ms(self):
        # the first window holds warm-up
        steady = self.step_ms[1:] if len(self.step_ms) > 1 else self.step_ms
        return statistics.median(steady) if steady else None
