"""Drivers that reproduce the papers' tables and rebuild docs/results/ from the committed run records."""
import json
from pathlib import Path


def previous_meta(out: Path) -> dict:
    """The committed file's date and note, kept when the tables are rebuilt from the records."""
    path = out.with_suffix(".json")
    return json.loads(path.read_text()).get("meta", {}) if path.is_file() else {}
