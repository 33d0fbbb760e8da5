"""Template rendering: subject, HTML and text parts of one message.

Templates come from untrusted customers; they are compiled and run in the
bounded sandbox of :mod:`engine.compose.sandbox` (escapes refused at parse
time, loops, sizes and time bounded at render time). This module names,
loads, validates and renders them, and turns every failure into a
:class:`TemplateError` that says which template, part and line. A missing
text part is derived from the HTML (:mod:`engine.compose.text`).

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

import re
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
from pydantic import BaseModel, ConfigDict, Field

from engine.compose.sandbox import LimitExceeded, Sandbox
from engine.compose.text import html_to_text
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


# --------------------------------------------------------------------------- loader


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

    def __init__(
        self, config: TemplateConfig | None = None, store: TemplateStore | None = None,
        engine_variables: frozenset[str] = frozenset(),
    ) -> None:
        self.config = config or TemplateConfig()
        self.store = store
        self.engine_variables = engine_variables
        """Variables the engine supplies at send time (``unsubscribe_url``): never asked of a submission."""
        self._file_cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._loader = _Loader(
            Path(self.config.directory), store, self.config.max_part_size, self.config.reload_check_interval
        )
        self.env = Sandbox(
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
        return required - self.engine_variables

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
        try:
            return self.env.render_bounded(
                jname, variables, max_iterations=cfg.max_loop_iterations, timeout=cfg.render_timeout,
                max_output_size=cfg.max_output_size,
            )
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
        except LimitExceeded as exc:
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
