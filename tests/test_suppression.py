"""Suppressions: the table API, and the accept layer refusing to queue suppressed recipients."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from engine.errors import ValidationFailed
from engine.suppression import Suppressions, normalize_address
from tests.configs import BULK_WITHOUT_CONSENT, TRACKING_KEYS


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_add_remove_and_lookup(pool) -> None:
    s = Suppressions(pool)
    assert await s.add("Ann@Example.COM", "bulk", "unsubscribed", "test") is True
    assert await s.add("Ann@example.com", "bulk", "again", "test") is False  # first reason stays
    assert await s.add("bob@example.com", "*", "hard bounce", "test") is True
    addrs = ["Ann@example.com", "bob@example.com", "carl@example.com", "ann@example.com"]
    # Matching ignores case in the local part too: an unsubscribe is not dodged by 'Ann' vs 'ann'.
    assert await s.is_suppressed(addrs, "bulk") == {"Ann@example.com", "ann@example.com", "bob@example.com"}
    assert await s.is_suppressed(addrs, "transactional") == {"bob@example.com"}
    assert await s.is_suppressed([], "bulk") == set()
    both = await s.suppressed_pairs({"bulk": addrs, "default": addrs})
    assert both == {"bulk": {"Ann@example.com", "ann@example.com", "bob@example.com"}, "default": {"bob@example.com"}}
    listed = await s.list()
    assert {(x.address, x.scope, x.reason) for x in listed} == {
        ("ann@example.com", "bulk", "unsubscribed"), ("bob@example.com", "*", "hard bounce")}
    assert await s.remove("ANN@EXAMPLE.com", "default") == []
    assert await s.remove("ANN@EXAMPLE.com") == ["bulk"]
    assert await s.is_suppressed(addrs, "bulk") == {"bob@example.com"}


@pytest.mark.parametrize("address,scope,field", [
    ("not an address", "bulk", "address"),
    ("a@example.com", "Bulk Mail", "scope"),
    ("a@example.com", "", "scope"),
])
async def test_bad_input(pool, address, scope, field) -> None:
    with pytest.raises(ValidationFailed) as err:
        await Suppressions(pool).add(address, scope, "r", "s")
    assert err.value.field == field


def test_normalize() -> None:
    assert normalize_address(" Ann@Example.COM. ") == "ann@example.com"


@pytest.fixture
async def api(engine_factory) -> Any:
    eng = await engine_factory(BULK_WITHOUT_CONSENT + TRACKING_KEYS)
    key, _ = await eng.apikeys.create("sender", ["send", "read"])
    host, port = eng.http_address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as client:
        client.engine, client.key = eng, key  # type: ignore[attr-defined]
        yield client


async def test_submit_reports_suppressed_and_does_not_queue(api, conn) -> None:
    s = api.engine.suppressions
    await s.add("blocked@example.net", "*", "complaint", "test")
    await s.add("news-off@example.net", "bulk", "unsubscribed", "test")
    body = {"from": "app@example.com", "to": ["ok@example.net", "Blocked@EXAMPLE.net"],
            "cc": ["news-off@example.net"], "subject": "s", "text": "t", "stream": "bulk"}
    r = await api.post("/v1/messages", json=body, headers=auth(api.key))
    assert r.status_code == 202, r.text
    got = {x["email"]: x["state"] for x in r.json()["recipients"]}
    assert got == {"ok@example.net": "queued", "Blocked@example.net": "suppressed", "news-off@example.net": "suppressed"}
    rows = await conn.fetch("SELECT address, state FROM recipients WHERE message_id = $1", uuid.UUID(r.json()["id"]))
    assert {x["address"]: x["state"] for x in rows} == got
    status = (await api.get(f"/v1/messages/{r.json()['id']}", headers=auth(api.key))).json()
    assert {x["email"]: x["state"] for x in status["recipients"]} == got
    # Never claimed: only the queued row is ready for delivery.
    claimed = await api.engine.outbox.claim("test-owner", 10, 60)
    assert [c["address"] for c in claimed] == ["ok@example.net"]

    # Other stream: the bulk-only unsubscribe does not apply; the global one does. Batch + idempotency path.
    batch = {"messages": [{**body, "stream": "transactional"}, {**body, "to": ["x@example.net"], "cc": []}]}
    h = {**auth(api.key), "Idempotency-Key": "k1"}
    r = await api.post("/v1/messages/batch", json=batch, headers=h)
    assert r.status_code == 202, r.text
    first, second = r.json()["messages"]
    assert {x["email"]: x["state"] for x in first["recipients"]} == {
        "ok@example.net": "queued", "Blocked@example.net": "suppressed", "news-off@example.net": "queued"}
    assert [x["state"] for x in second["recipients"]] == ["queued"]


async def test_raw_message_recipients_are_checked(api, conn) -> None:
    await api.engine.suppressions.add("gone@example.net", "*", "hard bounce", "test")
    raw = "From: a@example.com\r\nTo: gone@example.net\r\nSubject: raw\r\n\r\nbody\r\n"
    r = await api.post("/v1/messages", headers=auth(api.key),
                       json={"raw": raw, "envelope": {"mail_from": "", "rcpt_to": ["gone@example.net"]}})
    assert r.status_code == 202 and r.json()["recipients"][0]["state"] == "suppressed"
