"""Retention deletes only what is due: bodies, recipients (with attempts and emptied messages), events.

Rows are made through their owners (outbox enqueue/claim/ack, event store, webhook fan-out), then
aged by moving their timestamps back, then purged by :class:`engine.retention.purge.Retention` in
batches of two so the batch loop runs. Events a webhook endpoint still waits for stay.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from engine.config import load_settings
from engine.errors import ConfigError
from engine.events.store import Event, record_events
from engine.ids import uuid7
from engine.outbox import Attempted, NewMessage, NewRecipient, Outbox, Outcome, record_attempts
from engine.retention.config import RetentionConfig
from engine.retention.purge import Retention
from engine.webhooks.deliveries import Deliveries, Result
from engine.webhooks.endpoints import Endpoints

OWNER = "test-worker"


def _message(*addresses: str) -> NewMessage:
    return NewMessage(
        id=uuid7(), source="http", mail_from="app@sender.test", stream="default", priority=5,
        recipients=[NewRecipient(a, a.rpartition("@")[2], vars={"name": a}) for a in addresses],
        content={"subject": "Hello", "text": "body text"},
    )


async def _finish(pool: asyncpg.Pool, outbox: Outbox, ids: list[int]) -> None:
    """Claim rows and ack them delivered, with one attempt row each (the real delivery bookkeeping)."""
    claimed = await outbox.claim(OWNER, 1000, 60)
    mine = [r["id"] for r in claimed if r["id"] in ids]
    assert sorted(mine) == sorted(ids)
    others = [r["id"] for r in claimed if r["id"] not in ids]
    await outbox.release(OWNER, others)
    async with pool.acquire() as conn, conn.transaction():
        await outbox.ack(OWNER, [Outcome(i, "delivered", 250, "2.0.0", "250 ok") for i in mine], conn=conn)
        await record_attempts(conn, [Attempted(i, "delivered", 250, "2.0.0", "250 ok", "mx.test", 12) for i in mine])


async def _age(conn: asyncpg.Connection, days: float, *, recipients: list[int] = (), messages: list[uuid.UUID] = (),
               events: list[int] = ()) -> None:
    """Move rows' timestamps ``days`` back (what the passage of time would do)."""
    ago = timedelta(days=days)
    await conn.execute("UPDATE recipients SET updated_at = now() - $2::interval WHERE id = ANY($1)", list(recipients), ago)
    await conn.execute("UPDATE messages SET created_at = now() - $2::interval WHERE id = ANY($1)", list(messages), ago)
    await conn.execute("UPDATE events SET created_at = now() - $2::interval WHERE id = ANY($1)", list(events), ago)


def _retention(pool: asyncpg.Pool, **overrides: Any) -> Retention:
    return Retention(pool, RetentionConfig.model_validate({"batch_size": 2, "pause": 0, **overrides}))


async def test_purge_takes_only_what_is_due(pool, conn) -> None:
    outbox = Outbox(pool, 3 * 86400)
    a, b, c, d, e = (_message(f"a{i}@x.test", f"b{i}@x.test") for i in range(5))
    rows = await outbox.enqueue([a, b, c, d, e])
    rid = {m.id: [r.id for r in rs] for m, rs in zip([a, b, c, d, e], rows)}
    # c keeps one recipient waiting; every other recipient is delivered.
    await _finish(pool, outbox, [*rid[a.id], *rid[b.id], rid[c.id][0], *rid[d.id], *rid[e.id]])
    await _age(conn, 40, messages=[a.id, b.id, c.id, d.id, e.id])
    await _age(conn, 40, recipients=rid[a.id] + [rid[e.id][0]])         # a: all final 40 days ago; e: one of two
    await _age(conn, 10, recipients=rid[b.id] + [rid[c.id][0], rid[e.id][1]])  # b: final 10 days ago; c: one final, one queued
    await _age(conn, 3, recipients=rid[d.id])                            # d: final 3 days ago: nothing due

    retention = _retention(pool)
    shown = await retention.show()
    assert shown["due"]["message_bodies"] == 3  # a, b, e (not c: a recipient still waits; not d: too recent)
    assert shown["due"]["recipients"] == 3 and shown["due"]["attempts"] == 3  # a's two and e's first
    assert {t["table"] for t in shown["tables"]} >= {"messages", "recipients", "attempts", "events"}
    assert all(t["bytes"] > 0 for t in shown["tables"] if t["table"] in ("messages", "recipients", "events"))

    report = await retention.purge()
    assert report.counts["message_bodies"] == 3
    assert report.counts["recipients"] == 3 and report.counts["messages"] == 1  # only a lost every recipient

    left = {r["id"]: r for r in await conn.fetch("SELECT id, raw, content FROM messages")}
    assert a.id not in left
    for m in (b, e):
        assert left[m.id]["content"] == {"purged": True} and left[m.id]["raw"] is None
    for m in (c, d):
        assert left[m.id]["content"]["subject"] == "Hello"
    recipients = {r["id"]: r for r in await conn.fetch("SELECT id, message_id, vars FROM recipients")}
    assert set(recipients) == set(rid[b.id] + rid[c.id] + rid[d.id] + [rid[e.id][1]])
    assert all(r["vars"] is not None for r in recipients.values())  # template variables go with their row
    attempts = {r["recipient_id"] for r in await conn.fetch("SELECT recipient_id FROM attempts")}
    assert attempts == set(rid[b.id] + [rid[c.id][0]] + rid[d.id] + [rid[e.id][1]])

    again = await retention.purge()
    assert again.total == 0
    shown = await retention.show()
    assert shown["due"]["message_bodies"] == 0 and shown["due"]["recipients"] == 0


