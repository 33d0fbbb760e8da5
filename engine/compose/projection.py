"""Projected sizes: how big a filter's, method's or operator's result will be, computed BEFORE it runs.

A size check on a result comes too late: ``range(100000)|join('y' * 4000)`` has
already allocated 400 MB when the result could be measured. The sandbox
therefore asks this module for an upper bound (in characters) of what an
operation is about to build, from the sizes of its inputs, and refuses when
the bound is over the render budget. The bounds are cheap (``str.count``,
lengths, a walk of containers that stops as soon as the limit is passed) and
deliberately a little generous: a bound that is too high refuses a template
that would have fit, a bound that is too low lets memory grow before the
result-size check catches it.

Every function returns a size in characters; none of them builds the result.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jinja2.utils import Namespace
from markupsafe import Markup

ITEM_COST = 8
"""Characters charged per container item: a separator in ``str()``/JSON and a pointer in memory."""
_OBJECT_COST = 64
"""``str()`` of anything else a template can hold (macros, cyclers, ranges, undefined) is short."""
ESCAPE_GROWTH = 5
"""HTML escaping turns one character into at most five (``&amp;``, ``&#34;``)."""


def weight(value: Any, stop: int, *, indent: int = 0) -> int:
    """An upper bound of ``len(str(value))`` (and of its JSON), or any number above ``stop``.

    Containers are walked once each (shared references are counted every time
    they appear, as ``str()`` would print them, but walked only once); the walk
    ends as soon as the total passes ``stop``, so a huge list costs no more than
    the limit. ``indent`` adds the per-line indentation of ``tojson(indent=n)``.
    """
    memo: dict[tuple[int, int], int] = {}
    return _weight(value, stop, indent, 0, memo)


def _weight(value: Any, stop: int, indent: int, depth: int, memo: dict[tuple[int, int], int]) -> int:
    if isinstance(value, str):
        return len(value) + 2
    if value is None or isinstance(value, (bool, float)):
        return 24
    if isinstance(value, int):
        return value.bit_length() * 31 // 100 + 2
    if isinstance(value, (bytes, bytearray)):
        return 4 * len(value) + 3
    items: Iterable[Any]
    if isinstance(value, Mapping):
        items = (x for kv in value.items() for x in kv)
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = value
    elif isinstance(value, Namespace):
        items = (x for kv in getattr(value, "_Namespace__attrs", {}).items() for x in kv)
    else:
        return _OBJECT_COST
    key = (id(value), depth)
    if key in memo:
        return memo[key]
    memo[key] = stop + 1  # a container that holds itself is over any limit
    per_item = ITEM_COST + indent * (depth + 1)
    total = 2
    for item in items:
        total += per_item + _weight(item, stop, indent, depth + 1, memo)
        if total > stop:
            break
    memo[key] = total
    return total


def text_size(value: Any, stop: int) -> int:
    """Size of ``str(value)``: its length for a string, a walk for anything else."""
    return len(value) if isinstance(value, str) else weight(value, stop)


def join_size(items: list[Any], sep: Any, stop: int) -> int:
    """``sep.join(map(str, items))``: the separators first (they are the usual amplifier), then the items."""
    total = max(len(items) - 1, 0) * text_size(sep, stop)
    for item in items:
        if total > stop:
            break
        total += text_size(item, stop)
    return total


def replace_size(s: str, old: str, new: str, count: int | None, escape_new: bool) -> int:
    found = len(s) + 1 if old == "" else s.count(old)
    if count is not None and count >= 0:
        found = min(found, count)
    grows = len(new) * (ESCAPE_GROWTH if escape_new and not isinstance(new, Markup) else 1) - len(old)
    return len(s) + found * max(grows, 0)


def lines_of(s: str) -> int:
    return s.count("\n") + s.count("\r") + 1


def indent_size(s: str, width: Any) -> int:
    per_line = len(width) if isinstance(width, str) else int(width) if isinstance(width, int) else _OBJECT_COST
    return len(s) + lines_of(s) * max(per_line, 0)


_BREAKS = ("\t", "\n", "\x0b", "\x0c", "\r", " ", "-")


def wordwrap_size(s: str, width: Any, wrapstring: Any) -> int:
    """Every line break inserts ``wrapstring``; a line ends at a break character or after ``width``."""
    w = width if isinstance(width, int) and width > 0 else 1
    lines = len(s) // w + sum(s.count(c) for c in _BREAKS) + 1
    return len(s) + lines * (len(wrapstring) if isinstance(wrapstring, str) else 1)


def format_size(fmt: str, args: Iterable[Any], stop: int) -> int:
    """``fmt % args`` / ``fmt.format(*args)``: every placeholder may repeat the largest argument."""
    largest = max((text_size(a, stop) for a in args), default=0)
    placeholders = fmt.count("%") + fmt.count("{")
    return len(fmt) + placeholders * largest


def urlize_size(s: str, target: Any, rel: Any) -> int:
    """Each link is written twice (href and text) and gains the ``target``/``rel`` attributes."""
    links = s.count(".") + s.count("@") + s.count(":") + 1
    extra = 64 + sum(len(x) for x in (target, rel) if isinstance(x, str))
    return 2 * len(s) + links * extra


def expandtabs_size(s: str, tabsize: Any) -> int:
    return len(s) + s.count("\t") * (tabsize if isinstance(tabsize, int) and tabsize > 0 else 8)


def translate_size(s: str, table: Any) -> int:
    longest = 1
    if isinstance(table, Mapping):
        longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
    return len(s) * max(longest, 1)


_WS_RE = re.compile(r"\s")


def split_size(s: str, sep: Any) -> int:
    """``s.split(sep)``: one list item per separator (a whitespace split: per whitespace character)."""
    if isinstance(sep, str) and sep:
        parts = s.count(sep) + 1
    elif sep is None and len(s) < 4096:
        parts = len(_WS_RE.findall(s)) + 1
    else:
        parts = len(s) // 2 + 1
    return len(s) + parts * (ITEM_COST + 50)  # each part is a new string object


def splitlines_size(s: str) -> int:
    return len(s) + lines_of(s) * (ITEM_COST + 50)


def repeat_size(seq: Any, times: int, stop: int) -> int:
    return text_size(seq, stop) * times if times > 0 else 0


def sized_list(value: Any) -> int | None:
    """Size of ``list(value)`` when it can be known without iterating; a string becomes one item per character."""
    if isinstance(value, str):
        return len(value) * ITEM_COST
    if isinstance(value, (list, tuple, set, frozenset, dict, range)):
        return len(value) * ITEM_COST
    return None


StrMethodCheck = Callable[[str, tuple[Any, ...], dict[str, Any]], int]
"""(the string, positional args, keyword args) -> projected size of a str method's result."""


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


STR_METHODS: dict[str, StrMethodCheck] = {
    "expandtabs": lambda s, a, k: expandtabs_size(s, _arg(a, k, 0, "tabsize", 8)),
    "translate": lambda s, a, k: translate_size(s, _arg(a, k, 0, "table")),
    "split": lambda s, a, k: split_size(s, _arg(a, k, 0, "sep")),
    "rsplit": lambda s, a, k: split_size(s, _arg(a, k, 0, "sep")),
    "splitlines": lambda s, a, k: splitlines_size(s),
    "replace": lambda s, a, k: replace_size(
        s, str(_arg(a, k, 0, "old", "")), str(_arg(a, k, 1, "new", "")), _arg(a, k, 2, "count"), False
    ),
}
"""The str methods whose result can be much larger than the string; ``join``/``format`` are handled apart."""
