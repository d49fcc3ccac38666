"""The data cache's rules: an entry is keyed by the content of its source files, built in a private
folder and renamed into place, and checked when it is read; a damaged entry is rebuilt with one
warning line."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from moa_train.data.corpus import unreadable
from moa_train.io import write_error

log = logging.getLogger(__name__)


class CacheDamaged(Exception):
    """A cache entry that does not match its own metadata (truncated, stale, garbled): rebuilt, not
    trusted."""


def content_key(paths, settings: str) -> str:
    """A short key of the files' bytes and the tokenisation settings. Sizes and times are not
    enough: a truncated copy or another folder with files of the same sizes and times would be
    served the old tokens."""
    h = hashlib.sha256()
    for path in paths:
        try:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as exc:
            raise unreadable(path, exc) from None
        h.update(f"{Path(path).name}:{digest};".encode())
    h.update(settings.encode())
    return h.hexdigest()[:16]


def build_atomically(out: Path, build) -> None:
    """build(folder) in a private folder renamed to `out`, so concurrent runs never see a partial
    cache."""
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        build(tmp)
    except OSError as exc:  # a full disk: no partial entry stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(out, exc) from exc
    try:
        tmp.rename(out)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)


def _discard(out: Path) -> None:
    """Move a damaged entry aside (one atomic rename, so no reader sees it half deleted), then
    delete it."""
    aside = out.with_name(f"{out.name}.damaged{os.getpid()}")
    try:
        out.rename(aside)
    except OSError:  # gone already (another process is rebuilding it)
        return
    shutil.rmtree(aside, ignore_errors=True)


def load_cached(out: Path, build, load):
    """load(out) of the cache entry `out`, built first where missing. Where load finds it damaged
    (CacheDamaged, or a file it cannot read or parse) the entry is rebuilt once, with one warning
    line naming what was wrong."""
    if not out.is_dir():
        build_atomically(out, build)
    try:
        return load(out)
    except (CacheDamaged, OSError, ValueError, KeyError, TypeError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("data cache %s is damaged (%s); rebuilding it", out, reason)
    _discard(out)
    build_atomically(out, build)
    return load(out)


def check_ids(path: Path, ids, n_expected: int, vocab_size: int) -> None:
    """CacheDamaged unless `ids` (read from `path`) holds n_expected ids, all below vocab_size."""
    if len(ids) != n_expected:
        raise CacheDamaged(f"{path.name} holds {len(ids)} ids, meta.json says {n_expected}")
    if len(ids) and int(ids.max()) >= vocab_size:
        raise CacheDamaged(
            f"{path.name} holds id {int(ids.max())}, beyond the vocabulary of {vocab_size}"
        )
