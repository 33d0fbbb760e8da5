"""Versioned SQL migrations: ``migrations/NNNN_name.sql`` applied in order, once each.

Run by ``engine migrate`` and at startup. An advisory lock serialises concurrent
starters (several workers or hosts booting together); each file is applied in
its own transaction together with its bookkeeping row, so a crash mid-way
leaves either the whole step or nothing.

A node with old code refuses a newer schema: when the database carries versions
this code does not ship (a newer release migrated it), :func:`migrate` raises
:class:`~engine.errors.SchemaTooNew` naming them, before touching anything. Old
code writing into tables whose meaning it does not know is how a rolling upgrade
corrupts data; stopping with a clear message is the safe side. :func:`status`
is the same comparison for ``/readyz``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from engine.errors import SchemaTooNew

MIGRATION_LOCK_ID = 0x656E67696E65  # "engine"
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    root = resources.files("engine.db").joinpath("migrations")
    found = []
    for entry in root.iterdir():
        m = _FILE_RE.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {versions}")
    return found


def current_schema_sql() -> str:
    return resources.files("engine.db").joinpath("schema.sql").read_text()


@dataclass(frozen=True)
class SchemaStatus:
    """How the database's applied migrations compare with the ones this code ships."""

    code_version: int
    """The newest migration file in this code."""
    db_version: int
    """The newest version applied to the database (0: none)."""
    pending: list[int]
    """Shipped here, not applied yet (``engine migrate`` or any start applies them)."""
    unknown: list[tuple[int, str]]
    """Applied, but not shipped here: the database is newer than this code."""

    @property
    def current(self) -> bool:
        return self.db_version == self.code_version and not self.pending and not self.unknown


def compare(applied: list[tuple[int, str]]) -> SchemaStatus:
    """Compare applied ``(version, name)`` rows with the files shipped in this code."""
    shipped = {m.version for m in available()}
    done = {v for v, _ in applied}
    return SchemaStatus(
        code_version=max(shipped, default=0),
        db_version=max(done, default=0),
        pending=sorted(shipped - done),
        unknown=sorted((v, n) for v, n in applied if v not in shipped),
    )


def too_new_message(unknown: list[tuple[int, str]]) -> str:
    names = ", ".join(f"{v:04d}_{n}" for v, n in unknown)
    newest = max((m.version for m in available()), default=0)
    return (
        f"the database schema is newer than this engine: migration(s) {names} are applied but not shipped with "
        f"this version (it knows up to {newest:04d}). Run the release that ships them on this node "
        "(or restore the database from a backup taken before the upgrade); refusing to start"
    )


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply missing migrations; returns the versions applied now (empty when up to date).

    Raises :class:`SchemaTooNew` (and applies nothing) when the database carries versions
    this code does not ship.
    """
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        rows = await conn.fetch("SELECT version, name FROM schema_migrations")
        done = {r["version"] for r in rows}
        unknown = compare([(r["version"], r["name"]) for r in rows]).unknown
        if unknown:
            raise SchemaTooNew(too_new_message(unknown))
        for mig in available():
            if mig.version in done:
                continue
            async with conn.transaction():
                await conn.execute(mig.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", mig.version, mig.name
                )
            applied_now.append(mig.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    return applied_now
