"""Drivers that reproduce the papers' tables and rebuild docs/results/ from the committed run records."""
import datetime as dt
import json
import os
import shutil
from pathlib import Path


def clear(runs_dir: Path, group: str, row: str) -> None:
    """Delete a row's earlier run folders, so that a rerun's records do not mix with (or add to) the old ones, and
    a rerun with the same seeds does not resume (trainer.resume=auto) or reuse the old runs' evaluations."""
    for old in (runs_dir / group).glob(f"{row}-seed*"):
        if old.is_dir():
            shutil.rmtree(old)


def previous_meta(out: Path) -> dict:
    """The committed file's date and note, kept when the tables are rebuilt from the records."""
    path = out.with_suffix(".json")
    return json.loads(path.read_text()).get("meta", {}) if path.is_file() else {}


def results_meta(out: Path, tables_only: bool) -> dict:
    """The date, note and command of a results file's meta.

    A `--tables-only` rebuild keeps the committed file's (those of the run that measured the records); after fresh
    runs the date is today's and there is no note or command to keep. RESULTS_DATE / RESULTS_NOTE override both.
    """
    kept = previous_meta(out) if tables_only else {}
    return {"date": os.environ.get("RESULTS_DATE") or kept.get("date") or dt.date.today().isoformat(),
            "note": os.environ.get("RESULTS_NOTE") or kept.get("note"),
            "command": kept.get("command")}
