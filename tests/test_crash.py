"""Crashes: kill -9 a worker mid-run, take Postgres away mid-run. Nothing accepted is lost."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import asyncpg

from engine.config import load_settings
from engine.db.migrate import migrate
from engine.db.pool import create_pool
from engine.deliver.scheduler import DeliveryWorker
from engine.ids import uuid7
from engine.outbox import NewMessage, NewRecipient, Outbox
from tests.receivers import Behaviour, smtp_receiver, tls_ca  # noqa: F401

CONCURRENCY = 4


def _config(rx, extra: str = "") -> str:
    return (
        "[queue]\nlease_duration = \"2s\"\n"
        f"[delivery]\nretry_schedule = [\"0.3s\"]\nretry_jitter = 0\npoll_interval = \"100ms\"\n"
        f"destination_concurrency = {CONCURRENCY}\nflush_interval = \"20ms\"\n"
        "[delivery.smtp]\nconnect_timeout = 2\nbanner_timeout = 3\ndata_dot_timeout = 3\n"
        f"[routing.static]\n\"example.net\" = \"{rx.address}:{rx.port}\"\n" + extra
    )


async def _enqueue(pool: asyncpg.Pool, n: int) -> None:
    ob = Outbox(pool, 3600)
    msgs = [
        NewMessage(id=uuid7(), source="smtp", mail_from="", stream="relay", priority=5,
                   recipients=[NewRecipient(f"u{i}@example.net", "example.net")],
                   raw=f"Subject: {i}\r\nX-Seq: {i}\r\n\r\nbody\r\n".encode())
        for i in range(n)
    ]
    await ob.enqueue(msgs)


async def _wait_final(pool: asyncpg.Pool, n: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = await pool.fetchval("SELECT count(*) FROM recipients WHERE state IN ('delivered','bounced')")
        if done == n:
            return done
        await asyncio.sleep(0.1)
    return int(await pool.fetchval("SELECT count(*) FROM recipients WHERE state IN ('delivered','bounced')"))


def _duplicates(rx) -> int:
    seen = Counter(m.rcpt_tos[0] for m in rx.messages)
    return sum(c - 1 for c in seen.values())


async def test_kill_9_worker_mid_run_then_restart(db_dsn, tmp_path: Path, smtp_receiver) -> None:
    rx = smtp_receiver(Behaviour(delay={"data": 0.01}))
    cfg = tmp_path / "w.toml"
    cfg.write_text(_config(rx))
    env = {**os.environ, "DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home")}
    settings = load_settings(cfg, env=env)
    pool = await create_pool(db_dsn, settings)
    n = 300
    await _enqueue(pool, n)
    cmd = [sys.executable, "-m", "engine", "--config", str(cfg), "worker"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while len(rx.messages) < 60 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(rx.messages) >= 60, "the worker did not start delivering"
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        killed_at = len(rx.messages)
        assert killed_at < n, "the worker finished before it could be killed; enqueue more"
        # A new worker picks up the dead one's rows once their leases run out.
        second = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert await _wait_final(pool, n, 60) == n
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
        await pool.close()
    assert {m.rcpt_tos[0] for m in rx.messages} == {f"u{i}@example.net" for i in range(n)}
    # Only recipients inside a transaction at the kill, or whose 250 was received but not yet
    # written (one outcome flush, 20 ms here, longer on a loaded machine), are sent twice.
    assert _duplicates(rx) <= 3 * CONCURRENCY, _duplicates(rx)


async def test_postgres_stop_and_start_mid_run(private_pg, tmp_path: Path, smtp_receiver) -> None:
    rx = smtp_receiver(Behaviour(delay={"data": 0.01}))
    dsn = private_pg.create_database("engine")
    cfg = tmp_path / "w.toml"
    cfg.write_text(_config(rx))
    settings = load_settings(cfg, env={"DATABASE_URL": dsn, "ENGINE_HOME": str(tmp_path / "home")})
    conn = await asyncpg.connect(dsn)
    await migrate(conn)
    await conn.close()
    pool = await create_pool(dsn, settings)
    n = 300
    await _enqueue(pool, n)
    worker = DeliveryWorker(settings, pool, owner="pg-outage", dsn=dsn)
    task = asyncio.create_task(worker.run())
    try:
        deadline = time.monotonic() + 30
        while len(rx.messages) < 60 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(private_pg.stop)
        await asyncio.sleep(1.5)
        await asyncio.to_thread(private_pg.start)
        assert await _wait_final(pool, n, 60) == n
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
        await pool.close()
    assert {m.rcpt_tos[0] for m in rx.messages} == {f"u{i}@example.net" for i in range(n)}
    # Results delivered during the outage were kept in memory and written afterwards.
    assert _duplicates(rx) <= 2 * CONCURRENCY, _duplicates(rx)
