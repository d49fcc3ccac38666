"""Progress bars for long work, shown only when stderr is a terminal (logs and CI stay clean)."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable=None, **kwargs):
    return tqdm(iterable, disable=not sys.stderr.isatty(), dynamic_ncols=True, leave=False, **kwargs)
