"""What every corpus shares, LM (data/corpora.py) and translation (data/translation.py): the lookup
in its table, its files read as UTF-8 text and byte-level BPE training (where the files are, and
their download from the `datasets` hub: data/root.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


class DataError(ValueError):
    """A user-fixable data problem: printed as one line by the entry point."""


def expand(path) -> Path:
    """A data.root or data.cache_dir value as a path (`~` expanded)."""
    return Path(os.path.expanduser(str(path)))


def table_entry(table: dict, name: str, what: str):
    """The entry of a corpus table (data.name -> corpus) named `name`; where there is none, a
    DataError naming the allowed names (`what`: the kind of corpus, as "an LM corpus")."""
    if name not in table:
        raise DataError(f"data.name: {name!r} is not {what}; allowed: {', '.join(table)}")
    return table[name]


def unreadable(path, exc: OSError) -> DataError:
    """The one line for a data file the OS will not read (its permissions, a folder in its
    place)."""
    return DataError(
        f"data file {path} cannot be read ({exc.strerror or exc}); fix its permissions or point "
        "data.root at a readable copy"
    )


def check_readable(path: Path) -> None:
    """DataError unless this process can open `path` for reading. Judged by opening it: os.access
    answers for the real user, and root passes it whatever the file's mode."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise unreadable(path, exc) from None


def read_text(path: Path, newline: str | None = None) -> str:
    """The file's text; `newline` as for open() (None: '\\r\\n' and '\\r' read as '\\n'; '': kept).
    Not UTF-8: a DataError naming the first bad line; unreadable: one naming the OS reason."""
    try:
        with open(path, encoding="utf-8", newline=newline) as f:
            return f.read()
    except UnicodeDecodeError as exc:  # read in one piece: exc.start counts from the file's start
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"data file {path} is not UTF-8 text (line {line})") from None
    except OSError as exc:
        raise unreadable(path, exc) from None


def utf8(raw: bytes, source: str) -> str:
    """`raw` decoded as UTF-8; DataError naming `source` and where the first bad byte is (line and
    byte offset) if it is not."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{source} must be UTF-8 text: line {line}, byte offset {exc.start} "
            f"(0x{raw[exc.start]:02x}) is not"
        ) from None


def train_bpe(
    lines,
    vocab_size: int,
    path: Path,
    specials: tuple = (),
    unk: str | None = None,
    prefix_space: bool = False,
):
    """A byte-level BPE trained on `lines` (special tokens first, at ids 0, 1, ...), saved to
    `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        show_progress=sys.stderr.isatty(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer=trainer)
    tok.save(str(path))
    return tok
