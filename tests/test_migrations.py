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
