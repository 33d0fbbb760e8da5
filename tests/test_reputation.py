"""Reputation counters: batched writes from delivery results and reports, rolling windows, rates, CLI."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from engine.cli import main as cli_main
from engine.db.pool import acquire
from engine.outcome.reputation import CounterRow, Counts, Reputation, record_counters
from engine.outcome.writer import Attempt, Backoff, OutcomeWriter


async def test_counters_sum_per_minute_and_window_rates(pool) -> None:
    now = datetime.now(UTC)
    rows = [CounterRow("gmail", "delivered", source="ip1", sending_domain="Sender.test") for _ in range(990)]
    rows += [CounterRow("gmail", "deferred", "rate_limited", "ip1", "sender.test", n=7)]
    rows += [CounterRow("gmail", "bounced", "unknown_user", "ip1", "sender.test", n=6)]
    rows += [CounterRow("gmail", "bounced", "policy", "ip2", "sender.test", n=4)]
    rows += [CounterRow("gmail", "complained", "complaint", "", "sender.test", n=3)]
    rows += [CounterRow("gmail", "delivered", source="ip1", sending_domain="sender.test", n=50, at=now - timedelta(hours=3))]
    rows += [CounterRow("yahoo", "delivered", source="ip1", n=5)]
    async with acquire(pool) as conn, conn.transaction():
        written = await record_counters(conn, rows)
    assert written <= 8  # pre-summed: one row per key and minute, not per message
    rep = Reputation(pool)
    day = await rep.window("gmail")
    assert day.delivered == 1040 and day.deferred == {"rate_limited": 7}
    assert day.bounced == {"unknown_user": 6, "policy": 4} and day.complaints == 3
    assert day.hard_bounces == 6
    assert abs(day.hard_bounce_rate - 6 / 1050) < 1e-9 and abs(day.complaint_rate - 3 / 1040) < 1e-9
    assert abs(day.delivered_ratio - 1040 / 1057) < 1e-9
    hour = await rep.window("gmail", seconds=3600)
    assert hour.delivered == 990
    assert (await rep.window("gmail", source="ip2")).bounced == {"policy": 4}
    assert (await rep.window("gmail", domain="SENDER.TEST")).delivered == 1040
    assert (await rep.window("hotmail")).attempted == 0 and Counts().delivered_ratio == 1.0
    # A second batch adds to the same buckets.
    async with acquire(pool) as conn, conn.transaction():
        await record_counters(conn, [CounterRow("yahoo", "delivered", source="ip1", n=2)])
    assert (await rep.window("yahoo")).delivered == 7
    summary = await rep.summary()
    assert set(summary) == {("gmail", "ip1", "sender.test"), ("gmail", "ip2", "sender.test"),
                            ("gmail", "", "sender.test"), ("yahoo", "ip1", "")}


async def test_concurrent_batches_do_not_deadlock(pool) -> None:
    keys = [(f"p{i % 5}", "deferred", f"c{i % 3}") for i in range(60)]

    async def writer(order: list) -> None:
        async with acquire(pool) as conn, conn.transaction():
            await record_counters(conn, [CounterRow(p, o, c, "s", "d") for p, o, c in order])

    await asyncio.wait_for(asyncio.gather(*(writer(keys[::1] if i % 2 else keys[::-1]) for i in range(8))), 30)
    total = 0
    for i in range(5):
        total += (await Reputation(pool).window(f"p{i}")).deferred_total
    assert total == 60 * 8


async def test_delivery_feedback_events_suppression_and_counters(pool, conn) -> None:
    # Real rows: a message with two recipients plus a queued one to the same bad address.
    from engine.accept import Acceptor
    from engine.apikeys import ApiKey
    from engine.config import load_settings
    from engine.outbox import Outbox, Outcome
    from engine.submit.models import MessageIn

    settings = load_settings(None, env={})
    acc = Acceptor(settings, Outbox(pool, 3600))
    key = ApiKey(1, "t", frozenset({"send"}))
    first = acc.build_http_message(MessageIn.model_validate(
        {"from": "app@sender.test", "to": ["ok@gmail.test", "gone@gmail.test"], "subject": "s", "text": "t"}), key)
    later = acc.build_http_message(MessageIn.model_validate(
        {"from": "app@sender.test", "to": ["gone@gmail.test"], "subject": "s", "text": "t"}), key)
    rows = await acc.commit([first, later])
    ids = {r.address: r.id for r in rows[0]}
    # As in a worker's flush: the first message's rows are leased, the second's go back to the queue.
    outbox = Outbox(pool, 3600)
    claimed = await outbox.claim("w", 10, 60)
    await outbox.release("w", [r["id"] for r in claimed if r["message_id"] != first.id])
    expires = datetime.now(UTC) + timedelta(days=1)

    def attempt(address: str, kind: str, reply: str, code: int | None, status: str | None, **kw: Any) -> Attempt:
        return Attempt(ids[address], address, 0, expires, kind, code, status, reply, kw.pop("mx", None), 5,
                       message_id=first.id, stream="default", provider="gmail", **kw)

    writer = OutcomeWriter(outbox, "w", Backoff([60.0], 0.0))
    # First try: a 421 for one, a hard bounce for the other; then the deferred one is claimed again and delivered.
    writer.add([
        attempt("ok@gmail.test", "temporary", "421-4.7.28 Our system has detected an unusual rate of unsolicited mail",
                421, "4.7.28", egress="ip1", mail_from="app@sender.test"),
        attempt("gone@gmail.test", "permanent", "550-5.1.1 The email account that you tried to reach does not exist",
                550, "5.1.1", egress="ip1", mail_from="app@sender.test"),
    ])
    await writer.flush()
    await conn.execute("UPDATE recipients SET next_attempt_at = now() WHERE id = $1", ids["ok@gmail.test"])
    assert [r["id"] for r in await outbox.claim("w", 10, 60)] == [ids["ok@gmail.test"]]
    writer.add([
        attempt("ok@gmail.test", "delivered", "250 2.0.0 OK", 250, "2.0.0", egress="ip1", mail_from="app@sender.test",
                mx="mx.gmail.test"),
        attempt("ok@gmail.test", "temporary", "not tried", None, None, counted=False),
    ])
    await writer.flush()
    ev = {e["type"]: e["data"] for e in await conn.fetch("SELECT type, data FROM events WHERE message_id = $1", first.id)}
    assert sorted(ev) == ["accepted", "bounced", "deferred", "delivered"]
    assert ev["bounced"]["category"] == "unknown_user" and ev["bounced"]["hard"] is True and ev["bounced"]["origin"] == "smtp"
    assert ev["delivered"]["mx"] == "mx.gmail.test" and ev["delivered"]["source"] == "ip1"
    assert ev["deferred"]["category"] == "reputation_block"  # what the classifier's Gmail rule says of 4.7.28
    assert [tuple(r) for r in await conn.fetch("SELECT address, scope, reason, source FROM suppressions")] == [
        ("gone@gmail.test", "*", "unknown_user", "bounce")]
    assert await conn.fetchval("SELECT state FROM recipients WHERE message_id = $1", later.id) == "suppressed"
    w = await Reputation(pool).window("gmail", source="ip1", domain="sender.test")
    assert (w.delivered, w.bounced, w.deferred) == (1, {"unknown_user": 1}, {"reputation_block": 1})


async def test_cli_show(pool, db_dsn, tmp_path, capsys) -> None:
    async with acquire(pool) as conn, conn.transaction():
        await record_counters(conn, [CounterRow("gmail", "delivered", source="ip1", sending_domain="sender.test", n=99),
                                     CounterRow("gmail", "complained", "complaint", "", "sender.test", n=1)])
    env = {"DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "h")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert await asyncio.to_thread(cli_main, ["reputation", "show", "--provider", "gmail", "--window", "1h"]) == 0
        table = capsys.readouterr().out
        assert await asyncio.to_thread(cli_main, ["reputation", "show", "--json"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert await asyncio.to_thread(cli_main, ["reputation", "show", "--provider", "nobody"]) == 0
        empty = capsys.readouterr()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert "gmail" in table and "99" in table
    import json

    docs = [json.loads(x) for x in lines]
    assert {d["source"] for d in docs} == {"ip1", ""} and docs[0]["provider"] == "gmail"
    assert "nothing recorded" in empty.err and empty.out == ""  # stdout holds rows only
