"""Files written by temp-and-rename: a reader (another rank, a resumed run, a concurrent job) sees
the old file or the new one, never half of one, and a killed writer leaves at most a hidden
`.<name>.<pid>.tmp` beside it."""

from __future__ import annotations

import os
from pathlib import Path


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
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
