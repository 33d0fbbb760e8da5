"""Named SQL statements loaded from ``queries.sql``.

Like procrastinate, the engine keeps every statement in one file and calls it by
name, so no module builds SQL strings. ``:name`` placeholders are turned into
asyncpg's positional ``$n`` here, once, at import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

_PARAM_RE = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")
_NAME_RE = re.compile(r"^--\s*name:\s*([a-z0-9_]+)\s*$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Query:
    name: str
    sql: str
    params: tuple[str, ...]

    def args(self, values: dict[str, Any]) -> list[Any]:
        missing = [p for p in self.params if p not in values]
        extra = [k for k in values if k not in self.params]
        if missing or extra:
            raise TypeError(f"query {self.name}: missing {missing}, unexpected {extra}")
        return [values[p] for p in self.params]


def _compile(name: str, text: str) -> Query:
    order: list[str] = []

    def repl(m: re.Match[str]) -> str:
        p = m.group(1)
        if p not in order:
            order.append(p)
        return f"${order.index(p) + 1}"

    # Comments may contain colons; strip whole-line comments before substituting.
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    sql = _PARAM_RE.sub(repl, body).strip().rstrip(";")
    return Query(name, sql, tuple(order))


def load(text: str) -> dict[str, Query]:
    parts = _NAME_RE.split(text)
    out: dict[str, Query] = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        if name in out:
            raise ValueError(f"duplicate query name {name}")
        out[name] = _compile(name, body)
    return out


QUERIES: dict[str, Query] = load(resources.files("engine.db").joinpath("queries.sql").read_text())


def q(query_name: str, /, **values: Any) -> tuple[Any, ...]:
    """``await conn.fetch(*q("claim", owner=..., limit=...))``."""
    query = QUERIES[query_name]
    return (query.sql, *query.args(values))
