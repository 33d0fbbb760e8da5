"""The Jinja2 sandbox untrusted templates run in, and the bounds that keep a render small.

Templates come from customers, so everything runs in Jinja2's
``ImmutableSandboxedEnvironment`` (with ``StrictUndefined``, set by the renderer)
plus extra bounds:

* parse time: attribute/item access to names starting with ``_`` is refused
  with the line number (``''.__class__``, ``cycler.__init__.__globals__``,
  ``self._TemplateReference__context``), so an escape attempt never compiles;
* render time: the sandbox blocks unsafe attributes and callables, ``range``
  is capped at ``MAX_RANGE``, every ``{% for %}`` draws from a per-render
  iteration budget and deadline, ``*``/``**``/``+``/``~``, filters and calls
  refuse results larger than the output cap, and the output itself is
  streamed and cut at the output limit (:func:`render_bounded`).

A bound that is hit raises :class:`LimitExceeded`; the renderer turns it into a
``TemplateError`` that names the template, part and line.
"""

from __future__ import annotations

import contextvars
import functools
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from jinja2 import TemplateSyntaxError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

# --------------------------------------------------------------------------- budget


class _Budget:
    """Per-render limits shared by loops, operators, filters and output."""

    __slots__ = ("iterations", "deadline", "max_size")

    def __init__(self, iterations: int, timeout: float, max_size: int) -> None:
        self.iterations = iterations
        self.deadline = time.monotonic() + timeout
        self.max_size = max_size

    def tick(self) -> None:
        self.iterations -= 1
        if self.iterations < 0:
            raise LimitExceeded("too many loop iterations (the render's loop budget is spent)")
        if self.iterations % 1024 == 0 and time.monotonic() > self.deadline:
            raise LimitExceeded("rendering took too long")


class LimitExceeded(Exception):
    """A render bound was hit (loop budget, deadline, size); the renderer turns it into a TemplateError."""


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("render_budget", default=None)
_DEFAULT_MAX = 5 * 1024 * 1024


def _max_size() -> int:
    b = _BUDGET.get()
    return b.max_size if b is not None else _DEFAULT_MAX


def _check_size(value: Any, what: str) -> Any:
    if isinstance(value, (str, bytes, list, tuple)) and len(value) > _max_size():
        raise LimitExceeded(f"{what} would produce {len(value)} items, over the output limit")
    return value


# Callables whose integer arguments are output sizes (widths, counts): a huge one allocates at once.
_SIZING_FILTERS = frozenset({"center", "indent", "slice"})
_SIZING_METHODS = frozenset({"ljust", "rjust", "center", "zfill", "expandtabs"})


def _check_args(args: Iterable[Any], what: str) -> None:
    limit = _max_size()
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > limit:
            raise LimitExceeded(f"{what}: number {a} is over the output limit")


_FORMAT_NUM_RE = re.compile(r"\d{4,}")


def _check_format_string(fmt: Any, what: str) -> None:
    """A width like ``{:>999999999}`` or ``%999999999d`` allocates before any check could run."""
    if isinstance(fmt, str):
        limit = _max_size()
        for m in _FORMAT_NUM_RE.finditer(fmt):
            if int(m.group()) > limit:
                raise LimitExceeded(f"{what}: format width {m.group()} is over the output limit")


def _loop_guard(iterable: Any) -> Iterator[Any]:
    budget = _BUDGET.get()
    if budget is None:  # rendered outside Renderer.render: still bounded
        budget = _Budget(200_000, 5.0, _DEFAULT_MAX)
    for item in iterable:
        budget.tick()
        yield item


def _size_guard(value: Any) -> Any:
    return _check_size(value, "concatenation")


