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
    number."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def install(self) -> StopSignals:
        # Python allows handlers only there
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            print(
                f"{name} again: exiting at once, without a checkpoint of the current step",
                file=sys.stderr,
                flush=True,
            )
            os._exit(128 + signum)
        self.received = signum
        log.warning(
            "%s: finishing this step, then writing a checkpoint (send it again to exit at once)",
            name,
        )
