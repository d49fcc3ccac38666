"""`python3 -m moa_train.data`: where data is read from; `--set-root DIR` records the data folder
once for this user (later commands need no MOA_DATA_DIR), `--forget` removes the record."""

from __future__ import annotations

import os

from moa_train.data.corpus import DataError
from moa_train.data.root import find_root, how_to_set, offline_reason, record_file, record_root
from moa_train.errors import Parser, fail


def where() -> str:
    """One line: the data folder commands read from now, and how it was found."""
    root = find_root(os.environ.get("MOA_DATA_DIR"), "MOA_DATA_DIR")
    if root.path is not None:
        return f"data folder: {root.path} ({root.how}; data.root=DIR overrides it)"
    reason = offline_reason()
    now = f"; no download can work now: {reason}" if reason else ""
    return (
        "no data folder set or found: corpora are downloaded through `datasets` into the cache "
        f"({how_to_set('wikitext-2/, ...')}){now}"
    )


def main(argv=None) -> None:
    p = Parser(prog="python3 -m moa_train.data", description=__doc__.split("\n\n")[0])
    group = p.add_mutually_exclusive_group()
    group.add_argument("--set-root", metavar="DIR", help="record DIR as the data folder")
    group.add_argument("--forget", action="store_true", help="remove the recorded data folder")
    args = p.parse_args(argv)
    try:
        if args.set_root is not None:
            print(f"recorded {args.set_root} in {record_root(args.set_root)}")
        elif args.forget:
            record_file().unlink(missing_ok=True)
            print(f"removed {record_file()}")
        print(where())
    except DataError as exc:
        fail(exc)


if __name__ == "__main__":
    main()
