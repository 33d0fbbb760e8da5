"""Retention purge: how fast batched deletes go, and what a concurrent writer feels meanwhile.

Run: .venv/bin/python -m benchmarks.bench_retention [--messages N] [--events N] [--pause 200ms] [--partitions]
Fills a private Postgres with N messages (two final recipients and one attempt each) and M
events, all aged 40 days, then runs one :class:`engine.retention.purge.Retention` pass (batches
of 5,000, the default 200 ms pause between them) while a writer inserts one event every 10 ms
and times each insert (and, first, for 10 s with no purge running). Then
reloads the events and deletes them in ONE statement, writer running, for contrast. With
``--partitions`` the aged rows go into their day's partitions (made before the fill), so the pass
drops the events and attempts day whole instead of deleting their rows (migration 0017); without,
they sit in the default partitions, as rows would that no day partition was made for. Prints rows/s,
the slowest batch and the writer's p50/p99/max insert latency in each case. Not asserted anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import asyncpg

from benchmarks.harness import postgres
from engine.config import load_settings
from engine.db import partitions
from engine.db.migrate import migrate
from engine.db.pool import create_pool
from engine.retention.config import RetentionConfig
from engine.retention.purge import Retention

COMMAND = ".venv/bin/python -m benchmarks.bench_retention"


async def fill(conn: asyncpg.Connection, messages: int, events: int) -> None:
    await conn.execute(
        """
        INSERT INTO messages (id, created_at, source, mail_from, content, stream)
        SELECT gen_random_uuid(), now() - interval '40 days', 'http', 'app@example.com',
               jsonb_build_object('subject', 'Receipt ' || g, 'text', repeat('Thanks for your order. ', 40)), 'default'
        FROM generate_series(1, $1) g;
        """,
        messages,
    )
    await conn.execute(
        """
        INSERT INTO recipients (message_id, address, domain, state, stream, expires_at, updated_at, attempts, vars)
        SELECT m.id, 'user' || n || '-' || m.id || '@example.net', 'example.net', 'delivered', 'default',
               now(), now() - interval '40 days', 1, '{"name": "Ann"}'::jsonb
        FROM messages m CROSS JOIN generate_series(1, 2) n;
        """
    )
    await conn.execute(
        """
        INSERT INTO attempts (recipient_id, at, outcome, code, status, reply, mx, duration_ms)
        SELECT id, now() - interval '40 days', 'delivered', 250, '2.0.0', '250 2.0.0 OK queued', 'mx.example.net', 40
        FROM recipients;
        """
    )
    await fill_events(conn, events)
    await conn.execute("ANALYZE")


async def fill_events(conn: asyncpg.Connection, events: int) -> None:
    await conn.execute(
        """
        INSERT INTO events (type, recipient_id, data, created_at)
        SELECT 'delivered', g, '{"v": 1, "code": 250, "reply": "250 2.0.0 OK queued"}'::jsonb, now() - interval '40 days'
        FROM generate_series(1, $1) g;
        """,
        events,
    )


class Writer:
    """Inserts one fresh event every 10 ms and records how long each insert took."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.latencies: list[float] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            while not self.stop.is_set():
                t = time.perf_counter()
                await conn.execute("INSERT INTO events (type, data) VALUES ('delivered', '{\"v\": 1}')")
                self.latencies.append((time.perf_counter() - t) * 1000)
                await asyncio.sleep(0.01)
        finally:
            await conn.close()

    def summary(self) -> str:
        lat = sorted(self.latencies)
        if not lat:
            return "no inserts"
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        return f"writer inserts: {len(lat)}, p50 {statistics.median(lat):.1f} ms, p99 {p99:.1f} ms, max {lat[-1]:.1f} ms"


class TimedRetention(Retention):
    """Retention that also records the slowest batch (statement) it ran."""

    slowest = 0.0

    async def _batches(self, one: Any) -> int:
        async def timed(conn: asyncpg.Connection) -> int:
            t = time.perf_counter()
            n = int(await one(conn))
            self.slowest = max(self.slowest, time.perf_counter() - t)
            return n

        return await super()._batches(timed)


async def main(messages: int, events: int, pause: str, by_day: bool) -> None:
    with postgres("retention") as dsn:
        conn = await asyncpg.connect(dsn)
        await migrate(conn)
        if by_day:
            day = (await conn.fetchval("SELECT ((now() - interval '40 days') AT TIME ZONE 'UTC')::date"))
            for parent in partitions.PARTITIONED:
                await partitions.create(conn, parent, day)
        t = time.perf_counter()
        await fill(conn, messages, events)
        print(f"filled {messages:,} messages, {2 * messages:,} recipients and attempts, {events:,} events "
              f"in {time.perf_counter() - t:.0f} s")
        writer = Writer(dsn)
        task = asyncio.create_task(writer.run())
        await asyncio.sleep(10)
        writer.stop.set()
        await task
        print(f"no purge, 10 s: {writer.summary()}")
        settings = load_settings(None, env={"DATABASE_URL": dsn})
        pool = await create_pool(dsn, settings)
        retention = TimedRetention(pool, RetentionConfig.model_validate({"pause": pause}))
        writer = Writer(dsn)
        task = asyncio.create_task(writer.run())
        t = time.perf_counter()
        report = await retention.purge()
        took = time.perf_counter() - t
        writer.stop.set()
        await task
        rows = report.counts["message_bodies"] + report.counts["recipients"] + report.counts["events"]
        print(f"batched purge (5,000 per statement, pause {pause}): {report.counts} in {took:.1f} s "
              f"= {rows / took:,.0f} rows/s; slowest body/event batch {retention.slowest * 1000:.0f} ms")
        print(f"  {writer.summary()}")

        await fill_events(conn, events)
        await conn.execute("ANALYZE events")
        writer = Writer(dsn)
        task = asyncio.create_task(writer.run())
        await asyncio.sleep(0.5)
        t = time.perf_counter()
        n = await conn.execute("DELETE FROM events WHERE created_at < now() - interval '30 days'")
        took = time.perf_counter() - t
        await asyncio.sleep(0.5)
        writer.stop.set()
        await task
        print(f"one DELETE statement: {n} in {took:.1f} s (one transaction holding every row lock that long)")
        print(f"  {writer.summary()}")
        await pool.close()
        await conn.close()
    print(f"command: {COMMAND} --messages {messages} --events {events} --pause {pause}" + (" --partitions" if by_day else ""))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--events", type=int, default=500_000)
    ap.add_argument("--pause", default="200ms", help="[retention] pause between batches")
    ap.add_argument("--partitions", action="store_true", help="fill into day partitions: the pass drops them")
    a = ap.parse_args()
    asyncio.run(main(a.messages, a.events, a.pause, a.partitions))
