"""``/healthz`` (alive) and ``/readyz`` (ready for traffic) on a real engine, real Postgres, real listeners.

/readyz is what an orchestrator routes by: each check is turned off for real (a schema from a newer
release, a migration not applied, a listener closed, the database stopped, a shutdown begun) and the
probe must say 503 with a reason naming it, then 200 once it is back.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from engine.db import migrate as migrations

SMTP = '[[smtp.listeners]]\nname = "local"\nlisten = "127.0.0.1:0"\ntrusted = true\n'


async def _ready(c: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    r = await c.get("/readyz")
    return r.status_code, r.json()


async def test_readyz_ready_then_each_check_fails_with_its_reason(engine_factory, conn) -> None:
    eng = await engine_factory(SMTP)
    host, port = eng.http_address
    newest = migrations.available()[-1]
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as c:
        status, body = await _ready(c)
        assert status == 200, body
        assert body["status"] == "ready" and body["database"] == "ok"
        assert body["schema"] == {"code": newest.version, "database": newest.version}
        assert body["listeners"] == {"http": "up", "smtp:local": "up"}

        # A newer release migrated the database: this node must leave rotation, saying why.
        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (9999, 'from_the_future')")
        status, body = await _ready(c)
        assert status == 503 and body["status"] == "not ready"
        assert any("newer than this engine" in r and "9999_from_the_future" in r for r in body["reasons"]), body
        assert body["schema"]["database"] == 9999
        await conn.execute("DELETE FROM schema_migrations WHERE version = 9999")
        assert (await _ready(c))[0] == 200

        # A shipped step not applied (its row gone): pending, with the command that fixes it.
        row = await conn.fetchrow("DELETE FROM schema_migrations WHERE version = $1 RETURNING *", newest.version)
        status, body = await _ready(c)
        assert status == 503 and any(f"migrations pending: {newest.version:04d}" in r for r in body["reasons"]), body
        await conn.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                           row["version"], row["name"], row["applied_at"])
        assert (await _ready(c))[0] == 200

        # A listener that stopped serving.
        handle = next(h for h in eng._smtp if h.name == "local")  # the real listener, closed for real
        await handle.close()
        status, body = await _ready(c)
        assert status == 503 and body["listeners"]["smtp:local"] == "down"
        assert "listeners not up: smtp:local" in body["reasons"]
        # Liveness is another question: the process is alive and reaches its database.
        assert (await c.get("/healthz")).status_code == 200

        # Shutdown begun: out of rotation before the listeners close.
        eng.request_stop()
        status, body = await _ready(c)
        assert status == 503 and "shutting down" in body["reasons"]


async def test_readyz_database_down_then_back(private_pg, engine_factory) -> None:
    dsn = private_pg.create_database("engine")
    eng = await engine_factory(DATABASE_URL=dsn)
    host, port = eng.http_address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=20) as c:
        assert (await _ready(c))[0] == 200
        await asyncio.to_thread(private_pg.stop)
        status, body = await _ready(c)
        assert status == 503 and body["database"] == "unreachable" and _has(body, "database unreachable")
        assert "schema" not in body and body["listeners"] == {"http": "up"}
        await asyncio.to_thread(private_pg.start)
        deadline = time.monotonic() + 30
        while (await _ready(c))[0] != 200:
            assert time.monotonic() < deadline, "not ready again after the database came back"
            await asyncio.sleep(0.2)


def _has(body: dict[str, Any], text: str) -> bool:
    return any(text in r for r in body["reasons"])
