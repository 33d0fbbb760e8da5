"""The migration chain and schema.sql describe the same database."""

from __future__ import annotations

import uuid

import asyncpg

from engine.db import migrate as migrations

CATALOG_QUERY = """
SELECT 'column' AS kind, table_name || '.' || column_name AS name,
       concat_ws(' ', data_type, is_nullable, column_default, is_identity) AS detail
FROM information_schema.columns WHERE table_schema = 'public' AND table_name <> 'schema_migrations'
UNION ALL
SELECT 'index', indexname, regexp_replace(indexdef, '\\s+', ' ', 'g')
FROM pg_indexes WHERE schemaname = 'public' AND tablename <> 'schema_migrations'
UNION ALL
SELECT 'constraint', conrelid::regclass || '.' || conname, pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
      AND conrelid::regclass::text <> 'schema_migrations'
ORDER BY 1, 2, 3
"""


async def _fresh(pg_cluster, name: str) -> asyncpg.Connection:
    admin = await pg_cluster.admin()
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    return await asyncpg.connect(pg_cluster.dsn(name))


async def _drop(pg_cluster, *names: str) -> None:
    admin = await pg_cluster.admin()
    for n in names:
        await admin.execute(f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)')
    await admin.close()


async def test_migration_chain_equals_schema_sql(pg_cluster) -> None:
    a, b = f"m_{uuid.uuid4().hex[:10]}", f"s_{uuid.uuid4().hex[:10]}"
    try:
        ca = await _fresh(pg_cluster, a)
        applied = await migrations.migrate(ca)
        assert applied == [m.version for m in migrations.available()]
        cb = await _fresh(pg_cluster, b)
        await cb.execute(migrations.current_schema_sql())
        from_chain = [tuple(r) for r in await ca.fetch(CATALOG_QUERY)]
        from_schema = [tuple(r) for r in await cb.fetch(CATALOG_QUERY)]
        await ca.close()
        await cb.close()
        assert from_chain, "catalog query returned nothing"
        only_chain = set(from_chain) - set(from_schema)
        only_schema = set(from_schema) - set(from_chain)
        assert not only_chain and not only_schema, (only_chain, only_schema)
    finally:
        await _drop(pg_cluster, a, b)


async def test_migrate_is_idempotent(conn) -> None:
    # The per-test database is already migrated from the template.
    assert await migrations.migrate(conn) == []
    versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == [m.version for m in migrations.available()]


async def test_old_code_refuses_a_newer_schema(conn, db_dsn, tmp_path) -> None:
    """Applied versions this code does not ship: migrate() and every command refuse, naming them, exit 2."""
    import os
    import subprocess
    import sys

    import pytest

    from engine.errors import SchemaTooNew

    newest = migrations.available()[-1]
    # The newest shipped step looks pending (its row gone) while a step from the future is applied.
    await conn.execute("DELETE FROM schema_migrations WHERE version = $1", newest.version)
    await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (9999, 'from_the_future')")
    with pytest.raises(SchemaTooNew, match="9999_from_the_future"):
        await migrations.migrate(conn)
    # Refused before touching anything: the pending step was not applied.
    assert await conn.fetchval("SELECT count(*) FROM schema_migrations WHERE version = $1", newest.version) == 0
    cfg = tmp_path / "engine.toml"
    cfg.write_text('[http]\nlisten = "127.0.0.1:0"\n[smtp]\nenabled = false\n')
    env = {**os.environ, "DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home")}
    for command in (["migrate"], ["worker"], ["run", "--workers", "0"]):
        out = subprocess.run([sys.executable, "-m", "engine", "--config", str(cfg), *command],
                             env=env, capture_output=True, text=True, timeout=90)
        assert out.returncode == 2, (command, out.returncode, out.stderr[-2000:])
        assert "newer than this engine" in out.stderr and "9999_from_the_future" in out.stderr, out.stderr[-2000:]


_STARTER = """
import asyncio, json, os, sys, time
import asyncpg
from engine.db.migrate import migrate

async def main() -> None:
    conn = await asyncpg.connect(sys.argv[1])
    open(sys.argv[2] + "." + str(os.getpid()), "w").close()  # connected
    while not os.path.exists(sys.argv[2]):  # then all start at once
        time.sleep(0.005)
    print(json.dumps(await migrate(conn)))
    await conn.close()

asyncio.run(main())
"""


async def test_many_processes_starting_together_apply_each_migration_once(pg_cluster, tmp_path) -> None:
    """Several nodes booting at the same moment on an empty database: the advisory lock lets one apply
    each step; the others wait, then find nothing to do. Every process succeeds."""
    import asyncio
    import json
    import os
    import subprocess
    import sys
    import time

    name = f"c_{uuid.uuid4().hex[:10]}"
    admin = await pg_cluster.admin()
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    go = tmp_path / "go"
    n = 4
    procs = [subprocess.Popen([sys.executable, "-c", _STARTER, pg_cluster.dsn(name), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
             for _ in range(n)]
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("go.*"))) < n:
            assert time.monotonic() < deadline, "the starters did not connect"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
            await asyncio.sleep(0.05)
        go.touch()
        results = []
        for p in procs:
            out, err = await asyncio.to_thread(p.communicate, timeout=120)
            assert p.returncode == 0, err[-2000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
        applied = sorted(v for r in results for v in r)
        assert applied == [m.version for m in migrations.available()], results
        assert sum(1 for r in results if r) >= 1
        conn = await asyncpg.connect(pg_cluster.dsn(name))
        try:
            rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")
        finally:
            await conn.close()
        assert [r["version"] for r in rows] == [m.version for m in migrations.available()]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        await _drop(pg_cluster, name)