class _Bounder(NodeTransformer):
    """Wrap every for-loop iterable and every ``~`` concatenation in a guard filter."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)  # rewrites the children in place
        node.iter = nodes.Filter(node.iter, "_engine_loop_guard", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Filter(node, "_engine_size_guard", [], [], None, None, lineno=node.lineno)


def _reject_private_access(ast: nodes.Template, name: str | None, filename: str | None) -> None:
    """Refuse ``x.__y``, ``x['_y']`` and ``x|attr('_y')`` before the template ever runs."""
    for node in ast.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        attr: Any = None
        if isinstance(node, nodes.Getattr):
            attr = node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            attr = node.arg.value
        elif isinstance(node, nodes.Filter) and node.name == "attr" and node.args:
            if isinstance(node.args[0], nodes.Const):
                attr = node.args[0].value
        if isinstance(attr, str) and attr.startswith("_"):
            raise TemplateSyntaxError(
                f"access to private attribute {attr!r} is not allowed in templates",
                node.lineno, name, filename,
            )


# --------------------------------------------------------------------------- environment


class Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox plus size checks on the operators and calls that can explode."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parse_count = 0  # how many sources were compiled: proves the cache works
        self.globals.pop("lipsum", None)  # lipsum(n=10**6) builds megabytes in one call; no use in mail
        for fname, func in list(self.filters.items()):
            self.filters[fname] = _guard_filter(fname, func)
        self.filters["_engine_loop_guard"] = _loop_guard
        self.filters["_engine_size_guard"] = _size_guard

    def render_bounded(
        self, name: str, variables: Mapping[str, Any], *, max_iterations: int, timeout: float, max_output_size: int
    ) -> str:
        """Load template ``name`` and render it under a fresh budget, streaming the output.

        The budget (loop iterations, deadline, size cap for operators and calls) is
        per call, so one part's loops cannot starve the next part. The output is
        cut at ``max_output_size`` characters and at ``timeout`` seconds.
        Raises :class:`LimitExceeded` and whatever Jinja raises; nothing is caught here.
        """
        token = _BUDGET.set(_Budget(max_iterations, timeout, max_output_size))
        try:
            template = self.get_template(name)
            out: list[str] = []
            size = 0
            deadline = time.monotonic() + timeout
            for chunk in template.generate(dict(variables)):
                size += len(chunk)
                if size > max_output_size:
                    raise LimitExceeded(f"output is over the limit of {max_output_size} characters")
                if time.monotonic() > deadline:
                    raise LimitExceeded("rendering took too long")
                out.append(chunk)
            return "".join(out)
        finally:
            _BUDGET.reset(token)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        self.parse_count += 1
        ast = super()._parse(source, name, filename)
        _reject_private_access(ast, name, filename)
        _Bounder().generic_visit(ast)  # rewrites the tree in place; the root stays a Template
        return ast

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        limit = _max_size()
        if operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and max(left.bit_length(), 1) * right > 64 * 1024:
                raise LimitExceeded(f"{left} ** {right} is too large")
        elif operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > 64 * 1024:
                    raise LimitExceeded("integer product is too large")
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > limit:
                    raise LimitExceeded("repetition would exceed the output limit")
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                if len(left) + len(right) > limit:
                    raise LimitExceeded("concatenation would exceed the output limit")
        elif operator == "%":
            _check_format_string(left, "string formatting")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        what = getattr(__obj, "__name__", "call")
        if what in _SIZING_METHODS:
            _check_args(args, what)
            _check_args(kwargs.values(), what)
        if what == "replace" and isinstance(getattr(__obj, "__self__", None), str) and len(args) >= 2:
            s, old, new = __obj.__self__, args[0], args[1]
            if isinstance(old, str) and isinstance(new, str):
                count = (len(s) + 1) if old == "" else s.count(old)
                if len(s) + count * max(len(new) - len(old), 0) > _max_size():
                    raise LimitExceeded("replace() would exceed the output limit")
        return _check_size(super().call(__context, __obj, *args, **kwargs), what)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format_string(value.__self__, "str.format")
        return wrapped


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """Filters run outside ``Sandbox.call``; give them the same argument/result bounds."""

    @functools.wraps(func)  # copies jinja_pass_arg, so pass_context filters still work
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if name in _SIZING_FILTERS:
            _check_args(args, f"filter {name}")
            _check_args(kwargs.values(), f"filter {name}")
        if name == "format" and args:
            _check_format_string(args[0], "filter format")
        return _check_size(func(*args, **kwargs), f"filter {name}")

    return guarded

