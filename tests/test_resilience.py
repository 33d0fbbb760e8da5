"""Nothing accepted is lost; a missing database means 'try later', never a crash."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import httpx

from engine.apikeys import ApiKeys
from engine.config import load_settings
from engine.db.migrate import migrate
from engine.db.pool import create_pool

MSG = {"from": "app@example.com", "to": ["a@example.net"], "subject": "Hi", "text": "Hello"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_database_down_gives_503_then_recovers(private_pg, engine_factory, tmp_path) -> None:
    dsn = private_pg.create_database("engine")
    eng = await engine_factory(DATABASE_URL=dsn)
    key, _ = await eng.apikeys.create("k", ["send", "read"])
    host, port = eng.http_address
    h = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=20) as c:
        assert (await c.post("/v1/messages", json=MSG, headers=h)).status_code == 202
        await asyncio.to_thread(private_pg.stop)
        r = await c.post("/v1/messages", json=MSG, headers=h)
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert "retry" in r.json()["error"]
        hz = await c.get("/healthz")
        assert hz.status_code == 503 and hz.json()["database"] == "unreachable"
        await asyncio.to_thread(private_pg.start)
        # The engine recovers by itself: the pool reconnects on the next request.
        deadline = time.monotonic() + 20
        while True:
            r = await c.post("/v1/messages", json=MSG, headers=h)
            if r.status_code == 202 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert r.status_code == 202, r.text
        assert (await c.get("/healthz")).status_code == 200


async def test_kill_9_right_after_202_and_250_loses_nothing(db_dsn, tmp_path) -> None:
    import aiosmtplib

    port, smtp_port = _free_port(), _free_port()
    cfg = tmp_path / "engine.toml"
    cfg.write_text(
        f'[http]\nlisten = "127.0.0.1:{port}"\n'
        f'[[smtp.listeners]]\nname = "sub"\nlisten = "127.0.0.1:{smtp_port}"\ntls = "starttls"\n'
        f'self_signed = true\ntrusted_networks = []\n'
    )
    env = {**os.environ, "DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home")}
    settings = load_settings(cfg, env=env)
    pool = await create_pool(db_dsn, settings)
    key, _ = await ApiKeys(pool).create("k", ["send"])
    proc = subprocess.Popen([sys.executable, "-m", "engine", "--config", str(cfg), "run", "--workers", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    accepted: list[str] = []
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if (await c.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            for i in range(20):
                r = await c.post("/v1/messages", json={**MSG, "to": [f"u{i}@example.net"]},
                                 headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == 202
                accepted.append(r.json()["id"])
            # Submission port: STARTTLS, then AUTH with the API key.
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port, start_tls=True, validate_certs=False)
            await smtp.connect()
            await smtp.login("api", key)
            for i in range(5):
                errors, reply = await smtp.sendmail("app@example.com", [f"s{i}@example.net"],
                                                    b"Subject: s\r\n\r\nbody\r\n")
                assert not errors and reply.startswith("2.0.0 Ok: queued as "), reply
                accepted.append(reply.rsplit(" ", 1)[1])
            os.kill(proc.pid, signal.SIGKILL)  # the moment after the last 250
    finally:
        proc.kill()
        proc.wait(10)
    rows = await pool.fetch("SELECT m.id, r.state FROM messages m JOIN recipients r ON r.message_id = m.id")
    await pool.close()
    assert {str(r["id"]) for r in rows} == set(accepted)
    assert all(r["state"] == "queued" for r in rows)


async def test_sigterm_stops_cleanly(db_dsn, tmp_path) -> None:
    port = _free_port()
    cfg = tmp_path / "engine.toml"
    cfg.write_text(f'[http]\nlisten = "127.0.0.1:{port}"\n[smtp]\nenabled = false\n')
    env = {**os.environ, "DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "engine", "--config", str(cfg), "run", "--workers", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(timeout=5) as c:
            while time.monotonic() < deadline:
                try:
                    if (await c.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert b"engine_stopped" in err


async def test_housekeeping_prunes_old_counters_and_decisions(engine_factory, conn) -> None:
    await conn.execute("""INSERT INTO reputation_counters (bucket, provider, source, sending_domain, outcome, category, n)
                          VALUES (now() - interval '9 days', 'p', '', '', 'delivered', '', 1),
                                 (now(), 'p', '', '', 'delivered', '', 1)""")
    await conn.execute("""INSERT INTO campaign_counters (campaign, bucket, final, hard)
                          VALUES ('old', now() - interval '9 days', 1, 0), ('new', now(), 1, 0)""")
    await conn.execute("""INSERT INTO shaping_decisions (rule, action, reason, started_at, expires_at, ramp_until)
                          VALUES ('old', 'suspend', 'x', now() - interval '10 days', now() - interval '10 days',
                                  now() - interval '9 days'),
                                 ('live', 'suspend', 'x', now(), now() + interval '1 hour', now() + interval '2 hours')""")
    await engine_factory()  # its first housekeeping pass prunes
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and await conn.fetchval("SELECT count(*) FROM shaping_decisions") != 1:
        await asyncio.sleep(0.1)
    assert await conn.fetchval("SELECT count(*) FROM reputation_counters") == 1
    assert [r["campaign"] for r in await conn.fetch("SELECT campaign FROM campaign_counters")] == ["new"]
    assert [r["rule"] for r in await conn.fetch("SELECT rule FROM shaping_decisions")] == ["live"]


class _HoldingProxy:
    """A TCP proxy to Postgres that can hold back the server's close (its FIN) from the client.

    Why: when a backend is terminated while its pooled connection is idle, Postgres sends a FATAL
    message and closes. A client that reads the message before it sees the close leaves asyncpg's
    protocol stuck ("cannot switch to state ...; another operation is in progress"). Holding the
    close makes that window as wide as a test needs.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream  # a unix socket path or host:port
        self.hold_close = False
        self.closed_upstream = asyncio.Event()
        self._release = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.upstream.startswith("/"):
            return await asyncio.open_unix_connection(self.upstream)
        host, _, port = self.upstream.rpartition(":")
        return await asyncio.open_connection(host, int(port))

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        sreader, swriter = await self._open()

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, from_server: bool) -> None:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            if from_server:
                self.closed_upstream.set()
                if self.hold_close:
                    await self._release.wait()
            w.close()

        for t in (pump(creader, swriter, False), pump(sreader, cwriter, True)):
            task = asyncio.create_task(t)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        self._release.set()
        for t in list(self._tasks):
            t.cancel()
        if self.server is not None:
            self.server.close()


