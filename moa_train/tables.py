"""Markdown tables: the one writer behind every table that the reports, the results drivers, the
benchmarks and the sweep summary print. Light: it imports nothing."""

from __future__ import annotations


def table_row(cells) -> str:
    """One Markdown table line: the cells (through str) between pipes."""
    return "| " + " | ".join(map(str, cells)) + " |"


def table_lines(header, rows, align: str = "") -> list:
    """A Markdown table as its lines: `header`, the rule, then one line per row. `align` has a
    character per column, "r" for a right-aligned one ("---:"), anything else (or nothing, past its
    end) for the default."""
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align.ljust(len(header)))
    return [table_row(header), rule, *map(table_row, rows)]


def markdown_table(header, rows, align: str = "") -> str:
    """A Markdown table as text, ending in a newline."""
    return "\n".join(table_lines(header, rows, align)) + "\n"
