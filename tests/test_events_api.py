"""``GET /v1/events``: the event stream by opaque cursor, against a real engine and Postgres.

The key property: event ids come from a sequence and transactions commit out of id order,
so a reader that pages by id can skip an event whose transaction commits late. The cursor
must never skip or repeat one; the tests hold a transaction open with asyncpg, commit a later
one, and page (and fan out to a webhook) across the late commit.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from typing import Any

import asyncpg
import httpx

from engine.db.pool import init_connection
from engine.events.store import Event, record_events
from tests.webhook_receiver import Stack, webhook_receiver, webhook_stack  # noqa: F401


async def page_all(st: Stack, after: str | None = None, **params: Any) -> tuple[list[dict[str, Any]], str]:
    """Every page from ``after`` on; returns the events and the last ``next``."""
    out: list[dict[str, Any]] = []
    while True:
        r = await st.http.get("/v1/events", params={**({"after": after} if after else {}), **params})
        assert r.status_code == 200, r.text
        body = r.json()
        out += body["events"]
        after = body["next"]
        if not body["has_more"]:
            return out, after


async def connect(dsn: str) -> asyncpg.Connection:
    c = await asyncpg.connect(dsn)
    await init_connection(c)
    return c


async def caught_up(st: Stack, after: str | None, already: int) -> tuple[list[dict[str, Any]], str]:
    """Page on from ``after`` until all committed events (``already`` of them read before) are read.

    Visibility follows the oldest open write transaction of the whole Postgres cluster, so a
    parallel test's transaction in another database can hold events back for a moment.
    """
    got: list[dict[str, Any]] = []
    cursor = after

    async def done() -> bool:
        nonlocal cursor
        page, cursor = await page_all(st, cursor)
        got.extend(page)
        return already + len(got) == await st.pool.fetchval("SELECT count(*) FROM events")

    await st.until(done, what="the stream caught up")
    assert cursor is not None
    return got, cursor


async def test_paging_returns_every_event_once_in_stream_order(webhook_stack) -> None:
    st = await webhook_stack()
    for m in range(3):
        ids = await st.submit([f"u{m}{i}@example.net" for i in range(4)])
        await st.record("opened", next(iter(ids.values())))
    expected = await st.event_ids()
    assert len(expected) == 15
    await caught_up(st, None, 0)

    pages: list[list[str]] = []
    after: str | None = None
    while True:
        body = (await st.http.get("/v1/events", params={"limit": 4, **({"after": after} if after else {})})).json()
        pages.append([e["id"] for e in body["events"]])
        assert body["has_more"] == (sum(map(len, pages)) < len(expected))
        after = body["next"]
        if not body["has_more"]:
            break
    assert [len(p) for p in pages] == [4, 4, 4, 3]
    assert [e for p in pages for e in p] == expected

    # An empty page keeps the cursor where it was; new events continue from it.
    again = (await st.http.get("/v1/events", params={"after": after})).json()
    assert again == {"events": [], "next": after, "has_more": False}
    rid = (await st.submit(["late@example.net"]))["late@example.net"]
    opened = await st.record("opened", rid)
    more, _ = await caught_up(st, after, len(expected))
    assert [e["id"] for e in more] == (await st.event_ids(rid)) and more[-1]["id"] == opened
    assert [e["type"] for e in more] == ["email.accepted", "email.opened"]


async def test_filters_by_type_stream_message_and_recipient(webhook_stack) -> None:
    st = await webhook_stack()
    plain = await st.submit(["ann@example.net", "bob@example.net"], metadata={"k": "v"})
    urgent = await st.submit(["ann@example.net"], stream="transactional")
    await st.record("opened", plain["ann@example.net"])
    await st.record("clicked", plain["bob@example.net"], {"link_index": 0, "url": "https://x.test/"})
    msg = {r["id"]: str(r["message_id"]) for r in await st.pool.fetch("SELECT id, message_id FROM recipients")}

    async def ids(**params: Any) -> list[str]:
        events, _ = await page_all(st, limit=1, **params)  # one per page: filters hold across pages
        return [e["id"] for e in events]

    everything, _ = await caught_up(st, None, 0)
    by = {(e["type"], e["data"]["recipient_id"]): e["id"] for e in everything}
    assert await ids(type="email.opened") == [by[("email.opened", plain["ann@example.net"])]]
    assert await ids(type=["email.opened", "email.clicked"]) == [
        by[("email.opened", plain["ann@example.net"])], by[("email.clicked", plain["bob@example.net"])]]
    assert await ids(stream="transactional") == [by[("email.accepted", urgent["ann@example.net"])]]
    assert await ids(message_id=msg[urgent["ann@example.net"]]) == [by[("email.accepted", urgent["ann@example.net"])]]
    assert len(await ids(message_id=msg[plain["ann@example.net"]])) == 4
    ann = [e["id"] for e in everything if e["data"]["address"] == "ann@example.net"]
    assert await ids(recipient="Ann@Example.NET") == ann and len(ann) == 3  # addresses compare without case
    assert await ids(recipient=str(plain["bob@example.net"])) == [
        by[("email.accepted", plain["bob@example.net"])], by[("email.clicked", plain["bob@example.net"])]]
    assert await ids(recipient="nobody@example.net") == []
    assert await ids(type="email.delivered") == []


async def test_bad_parameters_are_422_naming_the_field(webhook_stack) -> None:
    st = await webhook_stack()
    bad = [  # (parameter, value, the field the error names)
        ("after", "!!!", "after"),
        ("after", base64.urlsafe_b64encode(b"nope").decode(), "after"),
        ("after", base64.urlsafe_b64encode(b"-1.5").decode(), "after"),
        ("type", "email.nope", "type"),
        ("type", "delivered", "type"),  # the engine's own name is not a public type
        ("recipient", "nobody", "recipient"),
        ("recipient", "9" * 20, "recipient"),
        # Checked by FastAPI before the handler: the field carries its location.
        ("message_id", "not-a-uuid", "query.message_id"),
        ("limit", "0", "query.limit"),
        ("limit", "1001", "query.limit"),
    ]
    for name, value, field in bad:
        r = await st.http.get("/v1/events", params={name: value})
        assert r.status_code == 422, (name, value, r.text)
        assert r.json()["field"] == field, (name, value, r.json())


async def test_the_read_scope_is_required(webhook_stack) -> None:
    st = await webhook_stack()
    base = str(st.http.base_url)
    send_key, _ = await st.eng.apikeys.create("sender", ["send"])
    read_key, _ = await st.eng.apikeys.create("reader", ["read"])
    async with httpx.AsyncClient(base_url=base) as anon:
        assert (await anon.get("/v1/events")).status_code == 401
        assert (await anon.get("/v1/events", headers={"Authorization": f"Bearer {send_key}"})).status_code == 403
        r = await anon.get("/v1/events", headers={"Authorization": f"Bearer {read_key}"})
        assert r.status_code == 200 and r.json()["events"] == []


# ---- the late commit ------------------------------------------------------------------------------


class LateCommit:
    """Two transactions writing one event each; A commits after B although it started first.

    ``first="id"``: A inserts first, so its event has the lower id (and the lower xid).
    ``first="xid"``: A only takes its transaction id first; B then inserts (lower event id) and
    commits, and A inserts afterwards: by id A comes later, by commit order it belongs before B.
    Either way a reader that passes B while A is open has skipped A for good.
    """

    def __init__(self, dsn: str, recipients: dict[str, int], message_id: uuid.UUID) -> None:
        self.dsn, self.recipients, self.message_id = dsn, recipients, message_id
        self.a_id = self.b_id = self.a_xid = 0

    async def run_until_b_committed(self, first: str) -> None:
        self.a = await connect(self.dsn)
        self.ta = self.a.transaction()
        await self.ta.start()
        (ra, rb) = self.recipients.values()
        if first == "id":
            self.a_id = await self._insert(self.a, ra)
        # (With first="xid" this is where A takes its transaction id: the older one, no event yet.)
        self.a_xid = int(await self.a.fetchval("SELECT pg_current_xact_id()::text::bigint"))
        b = await connect(self.dsn)
        try:
            async with b.transaction():
                self.b_id = await self._insert(b, rb)
        finally:
            await b.close()
        if first == "xid":
            self.a_id = await self._insert(self.a, ra)
        assert (self.a_id < self.b_id) == (first == "id")

    async def _insert(self, conn: asyncpg.Connection, rid: int) -> int:
        await record_events(conn, [Event("opened", rid, self.message_id, {"late": True})])
        return int(await conn.fetchval("SELECT max(id) FROM events WHERE recipient_id = $1", rid))

    async def commit_a(self) -> None:
        await self.ta.commit()
        await self.a.close()

    async def abandon(self) -> None:
        if not self.a.is_closed():
            await self.a.close()  # rolls back: the test failed before committing


async def late_commit(st: Stack, dsn: str) -> LateCommit:
    ids = await st.submit(["a@example.net", "b@example.net"])
    mid = await st.pool.fetchval("SELECT message_id FROM recipients WHERE id = $1", ids["a@example.net"])
    return LateCommit(dsn, ids, mid)


async def test_a_late_commit_is_never_skipped_nor_repeated_by_the_cursor(webhook_stack, db_dsn) -> None:
    st = await webhook_stack()
    seen: list[str] = []
    cursor: str | None = None
    for first in ("id", "xid"):
        lc = await late_commit(st, db_dsn)
        before, cursor = await caught_up(st, cursor, len(seen))
        seen += [e["id"] for e in before]
        try:
            await lc.run_until_b_committed(first)
            # B has committed, A has not: the reader must stop before A, so it cannot show B yet.
            early, held = await page_all(st, cursor)
            assert f"evt_{lc.b_id}" not in [e["id"] for e in early], first
            assert early == [] and held == cursor, first
            await lc.commit_a()
        finally:
            await lc.abandon()
        after, cursor = await caught_up(st, cursor, len(seen))
        got = [e["id"] for e in after]
        assert got == [f"evt_{lc.a_id}", f"evt_{lc.b_id}"], first  # commit order: A's transaction is the older
        seen += got
    everything, _ = await page_all(st)
    assert seen == [e["id"] for e in everything]  # across all pages: every event exactly once
    assert len(seen) == len(set(seen)) == len(await st.event_ids())


async def test_a_late_commit_reaches_a_webhook_exactly_once(webhook_stack, webhook_receiver, db_dsn) -> None:
    rx = await webhook_receiver()
    st = await webhook_stack()
    ep = await st.endpoint(rx.url)
    rx.secrets.append(ep["secret"])
    await st.start_dispatcher()
    lc = await late_commit(st, db_dsn)
    accepted = await st.event_ids()
    await rx.wait_for(lambda: sorted(rx.accepted_ids()) == sorted(accepted))
    try:
        await lc.run_until_b_committed("id")
        # A few fan-out passes later (poll 50 ms) the cursor still has not passed A.
        await asyncio.sleep(0.5)
        cur = await st.pool.fetchrow("SELECT tx::text::bigint AS tx, event_id FROM webhook_cursor")
        assert cur["tx"] < lc.a_xid and f"evt_{lc.b_id}" not in rx.accepted_ids()
        assert await st.deliveries(ep["id"], state="pending") == []  # B was not fanned out either
        await lc.commit_a()
    finally:
        await lc.abandon()
    both = [f"evt_{lc.a_id}", f"evt_{lc.b_id}"]
    await rx.wait_for(lambda: all(e in rx.accepted_ids() for e in both))
    await st.until(lambda: _settled(st, ep["id"]), what="every delivery recorded")
    everything = await st.event_ids()
    assert sorted(rx.accepted_ids()) == sorted(everything)  # each exactly once
    assert sorted(d["event_id"] for d in await st.deliveries(ep["id"])) == sorted(everything)


async def _settled(st: Stack, endpoint_id: str) -> bool:
    return all(d["state"] == "delivered" for d in await st.deliveries(endpoint_id))
