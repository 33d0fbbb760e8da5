"""Day partitions of events and attempts (migration 0017): where rows land, the maintenance that
creates partitions ahead (idempotent, several engines at once, rows stranded in the default
partition), retention dropping whole days (attempts by age; events only once no webhook endpoint
waits for them), and the upgrade of a database holding rows at migration 0016.

Everything runs over the real Postgres of tests/conftest.py and the tables' owners.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import asyncpg
import pytest

from engine.db import migrate as migrations
from engine.db import partitions
from engine.events.public import Cursor
from engine.events.store import Event, read_page, record_events
from engine.outbox import Attempted, Outbox, Outcome, record_attempts
from engine.retention.config import RetentionConfig
from engine.retention.purge import Retention
from engine.webhooks.deliveries import Deliveries, Result
from engine.webhooks.endpoints import Endpoints
from tests.test_migrations import _drop, _fresh
from tests.test_retention import OWNER, _load, _message


@pytest.fixture(autouse=True)
async def _no_day_partitions(conn: asyncpg.Connection) -> None:
    """Start from a database without day partitions (the test template has this week's, made ahead)."""
    for p in await partitions.partitions(conn):
        if p.day is not None:
            await partitions.drop(conn, p.parent, p.day)


def _today() -> date:
    return datetime.now(UTC).date()


def _noon(day: date) -> datetime:
    return datetime.combine(day, time(12), UTC)


async def _where(conn: asyncpg.Connection, table: str) -> dict[int, str]:
    """Each row's id -> the partition holding it."""
    rows = await conn.fetch(f"SELECT id, tableoid::regclass::text AS part FROM {table}")
    return {r["id"]: r["part"] for r in rows}


def _retention(pool: asyncpg.Pool, **kw: str | None) -> Retention:
    return Retention(pool, RetentionConfig.model_validate({"batch_size": 2, "pause": 0}), **kw)  # type: ignore[arg-type]


async def test_rows_land_in_their_day_partitions_and_strays_in_default(pool, conn) -> None:
    assert await partitions.ensure(conn) == 2 * (partitions.DAYS_AHEAD + 1)
    assert await partitions.ensure(conn) == 0  # idempotent
    today = _today()
    days = [today, today + timedelta(days=1), today + timedelta(days=3)]
    far = today + timedelta(days=30)  # beyond the partitions made ahead
    async with pool.acquire() as c:
        await record_events(c, [Event("opened", data={"n": i}, created_at=_noon(d)) for i, d in enumerate([*days, far])])
    where = _where(conn, "events")
    parts = sorted((await where).values())
    assert parts == sorted([f"events_p{d:%Y%m%d}" for d in days] + ["events_default"])

    # Later maintenance still succeeds: the far day's partition takes its row out of the default partition.
    assert await partitions.create(conn, "events", far) is True
    assert sorted((await _where(conn, "events")).values()) == sorted(f"events_p{d:%Y%m%d}" for d in [*days, far])
    assert await conn.fetchval("SELECT count(*) FROM events_default") == 0
    assert await partitions.create(conn, "events", far) is False

    # A new row for a day with a partition never lands in the default partition; ids keep counting.
    before = await conn.fetchval("SELECT max(id) FROM events")
    async with pool.acquire() as c:
        await record_events(c, [Event("opened", created_at=_noon(far))])
    newest = await conn.fetchrow("SELECT id, tableoid::regclass::text AS part FROM events ORDER BY id DESC LIMIT 1")
    assert newest["id"] > before and newest["part"] == f"events_p{far:%Y%m%d}"


async def test_maintenance_from_two_engines_at_once(pool) -> None:
    """Two engines creating the same partitions concurrently: both succeed, each partition exists
    once, and a stray row in the default partition moves to its day."""
    async with pool.acquire() as a, pool.acquire() as b:
        stray = _today() + timedelta(days=5)
        await record_events(a, [Event("opened", created_at=_noon(stray))])
        assert set((await _where(a, "events")).values()) == {"events_default"}
        created = await asyncio.gather(partitions.ensure(a), partitions.ensure(b))
        assert sum(created) == 2 * (partitions.DAYS_AHEAD + 1)
        found = await partitions.partitions(a)
        days = [(p.parent, p.day) for p in found if p.day is not None]
        assert len(days) == len(set(days)) == 2 * (partitions.DAYS_AHEAD + 1)
        assert set((await _where(a, "events")).values()) == {f"events_p{stray:%Y%m%d}"}
        assert await asyncio.gather(partitions.ensure(a), partitions.ensure(b)) == [0, 0]


async def _delivered_recipient(pool: asyncpg.Pool, outbox: Outbox, address: str) -> int:
    """One recipient sent and acked delivered with its attempt row (the real delivery bookkeeping)."""
    [rows] = await outbox.enqueue([_message(address)])
    rid = rows[0].id
    claimed = await outbox.claim(OWNER, 1000, 60)
    assert rid in [r["id"] for r in claimed]
    await outbox.release(OWNER, [r["id"] for r in claimed if r["id"] != rid])
    async with pool.acquire() as conn, conn.transaction():
        await outbox.ack(OWNER, [Outcome(rid, "delivered", 250, "2.0.0", "250 ok")], conn=conn)
        await record_attempts(conn, [Attempted(rid, "delivered", 250, "2.0.0", "250 ok", "mx.test", 9)])
    return rid


async def test_retention_drops_an_old_day_of_attempts(pool, conn) -> None:
    await partitions.ensure(conn)
    outbox = Outbox(pool, 3 * 86400)
    old_rid = await _delivered_recipient(pool, outbox, "old@x.test")
    new_rid = await _delivered_recipient(pool, outbox, "new@x.test")
    old_day = _today() - timedelta(days=40)
    assert await partitions.create(conn, "attempts", old_day)
    # 40 days pass for the first attempt (its row moves into its day's partition).
    await conn.execute("UPDATE attempts SET at = $2 WHERE recipient_id = $1", old_rid, _noon(old_day))
    assert set((await _where(conn, "attempts")).values()) == {f"attempts_p{old_day:%Y%m%d}", f"attempts_p{_today():%Y%m%d}"}

    shown = await _retention(pool).show()
    attempts = next(p for p in shown["partitions"] if p["table"] == "attempts")
    assert attempts["days"] == partitions.DAYS_AHEAD + 2 and attempts["oldest_day"] == old_day.isoformat()
    assert attempts["bytes"] > 0

    report = await _retention(pool).purge()
    assert report.counts["attempt_days"] == 1
    assert await conn.fetchval("SELECT to_regclass($1)", f"attempts_p{old_day:%Y%m%d}") is None
    assert [r["recipient_id"] for r in await conn.fetch("SELECT recipient_id FROM attempts")] == [new_rid]
    assert (await _retention(pool).purge()).counts["attempt_days"] == 0


async def test_events_day_kept_while_a_webhook_endpoint_waits(pool, conn, tmp_path: Path) -> None:
    """A day of events stays whole while an enabled endpoint has a pending delivery for one of its
    events, and while the fan-out has not passed one of them; then it is dropped whole."""
    settings = _load(tmp_path, "[webhooks]\nallow_private_targets = true\n")
    endpoints, deliveries = Endpoints(pool, settings), Deliveries(pool)
    live, _ = await endpoints.create("http://127.0.0.1:9/live")
    await partitions.ensure(conn)
    [rows] = await Outbox(pool, 3 * 86400).enqueue([_message("w1@x.test")])  # one 'accepted' event
    fanned = 0
    for _ in range(600):  # the fan-out sees it once every older transaction on the server has ended
        fanned += (await deliveries.fan_out(datetime.now(UTC), 1000)).events
        if fanned:
            break
        await asyncio.sleep(0.1)
    assert fanned == 1
    async with pool.acquire() as c:  # written after the fan-out: no endpoint has seen it yet
        await record_events(c, [Event("opened", rows[0].id, None, {})])
    old_day = _today() - timedelta(days=40)
    assert await partitions.create(conn, "events", old_day)
    # 40 days pass for both events and the delivery of the first.
    await conn.execute("UPDATE events SET created_at = $1", _noon(old_day))
    await conn.execute("UPDATE webhook_deliveries SET event_at = $1", _noon(old_day))
    old_part = f"events_p{old_day:%Y%m%d}"
    assert set((await _where(conn, "events")).values()) == {old_part}

    retention = _retention(pool)
    report = await retention.purge()
    assert report.counts["event_days"] == 0 and report.counts["events"] == 0
    assert await conn.fetchval("SELECT count(*) FROM events") == 2

    claimed = await deliveries.claim(live.id, "default", "d1", datetime.now(UTC), 100, 60)
    assert len(claimed) == 1
    await deliveries.complete("d1", datetime.now(UTC), [Result(claimed[0].id, "delivered")])
    report = await retention.purge()  # delivered, but the second event is still ahead of the fan-out
    assert report.counts["event_days"] == 0 and await conn.fetchval("SELECT to_regclass($1)", old_part) is not None

    for _ in range(600):
        if (await deliveries.fan_out(datetime.now(UTC), 1000)).events:
            break
        await asyncio.sleep(0.1)
    report = await retention.purge()
    assert report.counts["event_days"] == 1
    assert await conn.fetchval("SELECT to_regclass($1)", old_part) is None
    assert await conn.fetchval("SELECT count(*) FROM events") == 0


async def test_events_day_kept_for_the_exporter(pool, conn) -> None:
    """With export on, a day whose events the exporter has not written stays (no endpoint at all)."""
    old_day = _today() - timedelta(days=40)
    await partitions.create(conn, "events", old_day)
    async with pool.acquire() as c:
        await record_events(c, [Event("opened", created_at=_noon(old_day))])
    report = await _retention(pool, export_destination="local").purge()
    assert report.counts["event_days"] == 0 and report.counts["events"] == 0
    report = await _retention(pool).purge()
    assert report.counts["event_days"] == 1


async def test_event_stream_reads_across_a_day_boundary(pool, conn) -> None:
    """GET /v1/events' reader pages by (tx, id) over every partition: events on both sides of
    midnight and in the default partition come back in order, none skipped."""
    today = _today()
    await partitions.create(conn, "events", today - timedelta(days=1))
    await partitions.create(conn, "events", today)
    when = [today - timedelta(days=1), today, today + timedelta(days=60), today - timedelta(days=1), today]
    async with pool.acquire() as c:
        for i, d in enumerate(when):
            await record_events(c, [Event("opened", data={"n": i}, created_at=_noon(d))])
    # The stream shows a transaction once every older one on the server has ended (tests on the
    # other xdist worker share the server): wait until all five are visible.
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        async with pool.acquire() as c:
            page = await read_page(c, Cursor(0, 0), types=["opened"], limit=100)
        if len(page.events) == len(when) or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
    ids = await conn.fetch("SELECT id FROM events ORDER BY tx, id")
    assert [e["id"] for e in page.events] == [f"evt_{r['id']}" for r in ids]
    assert len({(await _where(conn, "events"))[r["id"]] for r in ids}) == 3


async def test_upgrade_from_0016_keeps_rows_and_ids(pg_cluster) -> None:
    name = f"u_{uuid.uuid4().hex[:10]}"
    try:
        conn = await _fresh(pg_cluster, name)
        await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
                           "applied_at timestamptz NOT NULL DEFAULT now())")
        for mig in migrations.available():
            if mig.version <= 16:
                await conn.execute(mig.sql)
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", mig.version, mig.name)
        mid = uuid.uuid4()
        await conn.execute("INSERT INTO messages (id, source, mail_from, stream, content) "
                           "VALUES ($1, 'http', 'a@x.test', 'default', '{}')", mid)
        rid = await conn.fetchval("INSERT INTO recipients (message_id, address, domain, stream, expires_at) "
                                  "VALUES ($1, 'b@x.test', 'x.test', 'default', now() + interval '1 day') RETURNING id", mid)
        for days in (0, 2, 2, 5):
            await conn.execute("INSERT INTO events (type, recipient_id, message_id, created_at) "
                               "VALUES ('opened', $1, $2, now() - make_interval(days => $3))", rid, mid, days)
            await conn.execute("INSERT INTO attempts (recipient_id, outcome, at) "
                               "VALUES ($1, 'deferred', now() - make_interval(days => $2))", rid, days)
        await conn.execute("DELETE FROM events WHERE id = (SELECT max(id) FROM events)")  # ids are never reused
        before = {t: [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t} ORDER BY id")] for t in ("events", "attempts")}

        assert await migrations.migrate(conn) == [17]
        for t in ("events", "attempts"):
            assert [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t} ORDER BY id")] == before[t]
            assert await conn.fetchval("SELECT relkind::text FROM pg_class WHERE oid = $1::regclass", t) == "p"
        assert len(set((await _where(conn, "events")).values())) == 2  # two days left (the third's event went)
        assert len(set((await _where(conn, "attempts")).values())) == 3
        new_event = await conn.fetchval("INSERT INTO events (type) VALUES ('opened') RETURNING id")
        assert new_event == 5  # after the 4 ids handed out, the deleted one included
        new_attempt = await conn.fetchval("INSERT INTO attempts (recipient_id, outcome) VALUES ($1, 'delivered') "
                                          "RETURNING id", rid)
        assert new_attempt == 5
        await conn.execute("DELETE FROM recipients WHERE id = $1", rid)  # the cascade still holds
        assert await conn.fetchval("SELECT count(*) FROM attempts") == 0
        await conn.close()
    finally:
        await _drop(pg_cluster, name)


async def test_writer_racing_the_attach_of_its_day_waits_and_lands_in_it(pool) -> None:
    """A writer that starts while a day's partition is being attached (its rows would have gone to
    the default partition) waits for the attach and lands in the new partition, instead of failing
    on the default partition's narrowed constraint."""
    day = _today() + timedelta(days=20)
    async with pool.acquire() as maint, pool.acquire() as writer, pool.acquire() as watch:
        async with maint.transaction():
            assert await partitions.create(maint, "events", day)
            pid = await writer.fetchval("SELECT pg_backend_pid()")
            insert = asyncio.create_task(record_events(writer, [Event("opened", created_at=_noon(day))]))
            for _ in range(600):
                if await watch.fetchval("SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted", pid):
                    break
                assert not insert.done(), insert.exception()
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the writer never waited for the attach")
        assert await insert == 1
        assert set((await _where(watch, "events")).values()) == {f"events_p{day:%Y%m%d}"}
