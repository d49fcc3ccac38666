"""Files written by temp-and-rename: a reader (another rank, a resumed run, a concurrent job) sees
the old file or the new one, never half of one, and a killed writer leaves at most a hidden
`.<name>.<pid>.tmp` beside it."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


class WriteError(OSError):
    """A file the run keeps could not be written (a full disk, a file system gone read-only): a
    user-fixable condition, reported as one line naming the file and the OS reason, exit code 2.
    An OSError still (errno, strerror), so a caller that handles OSError goes on doing so."""

    def __str__(self) -> str:
        return f"{self.filename} could not be written ({self.strerror})"


def write_error(path, exc: OSError) -> WriteError:
    """`exc`, raised while writing `path`, as a WriteError naming `path`."""
    if isinstance(exc, WriteError):
        return exc
    return WriteError(exc.errno, exc.strerror or str(exc), str(path))


def temp_path(path: Path) -> Path:
    """The hidden temp file beside `path` that this process renames over it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: Path, write, durable: bool = False) -> None:
    """write(f), f a binary file, into a temp file beside `path`, then rename it over `path`.
    `durable`: fsync the file before the rename and the folder after it, so the new file survives a
    power cut (checkpoints)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as exc:  # the old file, if any, is intact
        raise write_error(path, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as exc:
            raise write_error(path, exc) from exc
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


class LogFileHandler(logging.FileHandler):
    """The run's log file (configs/hydra/job_logging/moa.yaml). logging reports a write that fails
    with a traceback on stderr and goes on; here the first one (a full disk) raises a WriteError
    naming the file from the logging call, which ends the run with one line. Later records are
    dropped: the run is stopping."""

    failed = False

    def handleError(self, record) -> None:
        exc = sys.exc_info()[1]
        if self.failed:
            return
        if isinstance(exc, OSError):
            self.failed = True
            raise write_error(self.baseFilename, exc) from exc
        super().handleError(record)
