"""Tracking endpoints over a real socket: click redirects, open pixel, one-click unsubscribe.

Tokens are signed in the test with the same key the engine is configured with,
for recipient rows created by real submissions.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from engine.compose.tracking import Keyring, TokenKind

REPO = Path(__file__).resolve().parent.parent
SECRET = "test-tracking-secret-" + "s" * 32
CONFIG = f"""
[templates]
directory = "{REPO / 'templates'}"

[tracking]
base_url = "https://t.example.test"

[[tracking.keys]]
id = 3
secret = "{SECRET}"
"""
DAY = 86400.0
HTML = ('<p><a href="https://example.com/a?x=1&amp;y=2">A</a> <a href="mailto:x@example.com">mail</a> '
        '<a href="https://example.org/b#frag">B</a></p>')


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def api(engine_factory) -> Any:
    eng = await engine_factory(CONFIG)
    admin, _ = await eng.apikeys.create("admin", ["admin"])
    host, port = eng.http_address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as client:
        client.engine, client.key = eng, admin  # type: ignore[attr-defined]
        client.ring = Keyring({3: SECRET})  # type: ignore[attr-defined]
        yield client


async def submit(api, **fields: Any) -> dict[str, Any]:
    body = {"from": "app@example.com", "to": ["reader@example.net"], "subject": "Hi", **fields}
    r = await api.post("/v1/messages", json=body, headers=auth(api.key))
    assert r.status_code == 202, r.text
    return r.json()


async def events(conn, kind: str) -> list[Any]:
    return await conn.fetch("SELECT * FROM events WHERE type = $1 ORDER BY id", kind)


async def test_click_redirects_to_exact_url_and_records(api, conn) -> None:
    out = await submit(api, html=HTML)
    rid = out["recipients"][0]["id"]
    for index, url in ((0, "https://example.com/a?x=1&y=2"), (1, "https://example.org/b#frag")):
        tok = api.ring.sign(TokenKind.CLICK, rid, index)
        r = await api.get(f"/t/c/{tok}")
        assert r.status_code == 302, r.text
        assert r.headers["location"] == url
        assert "no-store" in r.headers["cache-control"]
    rows = await events(conn, "clicked")
    assert [(e["recipient_id"], e["message_id"], e["data"]["link_index"], e["data"]["url"]) for e in rows] == [
        (rid, uuid.UUID(out["id"]), 0, "https://example.com/a?x=1&y=2"),
        (rid, uuid.UUID(out["id"]), 1, "https://example.org/b#frag"),
    ]
    assert rows[0]["data"]["v"] == 1
    # Out of range: never a redirect anywhere else.
    r = await api.get(f"/t/c/{api.ring.sign(TokenKind.CLICK, rid, 2)}")
    assert r.status_code == 404 and "location" not in r.headers


async def test_click_rerenders_pinned_template_per_recipient(api, conn) -> None:
    parts = {"subject": "s", "html": '<a href="https://shop.example/{{ code }}?u={{ who }}">go</a>'}
    r = await api.post("/v1/templates", json={"name": "coupon", "parts": parts}, headers=auth(api.key))
    assert r.status_code == 201, r.text
    out = await submit(api, template="coupon", vars={"code": "SPRING"},
                       to=[{"email": "a@example.net", "vars": {"who": "a"}},
                           {"email": "b@example.net", "vars": {"who": "b", "code": "VIP"}}])
    # A later version must not change where the old message's links lead.
    parts2 = {"subject": "s", "html": '<a href="https://evil.example/">go</a>'}
    assert (await api.post("/v1/templates", json={"name": "coupon", "parts": parts2}, headers=auth(api.key))).status_code == 201
    a, b = (x["id"] for x in out["recipients"])
    r = await api.get(f"/t/c/{api.ring.sign(TokenKind.CLICK, a, 0)}")
    assert r.status_code == 302 and r.headers["location"] == "https://shop.example/SPRING?u=a"
    r = await api.get(f"/t/c/{api.ring.sign(TokenKind.CLICK, b, 0)}")
    assert r.status_code == 302 and r.headers["location"] == "https://shop.example/VIP?u=b"


async def test_bad_tokens_are_404_or_410_and_logged(api, conn) -> None:
    out = await submit(api, html=HTML)
    rid = out["recipients"][0]["id"]
    good = api.ring.sign(TokenKind.CLICK, rid, 0)
    forged = good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB")
    other_key = Keyring({3: "another-secret-" + "z" * 32}).sign(TokenKind.CLICK, rid, 0)
    expired = api.ring.sign(TokenKind.CLICK, rid, 0, now=time.time() - 500 * DAY)
    cases = {
        forged: 404, good[:20]: 404, other_key: 404, "x" * 200: 404, "not*a*token": 404,
        api.ring.sign(TokenKind.OPEN, rid): 404,            # wrong kind for the endpoint
        api.ring.sign(TokenKind.CLICK, 999_999, 0): 404,     # no such recipient
        expired: 410,
    }
    with capture_logs() as logs:
        for tok, status in cases.items():
            r = await api.get(f"/t/c/{tok}")
            assert r.status_code == status, (tok, r.status_code, r.text)
            assert "location" not in r.headers
            r = await api.post(f"/u/{tok}", data={"List-Unsubscribe": "One-Click"})
            assert r.status_code == status, (tok, r.status_code, r.text)
    names = {e["event"] for e in logs}
    assert {"tracking_token_invalid", "tracking_token_expired", "tracking_token_wrong_kind"} <= names
    assert all(e["log_level"] == "warning" for e in logs if e["event"].startswith("tracking_token"))
    assert await events(conn, "clicked") == [] and await events(conn, "unsubscribed") == []
    assert await conn.fetchval("SELECT count(*) FROM suppressions") == 0


async def test_open_pixel(api, conn) -> None:
    out = await submit(api, html=HTML)
    rid = out["recipients"][0]["id"]
    for tok in (api.ring.sign(TokenKind.OPEN, rid), "forged-token", api.ring.sign(TokenKind.CLICK, rid, 0)):
        r = await api.get(f"/t/o/{tok}")
        assert r.status_code == 200
        assert r.headers["content-type"] == "image/gif" and r.content.startswith(b"GIF89a")
        assert "no-store" in r.headers["cache-control"]
    rows = await events(conn, "opened")
    assert [(e["recipient_id"], e["message_id"], e["data"]) for e in rows] == [(rid, uuid.UUID(out["id"]), {"v": 1})]


async def test_one_click_unsubscribe_revokes_the_streams_consent_purpose(api, conn) -> None:
    """On a stream with a consent rule (bulk -> marketing) the unsubscribe is a revocation, not a suppression."""
    grant = {"purpose": "marketing", "status": "granted", "source": "crm:test", "captured_at": "2026-01-01T00:00:00Z"}
    r = await api.post("/v1/consent", json=[{"address": a, **grant} for a in ("reader@example.net", "other@example.net")],
                       headers=auth(api.key))
    assert r.status_code == 200, r.text
    out = await submit(api, html=HTML, stream="bulk", to=["Reader@Example.NET"])
    queued = await submit(api, text="x", stream="bulk", to=["reader@example.net"])
    assert queued["recipients"][0]["state"] == "queued"
    rid = out["recipients"][0]["id"]
    tok = api.ring.sign(TokenKind.UNSUBSCRIBE, rid)
    r = await api.post(f"/u/{tok}", data={"List-Unsubscribe": "One-Click"})
    assert r.status_code == 200, r.text
    assert await conn.fetchval("SELECT count(*) FROM suppressions") == 0
    row = await conn.fetchrow("SELECT status, source FROM consent WHERE address = 'reader@example.net' AND purpose = 'marketing'")
    assert tuple(row) == ("revoked", "list-unsubscribe")
    ev = await events(conn, "unsubscribed")
    assert len(ev) == 1 and ev[0]["recipient_id"] == rid and ev[0]["data"]["method"] == "one-click"
    assert ev[0]["data"]["revoked"] == "marketing"
    # Mail already queued for the address on a marketing stream is stopped at once.
    state = await conn.fetchval("SELECT state FROM recipients WHERE message_id = $1", uuid.UUID(queued["id"]))
    assert state == "suppressed"

    # Posting the confirmation form again changes nothing new and records no second event.
    r = await api.post(f"/u/{tok}")
    assert r.status_code == 200, r.text
    assert len(await events(conn, "unsubscribed")) == 1

    again = await submit(api, text="x", stream="bulk", to=["Reader@example.net", "other@example.net"])
    assert {x["email"]: x["state"] for x in again["recipients"]} == {
        "Reader@example.net": "suppressed", "other@example.net": "queued"}
    reasons = await conn.fetch("SELECT address, reason FROM recipients WHERE message_id = $1", uuid.UUID(again["id"]))
    assert {s["address"]: s["reason"] for s in reasons} == {"Reader@example.net": "consent:marketing", "other@example.net": None}
    elsewhere = await submit(api, text="x", stream="transactional", to=["Reader@example.net"])
    assert elsewhere["recipients"][0]["state"] == "queued"


async def test_unsubscribe_get_changes_nothing_and_form_post_records(api, conn) -> None:
    """A link scanner's prefetch (GET) must not unsubscribe; the page's form POST does.

    On a stream without a consent rule (default) the unsubscribe suppresses the address for the stream.
    """
    out = await submit(api, text="x", stream="default")
    tok = api.ring.sign(TokenKind.UNSUBSCRIBE, out["recipients"][0]["id"])
    for _ in range(2):
        r = await api.get(f"/u/{tok}")
        assert r.status_code == 200 and "default" in r.text
        assert f'<form method="post" action="/u/{tok}">' in r.text and ">Unsubscribe</button>" in r.text
        assert "<script" not in r.text and "no-store" in r.headers["cache-control"]
    assert await conn.fetchval("SELECT count(*) FROM suppressions") == 0
    assert await events(conn, "unsubscribed") == []

    # What the browser sends for the form: no List-Unsubscribe=One-Click body.
    r = await api.post(f"/u/{tok}", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    assert await conn.fetchval("SELECT count(*) FROM suppressions WHERE scope = 'default'") == 1
    ev = await events(conn, "unsubscribed")
    assert len(ev) == 1 and ev[0]["data"]["method"] == "post"


async def test_unsubscribe_page_bad_tokens(api, conn) -> None:
    out = await submit(api, text="x", stream="bulk")
    rid = out["recipients"][0]["id"]
    expired = api.ring.sign(TokenKind.UNSUBSCRIBE, rid, now=time.time() - 500 * DAY)
    cases = {expired: 410, "forged<script>": 404, api.ring.sign(TokenKind.CLICK, rid, 0): 404,
             api.ring.sign(TokenKind.UNSUBSCRIBE, 999_999): 404}
    for tok, status in cases.items():
        r = await api.get(f"/u/{tok}")
        assert r.status_code == status and "Nothing was changed" in r.text and "<script" not in r.text
    assert await conn.fetchval("SELECT count(*) FROM suppressions") == 0


async def test_without_keys_everything_is_404(engine_factory) -> None:
    eng = await engine_factory("")
    host, port = eng.http_address
    tok = Keyring({3: SECRET}).sign(TokenKind.CLICK, 1, 0)
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as c:
        assert (await c.get(f"/t/c/{tok}")).status_code == 404
        assert (await c.post(f"/u/{tok}")).status_code == 404
        assert (await c.get(f"/u/{tok}")).status_code == 404
        r = await c.get(f"/t/o/{tok}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/gif"


async def test_event_store_batches(pool, conn) -> None:
    from engine.errors import EngineError
    from engine.events import Event, EventStore

    store = EventStore(pool)
    mid = uuid.uuid4()
    n = await store.record([
        Event("delivered", 1, mid, {"mx": "mx.example.net"}),
        Event("bounced", 2, mid, {"code": 550}),
        Event("deferred", None, None),
    ])
    assert n == 3 and await store.record([]) == 0
    rows = await conn.fetch("SELECT type, recipient_id, message_id, data FROM events ORDER BY id")
    assert [(r["type"], r["recipient_id"], r["message_id"], r["data"]) for r in rows] == [
        ("delivered", 1, mid, {"v": 1, "mx": "mx.example.net"}),
        ("bounced", 2, mid, {"v": 1, "code": 550}),
        ("deferred", None, None, {"v": 1}),
    ]
    with pytest.raises(EngineError):
        await store.record([Event("exploded", 1, mid)])
    # Nothing of a refused batch is written.
    assert await conn.fetchval("SELECT count(*) FROM events") == 3
    assert await store.record_for_recipient("opened", 123456) is False


async def test_openapi_documents_public_tracking_responses(api) -> None:
    spec = (await api.get("/openapi.json")).json()
    paths = spec["paths"]
    ops = {
        "open": paths["/t/o/{token}"]["get"], "click": paths["/t/c/{token}"]["get"],
        "page": paths["/u/{token}"]["get"], "post": paths["/u/{token}"]["post"],
    }
    for name, op in ops.items():
        assert not {"401", "403"} & set(op["responses"]), (name, sorted(op["responses"]))
        assert "security" not in op, name
    click = ops["click"]["responses"]
    assert "200" not in click and {"302", "404", "410"} <= set(click)
    assert "Location" in click["302"]["headers"]
    assert "application/json" not in str([click[c] for c in ("302", "404", "410")])
    gif = ops["open"]["responses"]
    assert set(gif["200"]["content"]) == {"image/gif"} and not {"404", "410"} & set(gif)
    for name in ("page", "post"):
        r = ops[name]["responses"]
        assert set(r["200"]["content"]) == {"text/html"}, name
        assert set(r["404"]["content"]) == {"text/html"} and set(r["410"]["content"]) == {"text/html"}, name
    # The keyed API still documents its auth failures.
    assert {"401", "403"} <= set(paths["/v1/messages"]["post"]["responses"])
