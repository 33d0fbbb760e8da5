"""Shared fixtures: a real Postgres (embedded via pgserver) and one fresh database per test.

Like procrastinate's suite, a template database is migrated once per session
and each test gets ``CREATE DATABASE ... TEMPLATE`` (tens of milliseconds), so
tests are isolated without paying for migrations every time. The server lives
under ``.pytest-pg/`` (or ``$ENGINE_TEST_PGDATA``) and is shared by pytest-xdist
workers; the last worker to exit stops it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from engine.config import Settings, load_settings
from engine.db import migrate as migrations
from engine.db import partitions
from engine.db.pool import create_pool, init_connection

pytest_plugins = ["tests.dnsserver"]

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def shared_corpus(*parts: str) -> Path:
    """A path under ../shared/corpora, or skip the test with the reason (absent in a user's clone)."""
    path = SHARED.joinpath("corpora", *parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is only present in the team's workspace)")
    return path


class PgCluster:
    """The embedded test server and helpers to make per-test databases."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def dsn(self, database: str) -> str:
        return str(self.server.get_uri(database))

    async def admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn("postgres"))


def _schema_fingerprint() -> str:
    h = hashlib.sha256()
    for mig in migrations.available():
        h.update(mig.sql.encode())
    h.update(f"partitions from {datetime.now(UTC).date()}".encode())  # a template's day partitions start on its day
    return h.hexdigest()[:12]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    import pgserver

    pgdata = Path(os.environ.get("ENGINE_TEST_PGDATA", REPO / ".pytest-pg")).resolve()
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    # Durability against a process kill does not need fsync; the OS page cache survives it.
    server.psql("ALTER SYSTEM SET fsync = off;")
    server.psql("ALTER SYSTEM SET synchronous_commit = off;")
    server.psql("ALTER SYSTEM SET max_connections = 300;")
    server.psql("SELECT pg_reload_conf();")
    yield PgCluster(server)


async def _ensure_template(cluster: PgCluster) -> str:
    name = f"engine_tpl_{_schema_fingerprint()}"
    conn = await cluster.admin()
    try:
        await conn.execute("SELECT pg_advisory_lock(4242)")
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if not exists:
                await conn.execute(f'CREATE DATABASE "{name}"')
                tconn = await asyncpg.connect(cluster.dsn(name))
                try:
                    await migrations.migrate(tconn)
                    # The day partitions an engine makes at start, made once here: each test's engine
                    # would otherwise create 16 tables (and log it) in its first seconds.
                    await partitions.ensure(tconn)
                finally:
                    await tconn.close()
                await conn.execute(f"ALTER DATABASE \"{name}\" WITH IS_TEMPLATE true")
        finally:
            await conn.execute("SELECT pg_advisory_unlock(4242)")
    finally:
        await conn.close()
    return name


@pytest.fixture(scope="session")
def pg_template(pg_cluster: PgCluster) -> str:
    return asyncio.run(_ensure_template(pg_cluster))


@pytest.fixture
async def db_dsn(pg_cluster: PgCluster, pg_template: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test; dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    conn = await pg_cluster.admin()
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    finally:
        await conn.close()
    yield pg_cluster.dsn(name)
    conn = await pg_cluster.admin()
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
def settings(db_dsn: str, tmp_path: Path) -> Settings:
    return load_settings(None, env={"DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home")})


@pytest.fixture
async def pool(db_dsn: str, settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(db_dsn, settings)
    yield p
    await p.close()


@pytest.fixture
async def conn(db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(db_dsn)
    await init_connection(c)
    yield c
    await c.close()


@pytest.fixture
async def engine_factory(db_dsn: str, tmp_path: Path) -> AsyncIterator[Any]:
    """Start real engines (HTTP on an ephemeral loopback port) against this test's database.

    ``await engine_factory(toml_text)`` writes the config, starts the engine in
    this loop and returns it; every engine started is stopped at teardown.
    """
    from engine.app import Engine

    started: list[Engine] = []

    async def make(toml: str = "", **env: str) -> Engine:
        cfg = tmp_path / f"engine{len(started)}.toml"
        base = '[http]\nlisten = "127.0.0.1:0"\n' if "[http]" not in toml else ""
        if "[smtp]" not in toml and "[[smtp.listeners]]" not in toml:
            base += "[smtp]\nenabled = false\n"
        cfg.write_text(base + toml)
        settings = load_settings(
            cfg, env={"DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home"), **env}
        )
        eng = Engine(settings)
        await eng.connect(retry_for=5)
        await eng.start()
        started.append(eng)
        return eng

    yield make
    for eng in reversed(started):
        await eng.stop()


@pytest.fixture
def private_pg() -> Iterator[Any]:
    """A Postgres server of this test's own, which it may stop and start."""
    import shutil
    import tempfile

    from tests.pgcontrol import PrivatePostgres

    # Our own short directory: the Unix socket path must stay under ~100 bytes, and pytest's
    # numbered temp dirs may be pruned by another pytest process running at the same time.
    pgdata = Path(tempfile.mkdtemp(prefix="engine-pg-")) / "data"
    pg = PrivatePostgres(pgdata)
    yield pg
    try:
        pg.stop("fast")
    except Exception:
        pass
    shutil.rmtree(pgdata.parent, ignore_errors=True)
