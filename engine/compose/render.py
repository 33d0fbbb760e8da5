"""Sandboxed template rendering: subject, HTML and text parts of one message.

Templates come from untrusted customers, so everything runs in Jinja2's
``ImmutableSandboxedEnvironment`` with ``StrictUndefined`` and extra bounds:

* parse time: attribute/item access to names starting with ``_`` is refused
  with the line number (``''.__class__``, ``cycler.__init__.__globals__``,
  ``self._TemplateReference__context``), so an escape attempt never compiles;
* render time: the sandbox blocks unsafe attributes and callables, ``range``
  is capped at ``MAX_RANGE``, every ``{% for %}`` draws from a per-render
  iteration budget and deadline, ``*``/``**``/``+``/``~``, filters and calls
  refuse results larger than the output cap, and the output itself is
  streamed and cut at ``max_output_size``.

Compiled templates are cached by the Jinja environment (keyed by name and,
for uploaded templates, version: versions are immutable), so a batch of one
template with per-recipient variables parses once.

Template names: ``welcome`` (latest uploaded version, else the file template
in ``templates/welcome/``) or ``welcome@3`` (uploaded version 3). Inside
Jinja the parts are ``welcome/html.html`` (files) or ``welcome@3/html.html``
(uploads); uploads may extend or include file layouts such as
``base/html.html`` and pinned uploads like ``layout@2/html.html``.
"""

from __future__ import annotations

import contextvars
import functools
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Protocol

from jinja2 import (
    BaseLoader,
    FileSystemLoader,
    StrictUndefined,
    TemplateNotFound,
    TemplateSyntaxError,
    UndefinedError,
    meta,
    nodes,
    select_autoescape,
)
from jinja2.exceptions import SecurityError, TemplateRuntimeError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer
from pydantic import BaseModel, ConfigDict, Field

from engine.configtypes import Duration, Size
from engine.errors import ValidationFailed

PARTS: dict[str, str] = {"subject": "subject.txt", "html": "html.html", "text": "text.txt"}
"""Part name -> file name inside a template folder (and inside Jinja)."""
_FILE_TO_PART = {v: k for k, v in PARTS.items()}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
_REF_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_-]{0,99})(?:@(?P<version>[0-9]{1,9}))?$")
_STORE_PREFIX = "template:"
# Names Jinja itself provides inside a template; never "required" from the caller.
_SPECIAL_NAMES = frozenset({"self", "loop", "super", "varargs", "kwargs", "caller"})


