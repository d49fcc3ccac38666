"""One training process per run folder: `RUN/train.lock` names the holder (pid and host).

A second trainer on the same folder would overwrite the first one's checkpoints and metrics, so it
stops with one line naming the holder. A lock left by a process that died (SIGKILL, a crash) on this
host is taken over; one of another host cannot be judged from here and is named instead. Readers
(load_run, eval_only, moa-report) take none.

A process may take the lock it holds again: the entry point takes it before Hydra writes the run
folder's .hydra/ and log, and holds it until the process ends; the trainer, in that process, takes
it once more. The file goes when the last of them releases it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

from moa_train.io import write_error
from moa_train.validation import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # written halfway by a killed process: nobody holds it
        return {}


# the lock files this process holds -> how many times it has taken each
_HELD: dict = {}


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.key = os.path.realpath(self.path)  # one folder under any of its names
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}

    def acquire(self) -> RunLock:
        if self.key in _HELD:  # taken by this process already (the entry point)
            _HELD[self.key] += 1
            return self
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._clear_stale()
                continue
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(json.dumps(self.me) + "\n")
            except OSError as exc:  # a full disk: no lock left half written
                self.path.unlink(missing_ok=True)
                raise write_error(self.path, exc) from exc
            _HELD[self.key] = 1
            return self
        raise ConfigError(
            f"hydra.run.dir: {self.path.parent} is held by another training process "
            f"({self.path} could not be taken); start one trainer per run folder"
        )

    def check(self) -> None:
        """ConfigError naming the holder if a live process holds the folder; nothing is taken."""
        holder = _holder(self.path) if self.path.is_file() else {}
        pid, host = holder.get("pid"), holder.get("host")
        if holder and (host != self.me["host"] or _alive(pid)):
            raise ConfigError(
                f"hydra.run.dir: {self.path.parent} is in use by process {pid} on host {host} "
                f"(lock file {self.path}); wait for it to end, or delete the lock file if that "
                "process is gone"
            )

    def _clear_stale(self) -> None:
        """Remove the lock if its holder is a dead process of this host; else refuse, naming the
        holder."""
        self.check()
        log.warning(
            "taking over %s, left by a process that has ended: %s", self.path, _holder(self.path)
        )
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        count = _HELD.pop(self.key, 1) - 1
        if count > 0:  # taken again by this process: the outer one releases it
            _HELD[self.key] = count
        elif _holder(self.path) == self.me:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