async def test_a_backend_terminated_while_idle_means_try_later_and_its_connection_is_dropped(
    db_dsn, settings, conn
) -> None:
    from urllib.parse import parse_qs, urlsplit

    import pytest

    from engine.db.pool import acquire
    from engine.errors import DatabaseUnavailable

    parts = urlsplit(db_dsn)
    host = parse_qs(parts.query).get("host", [parts.hostname or "127.0.0.1"])[0]
    upstream = f"{host}/.s.PGSQL.{parts.port or 5432}" if host.startswith("/") else f"{host}:{parts.port or 5432}"
    proxy = _HoldingProxy(upstream)
    port = await proxy.start()
    pool = await create_pool(f"postgresql://{parts.username or 'postgres'}@127.0.0.1:{port}{parts.path}", settings,
                             min_size=1, max_size=1)
    try:
        async with acquire(pool) as c:
            pid = await c.fetchval("SELECT pg_backend_pid()")
        proxy.hold_close = True
        await conn.execute("SELECT pg_terminate_backend($1, 10000)", pid)  # the server sent FATAL and closed
        await asyncio.wait_for(proxy.closed_upstream.wait(), 20)
        await asyncio.sleep(0.2)  # the client has read the FATAL message; it has not seen the close
        with pytest.raises(DatabaseUnavailable):  # "try later" (503/451), not an internal error (500)
            async with acquire(pool) as c:
                await c.fetchval("SELECT 1")
        proxy.hold_close = False
        # The broken connection is not handed out again: the next caller gets a fresh one.
        async with acquire(pool) as c:
            assert await c.fetchval("SELECT 1") == 1
    finally:
        await pool.close()
        await proxy.close()
