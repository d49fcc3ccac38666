"""Where the data folder (the one holding wikitext-2/, multi30k/, ...) is, set once per machine.

In this order: `data.root` (an override, or `$MOA_DATA_DIR`, which the data YAMLs read into it);
the folder recorded once in `~/.config/moa_train/data_dir` (`$XDG_CONFIG_HOME` if set) by
`python3 -m moa_train.data --set-root DIR` (scripts/setup.sh runs it where MOA_DATA_DIR is set);
`../shared/data` beside the checkout. With none of them a corpus is downloaded through `datasets`
into the cache, where the network is evidently there: `offline_reason` says why not, in about a
second, instead of a download's half a minute of retries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from moa_train.data.corpus import DataError, expand, read_text
from moa_train.io import atomic_write_text
from moa_train.paths import repo_root

# relative to the checkout (outside one, the working directory); the first that exists is taken
SEARCHED = ("../shared/data",)
SET_ROOT = "python3 -m moa_train.data --set-root DIR"


def how_to_set(holding: str) -> str:
    """The advice ending a data error: the ways to name the data folder."""
    return (
        f"set MOA_DATA_DIR or data.root to the folder holding {holding}, or record that folder "
        f"once: {SET_ROOT}"
    )


OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
PROBE_TIMEOUT_S = 1.0


def record_file() -> Path:
    """The file holding the recorded data folder (one line: its absolute path)."""
    return expand(os.environ.get("XDG_CONFIG_HOME") or "~/.config") / "moa_train" / "data_dir"


@dataclass(frozen=True)
class Root:
    path: Path | None  # None: no folder set or found (the corpus is downloaded)
    how: str  # where it came from, for messages: "data.root", "recorded in FILE", ...


def find_root(root, given_by: str = "data.root") -> Root:
    """The data folder: `root` (data.root; `given_by` names it), else the recorded one, else the
    first of SEARCHED beside the checkout that exists, else none. A recorded folder that no longer
    exists is a DataError (one line), not a silent download."""
    if root is not None:
        return Root(expand(root), given_by)
    record = record_file()
    if record.is_file():
        text = read_text(record).strip()
        path = expand(text)
        if not text or not path.is_dir():
            raise DataError(
                f"{record}: the recorded data folder {text!r} does not exist; record another with "
                f"{SET_ROOT} (or --forget), or set MOA_DATA_DIR"
            )
        return Root(path, f"recorded in {record}")
    for relative in SEARCHED:
        path = repo_root() / relative
        if path.is_dir():
            return Root(path.resolve(), f"{relative} beside the checkout")
    return Root(None, "")


def resolve_root(data_cfg) -> Path | None:
    """The data folder a data config reads from (see find_root); None: its corpus is downloaded."""
    return find_root(data_cfg.get("root")).path


def record_root(folder) -> Path:
    """Record `folder` (made absolute) as this user's data folder; the record file's path. A
    DataError where it is not a folder."""
    path = expand(folder)
    if not path.is_dir():
        raise DataError(
            f"--set-root: {folder!r} is not a folder; give the folder holding wikitext-2/"
        )
    record = record_file()
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, f"{path.resolve()}\n")
    return record


def _reachable(host: str, port: int) -> bool:
    """Whether a TCP connection to host:port opens within PROBE_TIMEOUT_S, name lookup included
    (getaddrinfo takes no timeout, hence the thread)."""
    opened = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
                opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    return bool(opened)


def offline_reason() -> str | None:
    """Why a download cannot work, where that is evident: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set,
    or the hub's host (HF_ENDPOINT, default huggingface.co) not reachable within a second. None
    otherwise, and behind a proxy (which a direct probe cannot judge)."""
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{var} is set"
    if any(os.environ.get(var) for var in PROXY_VARS):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    if not _reachable(host, url.port or (80 if url.scheme == "http" else 443)):
        return f"{host} cannot be reached"
    return None


@contextlib.contextmanager
def _hub_logs_once():
    """`datasets` and `huggingface_hub` give their loggers a stderr handler of their own and let
    them propagate as well: where the root logger has handlers (a run: the console and train.log)
    each retry warning would print twice. Their own handlers are set aside meanwhile."""
    loggers = [logging.getLogger(name) for name in ("datasets", "huggingface_hub")]
    saved = [(logger, logger.handlers[:]) for logger in loggers]
    if logging.getLogger().handlers:
        for logger in loggers:
            if logger.propagate:
                logger.handlers = []
    try:
        yield
    finally:
        for logger, handlers in saved:
            logger.handlers = handlers


def download(target: Path, names: list, hub: tuple, texts, missing: str, fetch=True) -> bool:
    """Whether the folder `target` holds the files `names`, written once from the `datasets` hub
    copy (`load_dataset(*hub)`) where they are not there yet: texts(dataset) yields (file name,
    text) pairs. Where a download evidently cannot work (offline_reason) none is tried; that, or
    a failed download, is a DataError: `missing` (what is not where), why, and how_to_set. fetch
    False: nothing downloaded (False where a download would be tried)."""
    if all((target / name).is_file() for name in names):
        return True
    advice = how_to_set(target.name + "/")
    reason = offline_reason()
    if reason is not None:
        raise DataError(f"{missing}, and no download was tried ({reason}); {advice}")
    if not fetch:
        return False
    try:
        import datasets

        with _hub_logs_once():
            ds = datasets.load_dataset(*hub)
    except Exception as exc:  # hub down, package missing: all end in the same advice
        raise DataError(
            f"{missing}, and downloading it through `datasets` failed ({type(exc).__name__}); "
            f"{advice}"
        ) from None
    target.mkdir(parents=True, exist_ok=True)
    for name, text in texts(ds):
        atomic_write_text(target / name, text)
    return True
