"""The Jinja2 sandbox untrusted templates run in, and the bounds that keep a render small.

Templates come from customers, so everything runs in Jinja2's
``ImmutableSandboxedEnvironment`` (with ``StrictUndefined``, set by the renderer)
plus extra bounds:

* parse time: attribute/item access to names starting with ``_`` is refused
  with the line number (``''.__class__``, ``cycler.__init__.__globals__``,
  ``self._TemplateReference__context``), so an escape attempt never compiles;
* render time: the sandbox blocks unsafe attributes and callables, ``range``
  is capped at ``MAX_RANGE``, every ``{% for %}`` draws from a per-render
  iteration budget and deadline, and the output itself is streamed and cut at
  the output limit (:func:`render_bounded`);
* before anything is built: ``*``/``**``/``+``/``%``/``~``, the filters and str
  methods that can amplify (``join``, ``replace``, ``indent``, ``wordwrap``,
  ``format``, ``urlize``, ``batch``, ``tojson``, ``expandtabs``, ``split`` ...),
  anything that turns a container into text (output, ``string``, ``~``) and the
  buffers of macros, blocks and ``{% set %}`` blocks have their result size
  projected (:mod:`engine.compose.projection`) and refused when the projection
  is over the output cap, so a hostile template never allocates much more than
  the cap; results are measured again afterwards.

A bound that is hit raises :class:`LimitExceeded`; the renderer turns it into a
``TemplateError`` that names the template, part and line.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from jinja2 import TemplateSyntaxError, nodes
from jinja2.nodes import EvalContext
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg, pass_eval_context
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

from engine.compose import projection as proj

# --------------------------------------------------------------------------- budget


class _Budget:
    """Per-render limits shared by loops, operators, filters and output."""

    __slots__ = ("iterations", "deadline", "max_size", "produced")

    def __init__(self, iterations: int, timeout: float, max_size: int) -> None:
        self.iterations = iterations
        self.deadline = time.monotonic() + timeout
        self.max_size = max_size
        self.produced = 0  # characters all {{ }} expressions produced, streamed or buffered

    def produce(self, size: int) -> None:
        """Macro, call and ``{% set %}`` bodies buffer their output, out of reach of the streamed-output cap;
        each ``{{ expression }}`` may build a fresh (escaped) copy there, so all of them share one budget."""
        self.produced += size
        if self.produced > PRODUCED_FACTOR * self.max_size:
            raise LimitExceeded(
                f"the template's expressions produced over {PRODUCED_FACTOR} x the output limit of {self.max_size}"
                " characters (macros, blocks and set bodies included)"
            )

    def tick(self) -> None:
        self.iterations -= 1
        if self.iterations < 0:
            raise LimitExceeded("too many loop iterations (the render's loop budget is spent)")
        if self.iterations % 1024 == 0 and time.monotonic() > self.deadline:
            raise LimitExceeded("rendering took too long")


class LimitExceeded(Exception):
    """A render bound was hit (loop budget, deadline, size); the renderer turns it into a TemplateError."""


PRODUCED_FACTOR = 2
"""All ``{{ }}`` output of one render, buffered or streamed, may total this many times the output cap."""

_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("render_budget", default=None)
_DEFAULT_MAX = 5 * 1024 * 1024


def _max_size() -> int:
    b = _BUDGET.get()
    return b.max_size if b is not None else _DEFAULT_MAX


def _check_size(value: Any, what: str) -> Any:
    if isinstance(value, (str, bytes, list, tuple)) and len(value) > _max_size():
        raise LimitExceeded(f"{what} would produce {len(value)} items, over the output limit")
    return value


def _ensure(projected: int | None, what: str) -> None:
    """Refuse an operation whose projected result is over the cap, before it is built."""
    limit = _max_size()
    if projected is not None and projected > limit:
        raise LimitExceeded(f"{what} would produce about {projected} characters, over the output limit of {limit}")


def _ensure_text(value: Any, what: str) -> None:
    """Turning a container into text (``str()``, JSON) prints every item: refuse when that is over the cap."""
    if not isinstance(value, str):
        _ensure(proj.weight(value, _max_size()), what)


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


@pass_eval_context
def _concat_guard(eval_ctx: EvalContext, operands: tuple[Any, ...]) -> str:
    """``a ~ b ~ c`` as Jinja compiles it (``markup_join``/``str_join``), sized before joining."""
    limit = _max_size()
    total = 0
    for op in operands:
        total += proj.text_size(op, limit)
        _ensure(total, "concatenation (~)")
    return markup_join(operands) if eval_ctx.autoescape else str_join(operands)


def _bounded_concat(parts: Iterable[str]) -> str:
    """The ``concat`` of macro, block, call and ``{% set %}`` buffers: they are not streamed, so count them."""
    limit = _max_size()
    out: list[str] = []
    total = 0
    for part in parts:
        total += len(part)
        if total > limit:
            raise LimitExceeded(f"a macro, block or set body is over the output limit of {limit} characters")
        out.append(part)
    return "".join(out)


@pass_eval_context
def _finalize(eval_ctx: EvalContext, value: Any) -> Any:
    """Every ``{{ expression }}`` passes here before ``str()``/escaping.

    A list of 10^6 references to one big string is tiny in memory and gigabytes
    as text, so containers are sized first; the (escaped) size is charged to
    the render's production budget.
    """
    limit = _max_size()
    size = len(value) if isinstance(value, str) else proj.weight(value, limit)
    _ensure(size, "output of a container")
    if eval_ctx.autoescape and isinstance(value, str) and not isinstance(value, Markup):
        size += sum(value.count(c) for c in "&<>\"'") * (proj.ESCAPE_GROWTH - 1)
    budget = _BUDGET.get()
    if budget is not None:
        budget.produce(size)
    return value


class _Bounder(NodeTransformer):
    """Wrap every for-loop iterable in the loop guard and turn every ``~`` into a sized join."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)  # rewrites the children in place
        node.iter = nodes.Filter(node.iter, "_engine_loop_guard", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        operands = nodes.Tuple(node.nodes, "load", lineno=node.lineno)
        return nodes.Filter(operands, "_engine_concat", [], [], None, None, lineno=node.lineno)


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
    concat = staticmethod(_bounded_concat)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("finalize", _finalize)
        super().__init__(*args, **kwargs)
        self.parse_count = 0  # how many sources were compiled: proves the cache works
        self.globals.pop("lipsum", None)  # lipsum(n=10**6) builds megabytes in one call; no use in mail
        for fname, func in list(self.filters.items()):
            self.filters[fname] = _guard_filter(fname, func)
        self.filters["_engine_loop_guard"] = _loop_guard
        self.filters["_engine_concat"] = _concat_guard

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
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and not isinstance(n, bool):
                    if n > limit:
                        raise LimitExceeded("repetition would exceed the output limit")
                    _ensure(proj.repeat_size(seq, n, limit), "repetition (*)")
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                if len(left) + len(right) > limit:
                    raise LimitExceeded("concatenation would exceed the output limit")
                _ensure(proj.text_size(left, limit) + proj.text_size(right, limit), "concatenation (+)")
        elif operator == "%" and isinstance(left, str):
            _check_format_string(left, "string formatting")
            values = right.values() if isinstance(right, Mapping) else right if isinstance(right, tuple) else (right,)
            _ensure(proj.format_size(left, values, limit), "string formatting (%)")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        what = getattr(__obj, "__name__", "call")
        if what in _SIZING_METHODS:
            _check_args(args, what)
            _check_args(kwargs.values(), what)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            if what == "join" and len(args) == 1 and not kwargs:
                items = list(args[0])  # a generator is consumed once: size it, then join the same items
                _ensure(proj.join_size(items, owner, _max_size()), "str.join()")
                args = (items,)
            elif what in proj.STR_METHODS:
                _ensure(proj.STR_METHODS[what](owner, args, kwargs), f"str.{what}()")
        return _check_size(super().call(__context, __obj, *args, **kwargs), what)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt: str = value.__self__
        _check_format_string(fmt, "str.format")
        is_map = value.__name__ == "format_map"

        def bounded(*args: Any, **kwargs: Any) -> str:
            values = list(args[0].values()) if is_map and args and isinstance(args[0], Mapping) else [
                *args, *kwargs.values()
            ]
            _ensure(proj.format_size(fmt, values, _max_size()), f"str.{value.__name__}()")
            return wrapped(*args, **kwargs)

        return bounded


# --------------------------------------------------------------------------- filters

# Filters that turn their first argument into text: a container is sized before it is printed.
_TEXT_FILTERS = frozenset({
    "capitalize", "center", "e", "escape", "forceescape", "format", "indent", "lower", "pprint", "replace", "safe",
    "string", "striptags", "title", "tojson", "trim", "truncate", "upper", "urlencode", "urlize", "wordcount",
    "wordwrap", "xmlattr", "join",
})

_Args = dict[str, Any]
_PASS_ARG_NAMES = frozenset({"eval_ctx", "environment", "env", "context"})


def _autoescape(a: _Args) -> bool:
    ctx = a.get("eval_ctx")
    return bool(getattr(ctx, "autoescape", False))


def _urlencode_size(value: Any, limit: int) -> int:
    if isinstance(value, str):
        return len(value) * (3 if value.isascii() else 12)  # %XX per UTF-8 byte
    return 3 * proj.weight(value, limit)


def _int(x: Any, default: int = 0) -> int:
    return x if isinstance(x, int) and not isinstance(x, bool) else default


# name -> (bound arguments, limit) -> projected size of the result
_FILTER_SIZES: dict[str, Callable[[_Args, int], int | None]] = {
    "replace": lambda a, lim: proj.replace_size(
        str(a["s"]), str(a["old"]), str(a["new"]), a["count"], _autoescape(a)
    ),
    "indent": lambda a, lim: proj.indent_size(str(a["s"]), a["width"]),
    "wordwrap": lambda a, lim: proj.wordwrap_size(str(a["s"]), a["width"], a["wrapstring"]),
    "format": lambda a, lim: proj.format_size(str(a["value"]), [*a["args"], *a["kwargs"].values()], lim),
    "urlize": lambda a, lim: proj.urlize_size(str(a["value"]), a["target"], a["rel"]),
    "center": lambda a, lim: max(len(str(a["value"])), _int(a["width"])),
    "batch": lambda a, lim: _int(a["linecount"]) * (
        proj.ITEM_COST + (0 if a["fill_with"] is None else proj.weight(a["fill_with"], lim))
    ),
    "slice": lambda a, lim: _int(a["slices"]) * (
        proj.ITEM_COST + (0 if a["fill_with"] is None else proj.weight(a["fill_with"], lim))
    ),
    "tojson": lambda a, lim: proj.weight(a["value"], lim, indent=_int(a["indent"])),
    "pprint": lambda a, lim: proj.weight(a["value"], lim, indent=1),
    "list": lambda a, lim: proj.sized_list(a["value"]),
    "urlencode": lambda a, lim: _urlencode_size(a["value"], lim),
}


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """Filters run outside ``Sandbox.call``: project their result size before they run, measure it after.

    Only the filters that stringify or amplify bind their arguments (a few
    microseconds); ``length``, ``first`` and the like run untouched.
    """
    sizer = _FILTER_SIZES.get(name)
    sig = inspect.signature(func) if (sizer is not None or name in _TEXT_FILTERS) else None
    params = list(sig.parameters) if sig is not None else []
    named_pass_arg = bool(params) and params[0] in _PASS_ARG_NAMES
    # async_variant filters (list, join, sum ...) receive an eval_ctx their wrapped signature does not show
    hidden_pass_arg = _PassArg.from_obj(func) is not None and not named_pass_arg
    value_name = params[1 if named_pass_arg else 0] if params else ""

    @functools.wraps(func)  # copies jinja_pass_arg, so pass_context filters still work
    def guarded(*args: Any, **kwargs: Any) -> Any:
        what = f"filter {name}"
        if name in _SIZING_FILTERS:
            _check_args(args, what)
            _check_args(kwargs.values(), what)
        if name == "format" and args:
            _check_format_string(args[0], "filter format")
        if sig is None:
            return _check_size(func(*args, **kwargs), what)
        head, rest = (args[:1], args[1:]) if hidden_pass_arg else ((), args)
        bound = sig.bind(*rest, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if name == "join":
            a[value_name] = items = list(a[value_name])  # consumed once: size it, then join the same items
            _ensure(proj.join_size(items, a["d"], _max_size()), what)
        else:
            if name in _TEXT_FILTERS:
                _ensure_text(a[value_name], what)
            if sizer is not None:
                _ensure(sizer(a, _max_size()), what)
        return _check_size(func(*head, *bound.args, **bound.kwargs), what)

    return guarded

