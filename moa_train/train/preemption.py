"""SIGTERM and SIGINT stop a run cleanly: the current step finishes, a checkpoint is written, the
loggers are closed, and the process exits with 128 + the signal number (143 for SIGTERM, 130 for
SIGINT), as a shell reports a process killed by that signal. A second signal exits at once (the
checkpoint of the last save step stays).

Schedulers (Slurm, Kubernetes, spot instances) send SIGTERM some time before SIGKILL; Ctrl-C sends
SIGINT. The handlers are installed while the trainer trains and the previous ones restored after it.
A signal during an evaluation (validation, or the final test) stops it before its next batch: a
validation stopped so is saved as pending in the checkpoint and run first by the resumed process;
the final test is run again on resume.

Under torchrun (which passes a SIGTERM on to every worker) the ranks agree on the signal at log
steps, with one small all-reduce, so that every rank writes the checkpoint and stops at the same
step: up to trainer.log_interval - 1 more steps run after the signal.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(BaseException):
    """Raised by the trainer once the checkpoint of a signalled run is written. A BaseException,
    like KeyboardInterrupt, so that no `except Exception` (a sweep's failure handling) turns it into
    a failed job."""

    def __init__(self, signum: int, step: int, checkpoint, run_dir, rank: int = 0):
        # the default hydra.run.dir is a new time-stamped folder: naming the folder makes the same
        # command resume
        where = (
            f"checkpoint {checkpoint} written"
            if rank == 0
            else f"rank {rank}; rank 0 wrote the checkpoint"
        )
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}: {where}; to resume, run the "
            f"same command with hydra.run.dir={run_dir}"
        )
        self.exit_code = 128 + signum


class EvaluationStopped(BaseException):
    """Raised by an evaluation loop that sees a stop signal: evaluation (a beam search over a large
    split) can take long, and a scheduler's SIGKILL follows its SIGTERM. A BaseException, like
    Preempted."""


def check_stop(stop) -> None:
    """Called between evaluation batches: raise EvaluationStopped once `stop` (a StopSignals, or
    None) has a signal."""
    if stop is not None and stop.received is not None:
        raise EvaluationStopped()


class StopSignals:
    """Catches SIGTERM and SIGINT from install() to restore(); `received` is the first one's
    number.

    The handler only records the signal: logging from inside it could interrupt the main thread in
    the middle of a write to the same log file, and Python's buffered file then refuses the nested
    write ("reentrant call", a traceback on stderr). The warning is logged by the main thread when
    it first reads `received` (the trainer does after every step; under torchrun at log steps)."""

    def __init__(self):
        self._received = None
        self._announced = False
        self.previous = {}

    @property
    def received(self) -> int | None:
        if self._received is not None and not self._announced:
            self._announced = True
            log.warning(
                "%s: finishing this step, then writing a checkpoint (send it again to exit at "
                "once)",
                signal.Signals(self._received).name,
            )
        return self._received

    def install(self) -> StopSignals:
        # Python allows handlers only there
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if self._received is not None:
            # a raw write: no Python buffer that the interrupted thread may hold
            message = (
                f"{signal.Signals(signum).name} again: exiting at once, without a checkpoint of "
                "the current step\n"
            )
            os.write(sys.stderr.fileno(), message.encode())
            os._exit(128 + signum)
        self._received = signum
