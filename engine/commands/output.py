"""How list commands print: a table for people, or ``--json`` for machines, the same way everywhere.

``--json`` is always JSON Lines: one JSON object per line, one line per row, nothing else on stdout
(an empty result prints nothing), values such as datetimes and UUIDs as strings. Commands whose
answer is a single report (``retention show``, ``dns check``) print that one object on one line.
A table has an upper-case header, columns as wide as their widest cell, and says so on stderr
when there is nothing to show (stdout stays empty, so ``| wc -l`` counts rows).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from engine.runtime import print_json

Cell = Callable[[Mapping[str, Any]], object]
Column = tuple[str, "str | Cell"]
"""A header and either the row key to show or a function of the row."""


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="JSON Lines: one JSON object per row and line")


def _text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    if hasattr(value, "strftime"):
        return f"{value:%Y-%m-%d %H:%M:%S}"
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], empty: str = "(none)") -> None:
    """Rows as an aligned table (the last column unpadded); ``empty`` on stderr when there are none."""
    if not rows:
        print(empty, file=sys.stderr)
        return
    cells = [[_text(get(r) if callable(get) else r.get(get)) for _, get in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _) in enumerate(columns)]
    for line in ([h for h, _ in columns], *cells):
        print("  ".join(c.ljust(w) for c, w in zip(line[:-1], widths, strict=False)) + ("  " if len(line) > 1 else "") + line[-1])


def rows_out(args: argparse.Namespace, rows: Iterable[Mapping[str, Any]], columns: Sequence[Column],
             empty: str = "(none)") -> None:
    """The one way a list command prints: JSON Lines with ``--json``, else a table."""
    rows = list(rows)
    if getattr(args, "json", False):
        for r in rows:
            print_json(dict(r))
    else:
        table(rows, columns, empty)