class TemplateConfig(BaseModel):
    """``[templates]``: where file templates live and how far rendering may go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    directory: Path = Field(default=Path("templates"), description="Folder of file templates.")
    max_part_size: Size = Field(default=512 * 1024, description="Largest source of one part.")
    max_output_size: Size = Field(default=5 * 1024 * 1024, description="Largest rendered part (characters).")
    max_loop_iterations: int = Field(default=200_000, ge=1, description="All {% for %} iterations of one render.")
    render_timeout: Duration = Field(default=5.0, description="Checked cooperatively in loops and output.")
    cache_size: int = Field(default=1000, ge=0, description="Compiled templates kept in memory.")
    reload_check_interval: Duration = Field(
        default=1.0, description="File templates are checked for edits at most this often (0: on every render)."
    )


class TemplateError(ValidationFailed):
    """A template cannot be stored or rendered; says which template, part and line.

    A subclass of ValidationFailed so the API layer answers 422 with no extra
    mapping. ``variable`` is set when a variable is missing.
    """

    def __init__(
        self,
        message: str,
        *,
        template: str | None = None,
        part: str | None = None,
        line: int | None = None,
        variable: str | None = None,
    ) -> None:
        where = ", ".join(
            x for x in (
                f"template {template!r}" if template else "",
                f"part {part!r}" if part else "",
                f"line {line}" if line else "",
            ) if x
        )
        full = f"{where}: {message}" if where else message
        super().__init__(full, field=f"variables.{variable}" if variable else "template")
        self.template = template
        self.part = part
        self.line = line
        self.variable = variable


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    html: str | None
    text: str


# --------------------------------------------------------------------------- store


class TemplateStore(Protocol):
    """Uploaded templates: immutable ``(name, version) -> parts``.

    Synchronous on purpose: rendering is synchronous. A database-backed store
    keeps an in-memory copy refreshed when the API stores a version (versions
    never change, so a copy is never stale, only possibly incomplete).
    """

    def get(self, name: str, version: int) -> Mapping[str, str] | None: ...

    def latest_version(self, name: str) -> int | None: ...


class InMemoryTemplateStore:
    """A dict ``(name, version) -> parts`` plus the latest version per name."""

    def __init__(self) -> None:
        self._parts: dict[tuple[str, int], dict[str, str]] = {}
        self._latest: dict[str, int] = {}
        self._lock = threading.Lock()

    def put(self, name: str, parts: Mapping[str, str], version: int | None = None) -> int:
        """Store a new version (next number unless given) and return it. Versions are immutable."""
        if not _NAME_RE.match(name):
            raise TemplateError("name must match [A-Za-z0-9][A-Za-z0-9_-]{0,99}", template=name)
        with self._lock:
            if version is None:
                version = self._latest.get(name, 0) + 1
            if (name, version) in self._parts:
                raise TemplateError(f"version {version} already exists", template=name)
            self._parts[(name, version)] = dict(parts)
            self._latest[name] = max(version, self._latest.get(name, 0))
            return version

    def get(self, name: str, version: int) -> Mapping[str, str] | None:
        return self._parts.get((name, version))

    def latest_version(self, name: str) -> int | None:
        return self._latest.get(name)

    def __len__(self) -> int:
        return len(self._parts)


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
            raise _LimitExceeded("too many loop iterations (the render's loop budget is spent)")
        if self.iterations % 1024 == 0 and time.monotonic() > self.deadline:
            raise _LimitExceeded("rendering took too long")


class _LimitExceeded(Exception):
    """Internal: a render bound was hit; turned into TemplateError by the caller."""


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("render_budget", default=None)
_DEFAULT_MAX = 5 * 1024 * 1024


def _max_size() -> int:
    b = _BUDGET.get()
    return b.max_size if b is not None else _DEFAULT_MAX


def _check_size(value: Any, what: str) -> Any:
    if isinstance(value, (str, bytes, list, tuple)) and len(value) > _max_size():
        raise _LimitExceeded(f"{what} would produce {len(value)} items, over the output limit")
    return value


# Callables whose integer arguments are output sizes (widths, counts): a huge one allocates at once.
_SIZING_FILTERS = frozenset({"center", "indent", "slice"})
_SIZING_METHODS = frozenset({"ljust", "rjust", "center", "zfill", "expandtabs"})


def _check_args(args: Iterable[Any], what: str) -> None:
    limit = _max_size()
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > limit:
            raise _LimitExceeded(f"{what}: number {a} is over the output limit")


_FORMAT_NUM_RE = re.compile(r"\d{4,}")


def _check_format_string(fmt: Any, what: str) -> None:
    """A width like ``{:>999999999}`` or ``%999999999d`` allocates before any check could run."""
    if isinstance(fmt, str):
        limit = _max_size()
        for m in _FORMAT_NUM_RE.finditer(fmt):
            if int(m.group()) > limit:
                raise _LimitExceeded(f"{what}: format width {m.group()} is over the output limit")


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
        node = self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, "_engine_loop_guard", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
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


class _Sandbox(ImmutableSandboxedEnvironment):
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

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        self.parse_count += 1
        ast = super()._parse(source, name, filename)
        _reject_private_access(ast, name, filename)
        return _Bounder().visit(ast)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        limit = _max_size()
        if operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and max(left.bit_length(), 1) * right > 64 * 1024:
                raise _LimitExceeded(f"{left} ** {right} is too large")
        elif operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > 64 * 1024:
                    raise _LimitExceeded("integer product is too large")
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > limit:
                    raise _LimitExceeded("repetition would exceed the output limit")
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                if len(left) + len(right) > limit:
                    raise _LimitExceeded("concatenation would exceed the output limit")
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
                    raise _LimitExceeded("replace() would exceed the output limit")
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


def _throttled(check: Callable[[], bool], interval: float) -> Callable[[], bool]:
    """A file template's "is it unchanged?" check, run at most once per ``interval``.

    Jinja asks on every render; a stat() per part per message showed up as 13% of the
    listener's time in the end-to-end benchmark. An edited file is still picked up
    within a second.
    """
    if interval <= 0:
        return check
    last = [time.monotonic()]

    def check_now() -> bool:
        now = time.monotonic()
        if now - last[0] < interval:
            return True
        last[0] = now
        return check()

    return check_now


class _Loader(BaseLoader):
    """Files under ``templates/`` plus uploaded versions (``name@N/part``)."""

    def __init__(self, directory: Path, store: TemplateStore | None, max_part_size: int, check_interval: float = 1.0) -> None:
        self.check_interval = check_interval
        self.directory = directory
        self.files = FileSystemLoader(str(directory))
        self.store = store
        self.max_part_size = max_part_size

    def get_source(self, environment: Any, template: str) -> tuple[str, str | None, Callable[[], bool] | None]:
        head, _, rest = template.partition("/")
        if "@" in head:
            m = _REF_RE.match(head)
            part = _FILE_TO_PART.get(rest)
            if not m or part is None or self.store is None:
                raise TemplateNotFound(template)
            parts = self.store.get(m["name"], int(m["version"]))
            if parts is None or not isinstance(parts.get(part), str):
                raise TemplateNotFound(template)
            source, filename, uptodate = parts[part], _STORE_PREFIX + template, (lambda: True)
        else:
            source, filename, uptodate = self.files.get_source(environment, template)
            uptodate = _throttled(uptodate, self.check_interval) if uptodate is not None else None
        if len(source) > self.max_part_size:
            raise TemplateError(
                f"source is {len(source)} characters, over the limit of {self.max_part_size}",
                template=template,
            )
        return source, filename, uptodate


# --------------------------------------------------------------------------- renderer


class Renderer:
    """Validate, inspect and render templates. Thread-safe; one per process."""

    def __init__(self, config: TemplateConfig | None = None, store: TemplateStore | None = None) -> None:
        self.config = config or TemplateConfig()
        self.store = store
        self._file_cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._loader = _Loader(
            Path(self.config.directory), store, self.config.max_part_size, self.config.reload_check_interval
        )
        self.env = _Sandbox(
            loader=self._loader,
            undefined=StrictUndefined,
            autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False, default=False),
            cache_size=self.config.cache_size,
            auto_reload=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._required_cache: dict[str, tuple[frozenset[str], tuple[Callable[[], bool], ...]]] = {}

    # ---- naming

    def resolve(self, ref: str) -> str:
        """``name`` or ``name@version`` -> the Jinja folder prefix (``name`` or ``name@N``)."""
        m = _REF_RE.match(ref or "")
        if not m:
            raise TemplateError("a template is addressed as 'name' or 'name@version'", template=ref)
        name, version = m["name"], m["version"]
        if version is not None:
            if self.store is None or self.store.get(name, int(version)) is None:
                raise TemplateError("no such template version", template=ref)
            return f"{name}@{int(version)}"
        latest = self.store.latest_version(name) if self.store is not None else None
        if latest is not None:
            return f"{name}@{latest}"
        if self._file_parts(name):
            return name
        raise TemplateError("no such template", template=ref)

    def _file_parts(self, name: str) -> frozenset[str]:
        """Which parts a file template has (none: no such file template), re-checked once a second."""
        now = time.monotonic()
        hit = self._file_cache.get(name)
        if hit is not None and now - hit[0] < self.config.reload_check_interval:
            return hit[1]
        folder = Path(self.config.directory) / name
        present = frozenset(p for p, f in PARTS.items() if (folder / f).is_file())
        if "subject" not in present:
            present = frozenset()
        if len(self._file_cache) > 10_000:
            self._file_cache.clear()
        self._file_cache[name] = (now, present)
        return present

    def _parts_of(self, prefix: str) -> dict[str, str]:
        """Part name -> Jinja name for the parts this template has."""
        if "@" in prefix:
            n, v = prefix.split("@")
            parts = self.store.get(n, int(v)) if self.store is not None else None
            present = set(parts or {})
        else:
            present = set(self._file_parts(prefix))
        return {p: f"{prefix}/{PARTS[p]}" for p in PARTS if p in present}

    # ---- validation

    def validate_template(self, name: str, parts: Mapping[str, Any]) -> None:
        """Check an upload before it is stored: shape, size, syntax, escapes, references."""
        if not _NAME_RE.match(name or ""):
            raise TemplateError("name must match [A-Za-z0-9][A-Za-z0-9_-]{0,99}", template=name)
        if not isinstance(parts, Mapping):
            raise TemplateError("parts must be an object of part name -> source", template=name)
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise TemplateError(f"unknown parts {sorted(unknown)}; allowed: {sorted(PARTS)}", template=name)
        if not isinstance(parts.get("subject"), str):
            raise TemplateError("a 'subject' part is required", template=name)
        if not isinstance(parts.get("html"), str) and not isinstance(parts.get("text"), str):
            raise TemplateError("an 'html' or a 'text' part is required", template=name)
        for part, source in parts.items():
            if not isinstance(source, str):
                raise TemplateError("source must be a string", template=name, part=part)
            if len(source) > self.config.max_part_size:
                raise TemplateError(
                    f"source is {len(source)} characters, over the limit of {self.config.max_part_size}",
                    template=name, part=part,
                )
            jname = f"{name}@pending/{PARTS[part]}"
            try:
                self.env.compile(source, jname, _STORE_PREFIX + jname)
                ast = self.env.parse(source, jname)
            except TemplateSyntaxError as exc:
                raise TemplateError(exc.message or str(exc), template=name, part=part, line=exc.lineno) from None
            for ref in meta.find_referenced_templates(ast):
                if ref is None:
                    continue
                try:
                    self._loader.get_source(self.env, ref)
                except TemplateNotFound:
                    raise TemplateError(f"refers to unknown template {ref!r}", template=name, part=part) from None

    # ---- variables

    def required_variables(self, ref: str) -> set[str]:
        """Variables a submission must supply for ``ref`` (following extends/include/import).

        A variable the template tests with ``is defined`` or passes through
        ``default`` anywhere counts as optional.
        """
        prefix = self.resolve(ref)
        required: set[str] = set()
        for jname in self._parts_of(prefix).values():
            required |= self._required_for(jname, frozenset())
        return required

    def _required_for(self, jname: str, seen: frozenset[str]) -> frozenset[str]:
        """Required names of one Jinja template and everything it references, cached.

        The cache entry keeps the ``uptodate`` checks of every file involved, so
        an edited file template (or layout) is re-read; uploads never change.
        """
        cached = self._required_cache.get(jname)
        if cached is not None and all(check() for check in cached[1]):
            return cached[0]
        if jname in seen:
            return frozenset()
        try:
            source, filename, uptodate = self._loader.get_source(self.env, jname)
            ast = self.env.parse(source, jname, filename)
        except TemplateNotFound:
            raise TemplateError(f"refers to unknown template {jname!r}", template=jname) from None
        except TemplateSyntaxError as exc:
            raise TemplateError(exc.message or str(exc), template=jname, line=exc.lineno) from None
        names = meta.find_undeclared_variables(ast) - set(self.env.globals) - _SPECIAL_NAMES
        result = set(names - _optional_names(ast))
        checks: list[Callable[[], bool]] = [uptodate] if uptodate is not None else []
        for ref in meta.find_referenced_templates(ast):
            if ref is not None:
                result |= self._required_for(ref, seen | {jname})
                if ref in self._required_cache:
                    checks.extend(self._required_cache[ref][1])
        frozen = frozenset(result)
        self._required_cache[jname] = (frozen, tuple(checks))
        return frozen

    def missing_variables(self, ref: str, variables: Mapping[str, Any]) -> list[str]:
        """Sorted required variables absent from ``variables`` (for a 422 at submit)."""
        return sorted(self.required_variables(ref) - set(variables))

    def check_variables(self, ref: str, variables: Mapping[str, Any]) -> None:
        missing = self.missing_variables(ref, variables)
        if missing:
            raise TemplateError(
                f"missing variable {missing[0]!r}" + (f" (and {missing[1:]})" if len(missing) > 1 else ""),
                template=ref, variable=missing[0],
            )

    # ---- rendering

    def render(self, ref: str, variables: Mapping[str, Any]) -> Rendered:
        """Render all parts of ``ref``. The text part is derived from HTML when absent."""
        prefix = self.resolve(ref)
        parts = self._parts_of(prefix)
        if "subject" not in parts:
            raise TemplateError("template has no subject part", template=ref)
        if "html" not in parts and "text" not in parts:
            raise TemplateError("template has neither an html nor a text part", template=ref)
        subject = " ".join(self._render_part(ref, "subject", parts["subject"], variables).split())
        html = self._render_part(ref, "html", parts["html"], variables) if "html" in parts else None
        if "text" in parts:
            text = self._render_part(ref, "text", parts["text"], variables)
        else:
            text = html_to_text(html or "")
        return Rendered(subject=subject, html=html, text=text)

    def _render_part(self, ref: str, part: str, jname: str, variables: Mapping[str, Any]) -> str:
        cfg = self.config
        token = _BUDGET.set(_Budget(cfg.max_loop_iterations, cfg.render_timeout, cfg.max_output_size))
        try:
            template = self.env.get_template(jname)
            out: list[str] = []
            size = 0
            deadline = time.monotonic() + cfg.render_timeout
            for chunk in template.generate(dict(variables)):
                size += len(chunk)
                if size > cfg.max_output_size:
                    raise _LimitExceeded(f"output is over the limit of {cfg.max_output_size} characters")
                if time.monotonic() > deadline:
                    raise _LimitExceeded("rendering took too long")
                out.append(chunk)
            return "".join(out)
        except TemplateError:
            raise
        except TemplateSyntaxError as exc:
            raise TemplateError(exc.message or str(exc), template=exc.name or ref, part=part, line=exc.lineno) from None
        except TemplateNotFound as exc:
            raise TemplateError(f"refers to unknown template {exc.name!r}", template=ref, part=part) from None
        except UndefinedError as exc:
            var = _undefined_name(str(exc))
            if var is None:
                raise TemplateError(str(exc), template=ref, part=part, line=_template_line(exc)) from None
            raise TemplateError(
                f"variable {var!r} is undefined", template=ref, part=part, line=_template_line(exc), variable=var
            ) from None
        except SecurityError as exc:
            raise TemplateError(f"unsafe operation: {exc}", template=ref, part=part, line=_template_line(exc)) from None
        except _LimitExceeded as exc:
            raise TemplateError(f"render limit: {exc}", template=ref, part=part, line=_template_line(exc)) from None
        except OverflowError as exc:
            raise TemplateError(f"render limit: {exc}", template=ref, part=part, line=_template_line(exc)) from None
        except RecursionError:
            raise TemplateError("render limit: recursion too deep", template=ref, part=part) from None
        except MemoryError:
            raise TemplateError("render limit: out of memory", template=ref, part=part) from None
        except (TemplateRuntimeError, ArithmeticError, TypeError, ValueError, LookupError, AttributeError) as exc:
            raise TemplateError(
                f"{type(exc).__name__}: {exc}", template=ref, part=part, line=_template_line(exc)
            ) from None
        finally:
            _BUDGET.reset(token)


def merge_vars(message_vars: Mapping[str, Any] | None, recipient_vars: Mapping[str, Any] | None) -> dict[str, Any]:
    """Per-recipient variables win over message variables (shallow: a key is replaced whole)."""
    return {**(message_vars or {}), **(recipient_vars or {})}


_UNDEF_RE = re.compile(r"^'([^']+)' is undefined$")


def _undefined_name(message: str) -> str | None:
    """The variable named by a StrictUndefined error; None for a missing attribute/key of a value."""
    m = _UNDEF_RE.match(message)
    return m.group(1) if m else None


def _template_line(exc: BaseException) -> int | None:
    """Jinja rewrites tracebacks so template frames carry the template's line number."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        fn = frame.filename or ""
        if fn.startswith(_STORE_PREFIX) or fn.endswith((".html", ".txt")):
            line = frame.lineno
    return line


