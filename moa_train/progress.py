"""Progress bars for long work, shown only when stderr is a terminal (logs and CI stay clean), and
under torchrun only by rank 0. While a bar is shown, console log lines go through tqdm.write, which
clears the bar, prints the line and redraws the bar below it (written straight to the terminal they
would glue onto the bar's text)."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


class Bar(tqdm):
    """A tqdm bar that redirects the root logger's console handlers to tqdm.write from creation to
    close."""

    def __init__(self, *args, **kwargs):
        # before tqdm's __init__: its __del__ calls close() even when __init__ fails
        self._redirect = None
        super().__init__(*args, **kwargs)
        if not self.disable:
            self._redirect = logging_redirect_tqdm(tqdm_class=tqdm)
            self._redirect.__enter__()

    def close(self):
        try:
            super().close()
        finally:
            redirect, self._redirect = self._redirect, None
            if redirect is not None:
                redirect.__exit__(None, None, None)


def progress(iterable=None, **kwargs):
    shown = sys.stderr.isatty() and os.environ.get("RANK", "0") == "0"
    return Bar(iterable, disable=not shown, dynamic_ncols=True, leave=False, **kwargs)
