"""Uploaded templates in Postgres, mirrored in memory for the synchronous Renderer.

Versions are immutable: ``(name, version)`` never changes once written, so a
mirrored copy is never stale, only possibly incomplete. The mirror is filled
with every template's latest version at startup; after that it grows by

* :meth:`DbTemplateStore.create` (an upload through this process),
* :meth:`DbTemplateStore.prepare` (an async caller about to resolve or render
  refs asks for exactly what it needs: the current latest version of
  unpinned names and any pinned version it lacks, in at most two queries), and
* :meth:`DbTemplateStore.refresh`, run periodically, which picks up versions
  uploaded through other engine processes.

The accept layer calls ``prepare`` before pinning ``name`` to ``name@N``, so a
submission always sees the newest version committed by any process.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import asyncpg
import structlog

from engine.compose.render import InMemoryTemplateStore
from engine.db.pool import acquire
from engine.db.queries import q
from engine.errors import DatabaseUnavailable, EngineError, ValidationFailed

log = structlog.get_logger(__name__)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,99}$")
_REF_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_-]{0,99})(?:@(?P<version>[0-9]{1,9}))?$")
_INSERT_RETRIES = 5


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValidationFailed(
            "template name must be 1-100 characters of a-z, 0-9, '_' or '-', starting with a letter or digit", "name"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None] | None:
    """``name`` -> (name, None); ``name@3`` -> (name, 3); anything else -> None."""
    m = _REF_RE.match(ref or "")
    if not m:
        return None
    return m["name"], (int(m["version"]) if m["version"] is not None else None)


class DbTemplateStore(InMemoryTemplateStore):
    """A :class:`engine.compose.render.TemplateStore` backed by the ``templates`` table.

    The synchronous ``get``/``latest_version`` the Renderer calls read the in-memory
    mirror inherited from :class:`InMemoryTemplateStore`; this class fills it from Postgres.
    """

    def __init__(self, pool: asyncpg.Pool, refresh_interval: float = 30.0) -> None:
        super().__init__()
        self.pool = pool
        self.refresh_interval = refresh_interval

    def _put(self, name: str, version: int, parts: Mapping[str, str]) -> None:
        with self._lock:
            self._parts.setdefault((name, version), dict(parts))
            if version > self._latest.get(name, 0):
                self._latest[name] = version

    def _put_rows(self, rows: Iterable[asyncpg.Record]) -> None:
        for r in rows:
            self._put(r["name"], r["version"], r["parts"])

    # ---- filling the mirror

    async def load(self) -> int:
        """Startup: the latest version of every template. Returns how many were loaded."""
        async with acquire(self.pool) as conn:
            rows = await conn.fetch(*q("template_latest_all"))
        self._put_rows(rows)
        return len(rows)

    async def refresh(self) -> int:
        """Pick up versions stored by other processes since we last looked; returns how many."""
        async with acquire(self.pool) as conn:
            latest = await conn.fetch(*q("template_max_versions"))
            wanted = [(r["name"], r["version"]) for r in latest if r["version"] > self._latest.get(r["name"], 0)]
            if not wanted:
                return 0
            rows = await conn.fetch(
                *q("template_get_versions", names=[n for n, _ in wanted], versions=[v for _, v in wanted])
            )
        self._put_rows(rows)
        return len(rows)

    async def prepare(self, refs: Iterable[str]) -> None:
        """Make ``refs`` resolvable from the mirror exactly as the database sees them now.

        Unpinned names learn their current latest version; pinned versions
        missing from the mirror are fetched. Refs that do not parse or do not
        exist are left alone: the Renderer reports them.
        """
        unpinned: set[str] = set()
        wanted: set[tuple[str, int]] = set()
        for ref in refs:
            parsed = parse_ref(ref) if isinstance(ref, str) else None
            if parsed is None:
                continue
            name, version = parsed
            if version is None:
                unpinned.add(name)
            elif (name, version) not in self._parts:
                wanted.add((name, version))
        if not unpinned and not wanted:
            return
        async with acquire(self.pool) as conn:
            if unpinned:
                for r in await conn.fetch(*q("template_latest_versions", names=sorted(unpinned))):
                    if (r["name"], r["version"]) not in self._parts:
                        wanted.add((r["name"], r["version"]))
            if wanted:
                pairs = sorted(wanted)
                rows = await conn.fetch(
                    *q("template_get_versions", names=[n for n, _ in pairs], versions=[v for _, v in pairs])
                )
                self._put_rows(rows)

    async def run_refresh(self, stopping: asyncio.Event) -> None:
        """Background task: refresh every ``refresh_interval`` until ``stopping`` is set."""
        while not stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=self.refresh_interval)
            if stopping.is_set():
                return
            try:
                n = await self.refresh()
                if n:
                    log.info("templates_refreshed", versions=n)
            except DatabaseUnavailable as exc:
                log.warning("templates_refresh_database_unavailable", error=str(exc))
            except Exception:  # the refresher must never die silently
                log.exception("templates_refresh_failed")

    # ---- writing and reading the table

    async def create(self, name: str, parts: Mapping[str, str], created_by_key: int | None) -> tuple[int, datetime]:
        """Store ``parts`` as the next version of ``name`` (validate first); returns (version, created_at)."""
        check_name(name)
        for _ in range(_INSERT_RETRIES):
            try:
                async with acquire(self.pool) as conn:
                    row = await conn.fetchrow(
                        *q("template_insert_next", name=name, parts=dict(parts), created_by_key=created_by_key)
                    )
            except asyncpg.UniqueViolationError:
                continue  # another upload of this name took the number; take the next one
            assert row is not None  # INSERT ... RETURNING always returns the row it wrote
            self._put(name, row["version"], parts)
            return row["version"], row["created_at"]
        raise EngineError(f"template {name!r}: too many concurrent uploads, retry")

    async def versions(self, name: str) -> list[asyncpg.Record]:
        async with acquire(self.pool) as conn:
            return await conn.fetch(*q("template_versions", name=name))

    async def fetch(self, name: str, version: int) -> asyncpg.Record | None:
        async with acquire(self.pool) as conn:
            row = await conn.fetchrow(*q("template_get", name=name, version=version))
        if row is not None:
            self._put(row["name"], row["version"], row["parts"])
        return row

    async def list(self) -> list[asyncpg.Record]:
        async with acquire(self.pool) as conn:
            return await conn.fetch(*q("template_list"))