async def test_windows_are_configurable_and_never_keeps(pool, conn, tmp_path) -> None:
    outbox = Outbox(pool, 3 * 86400)
    m = _message("z@x.test")
    [[row]] = await outbox.enqueue([m])
    await _finish(pool, outbox, [row.id])
    await _age(conn, 2, recipients=[row.id], messages=[m.id])
    # Kept forever: nothing goes however old.
    report = await _retention(pool, message_bodies="never", recipients="never", events="never").purge()
    assert report.total == 0
    shown = await _retention(pool, message_bodies="never", recipients="never").show()
    assert shown["due"]["message_bodies"] is None and shown["policy"][0]["keep_seconds"] is None
    # A one-day body window takes it; the 30-day recipients window does not.
    report = await _retention(pool, message_bodies="1d").purge()
    assert report.counts["message_bodies"] == 1 and report.counts["recipients"] == 0
    with pytest.raises(ConfigError, match="retention.events"):
        _load(tmp_path, '[retention]\nevents = "0s"\n')
    assert _load(tmp_path, '[retention]\naudit = "Never"\n').retention.audit is None


def _load(tmp: Path, text: str) -> Any:
    cfg = tmp / f"engine-{uuid.uuid4().hex[:8]}.toml"
    cfg.write_text(text)
    return load_settings(cfg, env={"ENGINE_HOME": str(tmp / "home")})


async def test_events_a_webhook_still_owes_are_kept(pool, conn, tmp_path) -> None:
    settings = _load(tmp_path, "[webhooks]\nallow_private_targets = true\n")
    endpoints = Endpoints(pool, settings)
    deliveries = Deliveries(pool)
    live, _ = await endpoints.create("http://127.0.0.1:9/live")
    off, _ = await endpoints.create("http://127.0.0.1:9/off")
    outbox = Outbox(pool, 3 * 86400)
    msgs = [_message(f"w{i}@x.test") for i in range(4)]
    rows = await outbox.enqueue(msgs)  # one 'accepted' event per recipient
    # The fan-out sees the events once every older transaction on the server has ended (other tests' too).
    seen = 0
    for _ in range(600):
        seen += (await deliveries.fan_out(datetime.now(UTC), 1000)).events
        if seen >= 4:
            break
        await asyncio.sleep(0.1)
    assert seen == 4
    ev = {r["recipient_id"]: r["id"] for r in await conn.fetch("SELECT id, recipient_id FROM events")}
    owed, off_only, done, _ = (ev[rs[0].id] for rs in rows)
    # 'done' was delivered to the live endpoint; 'owed' still pending there; 'off_only' pending only for the
    # disabled endpoint; the fourth was delivered too.
    claimed = await deliveries.claim(live.id, "default", "d1", datetime.now(UTC), 100, 60)
    finished = [c for c in claimed if c.event_id != owed]
    await deliveries.complete("d1", datetime.now(UTC), [Result(c.id, "delivered") for c in finished])
    await deliveries.release("d1", [c.id for c in claimed if c.event_id == owed])
    await endpoints.update(off.id, enabled=False)
    await conn.execute("UPDATE webhook_deliveries SET state = 'delivered' WHERE endpoint_id = $1 AND event_id <> $2",
                       off.id, off_only)
    # One more event after the fan-out cursor: no endpoint has seen it yet.
    async with pool.acquire() as c:
        await record_events(c, [Event("opened", rows[3][0].id, msgs[3].id, {})])
    late = await conn.fetchval("SELECT max(id) FROM events")
    await _age(conn, 40, events=list(ev.values()) + [late])

    retention = _retention(pool)
    assert (await retention.show())["due"]["events"] == 3
    report = await retention.purge()
    assert report.counts["events"] == 3
    kept = {r["id"] for r in await conn.fetch("SELECT id FROM events")}
    assert kept == {owed, late}
    assert off_only not in kept and done not in kept

    # With no endpoint enabled, nothing is owed: the unfanned event goes; the pending one of a disabled endpoint too.
    await endpoints.update(live.id, enabled=False)
    report = await retention.purge()
    assert report.counts["events"] == 2
    assert await conn.fetchval("SELECT count(*) FROM events") == 0