def _optional_names(ast: nodes.Template) -> set[str]:
    """Names the author guards with ``is defined`` / ``is undefined`` / ``|default``."""
    out: set[str] = set()
    for node in ast.find_all((nodes.Test, nodes.Filter)):
        guarded = (isinstance(node, nodes.Test) and node.name in ("defined", "undefined")) or (
            isinstance(node, nodes.Filter) and node.name in ("default", "d")
        )
        if guarded and isinstance(node.node, nodes.Name):
            out.add(node.node.name)
    return out


# --------------------------------------------------------------------------- html -> text

_BLOCKS = frozenset(
    "address article aside blockquote dd div dl dt fieldset figcaption figure footer form h1 h2 h3 h4 h5 h6 "
    "header hr li main nav ol p pre section table tbody thead tfoot tr ul".split()
)
_SKIP = frozenset({"script", "style", "head", "title", "template"})
_PARAGRAPHS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote", "ul", "ol", "dl"})
_SPACES_RE = re.compile(r"[ \t\n\r\f\v]+")  # not \s: a no-break space is content


class _TextExtractor(HTMLParser):
    """Collects text; block elements become line breaks, links become ``text (url)``.

    Line breaks are kept *pending* and only written before the next visible
    text, so nested blocks (``<td><p>``) never pile up blank lines.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0
        self.pre = 0
        self.pending = 0  # newlines owed before the next text
        self.at_line_start = True
        self.links: list[tuple[str, int]] = []  # (href, len(out) when <a> opened)

    def _break(self, count: int) -> None:
        if self.out:
            self.pending = max(self.pending, count)

    def _emit(self, text: str) -> None:
        if self.pending:
            if self.out:
                self.out[-1] = self.out[-1].rstrip(" ")
            self.out.append("\n" * self.pending)
            self.pending = 0
            self.at_line_start = True
        if self.at_line_start and not self.pre:
            text = text.lstrip(" ")
            if not text:
                return
        self.out.append(text)
        self.at_line_start = text.endswith("\n")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self.skip += 1
            return
        if tag == "br":
            self._emit("\n")  # explicit: a <br> is a line break even between two texts
        elif tag == "pre":
            self.pre += 1
            self._break(2)
        elif tag == "li":
            self._break(1)
            self._emit("- ")
        elif tag in ("td", "th"):
            self._emit(" ")
        elif tag == "hr":
            self._break(1)
            self._emit("----")
            self._break(1)
        elif tag in _BLOCKS:
            self._break(2 if tag in _PARAGRAPHS else 1)
        if tag == "a":
            href = (dict(attrs).get("href") or "").strip()
            self.links.append((href, len(self.out)))
        elif tag == "img":
            alt = (dict(attrs).get("alt") or "").strip()
            if alt:
                self._emit(alt)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in ("br", "hr", "img"):
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
            self._break(2)
        elif tag == "a" and self.links:
            href, start = self.links.pop()
            label = " ".join("".join(self.out[start:]).split())
            if href and not href.startswith("#") and label != href and href.removeprefix("mailto:") != label:
                self._emit(f" ({href})" if label else href)
        elif tag in _BLOCKS and tag != "li":
            self._break(2 if tag in _PARAGRAPHS else 1)

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        if self.pre:
            self._emit(data)
            return
        text = _SPACES_RE.sub(" ", data)
        if text.strip(" "):
            self._emit(text)
        elif self.out and not self.at_line_start and not self.pending:
            self._emit(" ")

    def text(self) -> str:
        text = "".join(self.out)
        text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
        return text + "\n" if text else ""


def html_to_text(html: str) -> str:
    """A readable plain-text version of an HTML body: paragraphs, list dashes, ``text (url)``."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return parser.text()
