"""What REST submission accepts composes: submit runs compose's own field checks (one validator).

Before, a subject with U+2028, a reserved header or 51 custom headers got a
202 and then bounced ``5.6.0`` at compose time. Each such input must now be a
422 naming the field, with nothing queued; and input just inside every limit
must be accepted AND arrive at the receiver.
"""

from __future__ import annotations

import asyncio
import base64
import email
import time
from email import policy
from typing import Any

import httpx
import pytest

from engine.compose.pipeline import Composer
from engine.deliver.scheduler import DeliveryWorker
from tests.receivers import smtp_receiver, tls_ca  # noqa: F401

MSG: dict[str, Any] = {"from": "App <app@example.com>", "to": ["a@example.net"], "subject": "Hi", "text": "Hello"}
ATT = {"filename": "a.txt", "content_type": "text/plain", "content": base64.b64encode(b"hi").decode()}


@pytest.fixture
async def api(engine_factory: Any) -> Any:
    eng = await engine_factory('[http]\nlisten = "127.0.0.1:0"\n')
    key, _ = await eng.apikeys.create("sender", ["send"])
    host, port = eng.http_address
    async with httpx.AsyncClient(
        base_url=f"http://{host}:{port}", timeout=30, headers={"Authorization": f"Bearer {key}"}
    ) as client:
        yield client


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("subject U+2028", {"subject": "Hi\u2028Bcc: x@example.org"}, "subject"),
    ("subject U+0085", {"subject": "Hi\x85there"}, "subject"),
    ("subject U+2029", {"subject": "Hi\u2029there"}, "subject"),
    ("header value U+2028", {"headers": {"X-Tag": "a\u2028b"}}, "headers.X-Tag"),
    ("header value U+0085", {"headers": {"X-Tag": "a\x85b"}}, "headers.X-Tag"),
    ("from name U+2028", {"from": {"email": "app@example.com", "name": "App\u2028X"}}, "from.name"),
    ("to name U+0085", {"to": [{"email": "a@example.net", "name": "Ann\x85"}]}, "to[0].name"),
    ("cc name U+2028", {"cc": ["C\u2028y <c@example.net>"]}, "cc[0].name"),
    ("reply_to name U+2028", {"reply_to": {"email": "r@example.com", "name": "R\u2028"}}, "reply_to.name"),
    ("attachment filename U+2028", {"attachments": [{**ATT, "filename": "a\u2028.txt"}]}, "attachments[0].filename"),
    ("attachment filename U+0085", {"attachments": [{**ATT, "filename": "a\x85.txt"}]}, "attachments[0].filename"),
    ("attachment filename path", {"attachments": [{**ATT, "filename": "../etc/passwd"}]}, "attachments[0].filename"),
    ("attachment subtype over 64", {"attachments": [{**ATT, "content_type": "text/" + "x" * 65}]},
     "attachments[0].content_type"),
    ("to address U+2028", {"to": ["a\u2028b@example.net"]}, "to[0]"),
    ("bcc address U+0085", {"bcc": ["a\x85b@example.net"]}, "bcc[0]"),
    ("header Bcc", {"headers": {"Bcc": "x@example.org"}}, "headers.Bcc"),
    ("header From", {"headers": {"From": "x@example.org"}}, "headers.From"),
    ("header Content-Type", {"headers": {"Content-Type": "text/html"}}, "headers.Content-Type"),
    ("header DKIM-Signature", {"headers": {"DKIM-Signature": "v=1"}}, "headers.DKIM-Signature"),
    ("header Received", {"headers": {"Received": "from x"}}, "headers.Received"),
    ("header Return-Path", {"headers": {"Return-Path": "<x@example.org>"}}, "headers.Return-Path"),
    ("header X-Engine-Anything", {"headers": {"X-Engine-Anything": "1"}}, "headers.X-Engine-Anything"),
    ("header reserved in lower case", {"headers": {"content-type": "text/html"}}, "headers.content-type"),
    ("51 custom headers", {"headers": {f"X-H{i}": "v" for i in range(51)}}, "headers"),
    ("same header twice by case", {"headers": {"X-Tag": "1", "x-tag": "2"}}, "headers.x-tag"),
    ("no to (compose requires one)", {"to": [], "cc": ["c@example.net"]}, "to"),
]


