"""The data cache's one write rule: build a cache entry in a private folder, then rename it into place."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def build_atomically(out: Path, build) -> None:
    """build(folder) in a private folder renamed to `out`, so concurrent runs never see a partial cache."""
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    build(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
