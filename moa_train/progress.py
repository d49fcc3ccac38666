"""Progress bars for long work, shown only when stderr is a terminal (logs and CI stay clean), and under torchrun
only by rank 0."""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress(iterable=None, **kwargs):
    shown = sys.stderr.isatty() and os.environ.get("RANK", "0") == "0"
    return tqdm(iterable, disable=not shown, dynamic_ncols=True, leave=False, **kwargs)