async def test_audit_log_is_purged_through_its_owner_when_present(pool) -> None:
    """The audit log (engine.audit, built in parallel) is purged through its owner's prune(); a
    build without it reports the kind as skipped. Entries cannot be backdated (the table is
    append-only), so the purge runs at an instant 401 days ahead."""
    if importlib.util.find_spec("engine.audit") is None:
        report = await _retention(pool).purge()
        assert report.skipped == ["audit: engine.audit.prune is not available in this build"]
        return
    audit = importlib.import_module("engine.audit")
    async with pool.acquire() as conn:
        for target in ("a", "b", "c"):
            await audit.record(conn, audit.Actor.cli(), "queue.hold", target)
    assert (await _retention(pool).purge()).counts["audit"] == 0  # not due yet
    report = await _retention(pool).purge(now=datetime.now(UTC) + timedelta(days=401))
    assert not report.skipped and report.counts["audit"] == 3  # batches of two: the loop ran
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM audit_log") == 0


async def test_engine_purges_in_the_background(engine_factory, conn) -> None:
    eng = await engine_factory('[retention]\ninterval = "200ms"\nbatch_size = 1\npause = "0s"\n')
    m = _message("bg1@x.test", "bg2@x.test")
    [rows] = await eng.outbox.enqueue([m])
    await _finish(eng.pool, eng.outbox, [r.id for r in rows])
    await _age(conn, 40, recipients=[r.id for r in rows], messages=[m.id])
    for _ in range(150):
        if not await conn.fetchval("SELECT count(*) FROM messages WHERE id = $1", m.id):
            break
        await asyncio.sleep(0.1)
    assert await conn.fetchval("SELECT count(*) FROM recipients WHERE message_id = $1", m.id) == 0
    assert await conn.fetchval("SELECT count(*) FROM messages WHERE id = $1", m.id) == 0


def test_retention_show_and_run_cli(db_dsn, tmp_path) -> None:
    env = {**os.environ, "DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "engine"]
    out = subprocess.run([*cmd, "retention", "show", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [p["kind"] for p in report["policy"]] == ["message_bodies", "recipients", "events", "audit"]
    assert report["policy"][0]["keep_seconds"] == 7 * 86400 and report["due"]["events"] == 0
    assert {t["table"]: t["bytes"] for t in report["tables"]}["events"] > 0
    table = subprocess.run([*cmd, "retention", "show"], capture_output=True, text=True, env=env, timeout=60)
    assert table.returncode == 0 and "message_bodies   7d" in table.stdout and "recipients" in table.stdout
    assert [p["table"] for p in report["partitions"]] == ["events", "attempts"]  # day partitions (0017)
    assert all(p["default_estimated_rows"] is not None for p in report["partitions"])
    assert "partitioned by day" in table.stdout
    run = subprocess.run([*cmd, "retention", "run", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["events"] == 0
    assert report["caveats"] == []


def test_caveats_name_what_short_windows_break() -> None:
    from engine.compose.tracking import TrackingConfig

    tracking = TrackingConfig.model_validate({"keys": [{"id": 1, "secret": "s" * 40}]})
    notes = RetentionConfig().caveats(tracking)
    assert len(notes) == 2 and "click_ttl is 180d" in notes[0] and "unsubscribe_ttl is 400d" in notes[1]
    assert RetentionConfig().caveats(TrackingConfig()) == []  # no tracking keys: no tracked links to break
    keep = RetentionConfig.model_validate({"message_bodies": "180d", "recipients": "400d", "events": "500d"})
    assert keep.caveats(tracking) == [
        "events outlive their recipients: events of purged recipients keep their ids but lose the address "
        "and contact ids in GET /v1/events and webhook payloads"
    ]
