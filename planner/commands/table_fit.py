"""Plain-text tables that fit the terminal: drop the least useful columns, then shorten the longest cells.

`rich` could do this, but importing it costs more than ranking every offer; these tables are small.
Width: `$COLUMNS`, else the terminal's, else 120 when stdout is not a terminal (pipes, files).
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from dataclasses import dataclass


def terminal_width() -> int:
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    if sys.stdout.isatty():
        return shutil.get_terminal_size((120, 24)).columns
    return 120


@dataclass
class Column:
    header: str
    right: bool = False
    drop: int = 0          # > 0: may be dropped to fit, lowest first
    shrink: bool = False   # may be cut with "~" to fit (names, regions, notes)
    min_width: int = 4


def render(columns: list[Column], rows: list[list[str]], width: int | None) -> str:
    """The table as text; with `width`, no line longer than it (columns dropped, then cells shortened)."""
    cols = list(range(len(columns)))
    widths = [max([len(columns[i].header), *(len(r[i]) for r in rows)]) for i in cols]

    def total(keep: list[int]) -> int:
        return sum(widths[i] for i in keep) + 2 * (len(keep) - 1)

    if width:
        for i in sorted((i for i in cols if columns[i].drop), key=lambda i: columns[i].drop):
            if total(cols) <= width:
                break
            cols.remove(i)
        for i in sorted((i for i in cols if columns[i].shrink), key=lambda i: -widths[i]):
            excess = total(cols) - width
            if excess <= 0:
                break
            widths[i] = max(columns[i].min_width, len(columns[i].header), widths[i] - excess)

    def cell(text: str, i: int) -> str:
        w = widths[i]
        if len(text) > w:
            text = text[: w - 1] + "~"
        return text.rjust(w) if columns[i].right else text.ljust(w)

    def line(cells: list[str]) -> str:
        out = "  ".join(cell(cells[i], i) for i in cols).rstrip()
        return out[:width] if width else out

    lines = [line([c.header for c in columns]), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    return "\n".join(lines)


def wrap(text: str, width: int | None, indent: str = "") -> str:
    """A paragraph wrapped to `width` (continuation lines indented), or as it is without a width."""
    if not width:
        return indent + text
    return "\n".join(textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent + "  ",
                                   break_long_words=True, break_on_hyphens=False)) or indent
