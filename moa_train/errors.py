"""The one line a user-caused error is reported as, for every entry point (moa-train, moa-generate,
moa-bench, the result drivers): `error: ...`, characters that do not print escaped, exit 2. It sits
below every other layer and imports nothing of the package, so any part may report an error."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


def printable(text: str) -> str:
    """`text` with each character that does not print (a newline, a tab, U+202E, ...) as its
    escape, so that an error line shows the user's input as typed, on one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def error_line(message: str | Exception) -> str:
    """The one line an error is reported as (on stderr, in a failed job's error.txt)."""
    return f"error: {printable(str(message))}"


def fail(message: str | Exception, code: int = 2) -> NoReturn:
    """Report `message` as one error line on stderr and exit with `code`."""
    print(error_line(message), file=sys.stderr)
    sys.exit(code)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block first): `error: --jobs: must be ...`,
    exit 2."""

    def error(self, message: str) -> NoReturn:
        fail(message.removeprefix("argument "))