@pytest.mark.parametrize(("case", "change", "field"), BAD, ids=[b[0] for b in BAD])
async def test_what_compose_refuses_is_a_422_naming_the_field(
    api: Any, conn: Any, case: str, change: dict[str, Any], field: str
) -> None:
    r = await api.post("/v1/messages", json={**MSG, **change})
    assert r.status_code == 422, f"{case}: {r.status_code} {r.text}"
    assert r.json()["field"] == field, r.json()
    assert await conn.fetchval("SELECT count(*) FROM messages") == 0


async def test_batch_names_the_message_and_queues_nothing(api: Any, conn: Any) -> None:
    bad = {**MSG, "headers": {"Received": "from x"}}
    r = await api.post("/v1/messages/batch", json={"messages": [MSG, bad]})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "messages[1].headers.Received"
    assert await conn.fetchval("SELECT count(*) FROM messages") == 0


async def test_template_message_headers_are_checked_at_submit(api: Any, conn: Any) -> None:
    r = await api.post("/v1/messages", json={
        "from": "App <app@example.com>", "to": ["a@example.net"], "template": "welcome", "vars": {"name": "A"},
        "headers": {"X-Note": "a\u2028b"},
    })
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "headers.X-Note"
    assert await conn.fetchval("SELECT count(*) FROM messages") == 0


async def test_input_just_inside_every_limit_is_accepted_and_delivered(engine_factory: Any, smtp_receiver: Any) -> None:
    """The same families of input at the edge of each limit: 202, then it arrives (no 5.6.0 bounce)."""
    rx = smtp_receiver()
    eng = await engine_factory(
        '[http]\nlisten = "127.0.0.1:0"\n'
        f'[routing.static]\n"example.net" = "{rx.address}:{rx.port}"\n'
        '[delivery]\npoll_interval = "100ms"\nflush_interval = "20ms"\n'
    )
    key, _ = await eng.apikeys.create("sender", ["send"])
    host, port = eng.http_address
    headers = {f"X-H{i:02d}": f"v{i} \u00e9\u2027\u2030 " + "w" * 900 for i in range(50)}  # 50 headers, near 998
    headers["X-" + "n" * 74] = "long name"  # 76 characters, the longest field name
    del headers["X-H49"]
    msg = {
        "from": {"email": "app@example.com", "name": "\u00c9quipe \u2027 " + "n" * 190},
        "to": [{"email": "a@example.net", "name": "Ann\tO'Neil \u00e9"}],
        "cc": ["Cy \u2030 <c@example.net>"],
        "reply_to": {"email": "r@example.com", "name": "R\u2027"},
        "subject": ("Subject \u00e9\u2027\u00a0\u2030 " + "s" * 998)[:998],
        "text": "Line\u2028with a separator in the body is fine\x85too",
        "html": "<p>Hello\u2028there</p>",
        "headers": headers,
        "attachments": [{**ATT, "filename": "r\u00e9sum\u00e9 \u2027 " + "f" * 180 + ".txt",
                         "content_type": "text/" + "x" * 64}],
    }
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30,
                                 headers={"Authorization": f"Bearer {key}"}) as c:
        r = await c.post("/v1/messages", json=msg)
    assert r.status_code == 202, r.text

    worker = DeliveryWorker(eng.settings, eng.pool, owner="parity", dsn=eng.dsn,
                            composer=Composer(eng.settings, renderer=eng.renderer, keyring=eng.keyring))
    task = asyncio.create_task(worker.run())
    try:
        deadline = time.monotonic() + 60
        while len(rx.messages) < 1 and time.monotonic() < deadline:
            rows = await eng.pool.fetch("SELECT state, last_reply FROM recipients")
            assert not any("5.6.0" in (row["last_reply"] or "") for row in rows), rows
            await asyncio.sleep(0.1)
        assert rx.messages, await eng.pool.fetch("SELECT state, last_reply FROM recipients")
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
    got = email.message_from_bytes(rx.messages[0].data, policy=policy.default)
    assert got["Subject"] == msg["subject"]
    assert got["X-H00"] == headers["X-H00"]
    assert len([k for k in got.keys() if k.startswith("X-")]) == 50
