"""Issue 4 end to end: a templated message arrives as well-formed, DKIM-signed MIME; its tracked
link redirects and records a click; its one-click unsubscribe suppresses the address."""

from __future__ import annotations

import asyncio
import email
import re
import time
from email import policy
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx

from engine.compose.dkim import keygen
from engine.compose.pipeline import Composer
from engine.deliver.scheduler import DeliveryWorker
from tests.configs import BULK_WITHOUT_CONSENT
from tests.receivers import smtp_receiver, tls_ca  # noqa: F401
from tests.test_dkim import dkimpy_results, opendkim_results, perl_results

HTML = (
    '<html><body><p>Hi {{ name }},</p>'
    '<p><a href="https://shop.example.com/orders/{{ order_id }}?ref=mail">See your order</a></p>'
    '<p><a href="mailto:help@example.com">Help</a></p></body></html>'
)


async def test_templated_message_arrives_signed_tracked_and_unsubscribable(engine_factory, smtp_receiver, tmp_path: Path) -> None:
    rx = smtp_receiver()
    keydir = tmp_path / "keys"
    rsa_path, rsa_txt = keygen("example.com", "s1", "rsa", keydir)
    ed_path, ed_txt = keygen("example.com", "e1", "ed25519", keydir)
    dns = SimpleNamespace(txt={
        "s1._domainkey.example.com": "".join(re.findall(r'"([^"]*)"', rsa_txt)),
        "e1._domainkey.example.com": "".join(re.findall(r'"([^"]*)"', ed_txt)),
    })
    dns.dnsfunc = lambda name, timeout=5: (dns.txt.get(name.decode().rstrip(".")) or "").encode() or None
    eng = await engine_factory(
        f'[routing.static]\n"example.net" = "{rx.address}:{rx.port}"\n'
        '[[domains]]\nname = "example.com"\n'
        f'[[domains.dkim]]\nselector = "s1"\nalgorithm = "rsa-sha256"\nkey_file = "{rsa_path}"\n'
        f'[[domains.dkim]]\nselector = "e1"\nalgorithm = "ed25519-sha256"\nkey_file = "{ed_path}"\n'
        '[tracking]\n[[tracking.keys]]\nid = 1\nsecret = "0123456789abcdef0123456789abcdef-test"\n'
        "[delivery]\npoll_interval = \"100ms\"\nflush_interval = \"20ms\"\n" + BULK_WITHOUT_CONSENT
    )
    admin, _ = await eng.apikeys.create("admin", ["admin"])
    host, port = eng.http_address
    h = {"Authorization": f"Bearer {admin}"}
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as c:
        up = await c.post("/v1/templates", headers=h, json={"name": "order", "parts": {
            "subject": "Order {{ order_id }} shipped", "html": HTML}})
        assert up.status_code == 201, up.text
        missing = await c.post("/v1/messages", headers=h, json={
            "from": "Shop <shop@example.com>", "to": ["ann@example.net"], "template": "order", "vars": {"name": "Ann"}})
        assert missing.status_code == 422 and "order_id" in missing.json()["error"]
        r = await c.post("/v1/messages", headers=h, json={
            "from": "Shop <shop@example.com>", "to": [{"email": "ann@example.net", "vars": {"name": "Ann"}}],
            "template": "order", "vars": {"order_id": "A-17", "name": "Customer"}, "stream": "bulk"})
        assert r.status_code == 202, r.text

        worker = DeliveryWorker(eng.settings, eng.pool, owner="e2e", dsn=eng.dsn,
                                composer=Composer(eng.settings, renderer=eng.renderer, keyring=eng.keyring))
        task = asyncio.create_task(worker.run())
        try:
            deadline = time.monotonic() + 20
            while not rx.messages and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert len(rx.messages) == 1, await eng.pool.fetch("SELECT state, last_reply FROM recipients")
        finally:
            worker.request_stop()
            await asyncio.wait_for(task, 30)

        raw = rx.messages[0].data
        msg = email.message_from_bytes(raw, policy=policy.default)
        assert msg["Subject"] == "Order A-17 shipped"
        assert msg.get_content_type() == "multipart/alternative"
        assert msg["Message-ID"].endswith("@example.com>")
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        html = msg.get_body(("html",)).get_content()
        text = msg.get_body(("plain",)).get_content()
        assert "Hi Ann," in html and "Hi Ann," in text  # per-recipient vars win over message vars
        assert "shop.example.com" not in html  # the link was rewritten to a tracking URL
        assert "mailto:help@example.com" in html  # mailto links are left alone

        # Signatures verify after the SMTP hop, with dkimpy and with two independent verifiers.
        assert dkimpy_results(dns, raw) == [True, True]
        assert perl_results(dns, raw, tmp_path)["s1"] == "pass"
        assert opendkim_results(dns, raw, tmp_path) == {"s1": "pass", "e1": "pass"}

        click = re.search(r'href="([^"]*/t/c/[^"]+)"', html).group(1)
        resp = await c.get(urlsplit(click).path)
        assert resp.status_code == 302
        assert resp.headers["location"] == "https://shop.example.com/orders/A-17?ref=mail"
        forged = await c.get(urlsplit(click).path[:-3] + "xyz")
        assert forged.status_code == 404

        unsub = re.search(r"<(https?://[^>]+/u/[^>]+)>", msg["List-Unsubscribe"]).group(1)
        one_click = await c.post(urlsplit(unsub).path, content="List-Unsubscribe=One-Click",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert one_click.status_code == 200
        deadline = time.monotonic() + 1.0
        assert await eng.pool.fetchval("SELECT count(*) FROM suppressions WHERE address = 'ann@example.net' AND scope = 'bulk'") == 1
        assert time.monotonic() < deadline
        events = {row["type"] for row in await eng.pool.fetch("SELECT type FROM events")}
        assert {"clicked", "unsubscribed"} <= events
        again = await c.post("/v1/messages", headers=h, json={
            "from": "shop@example.com", "to": ["ann@example.net"], "subject": "x", "text": "y", "stream": "bulk"})
        assert again.json()["recipients"][0]["state"] == "suppressed"


async def test_inline_image_attachment_and_mailto_unsubscribe(engine_factory, smtp_receiver) -> None:
    import base64

    rx = smtp_receiver()
    eng = await engine_factory(
        f'[routing.static]\n"example.net" = "{rx.address}:{rx.port}"\n'
        '[mime]\nlist_unsubscribe_mailto = "unsubscribe@bounces.example.com"\n'
        '[tracking]\ntrack_opens = false\n[[tracking.keys]]\nid = 1\nsecret = "0123456789abcdef0123456789abcdef-test"\n'
        "[delivery]\npoll_interval = \"100ms\"\nflush_interval = \"20ms\"\n" + BULK_WITHOUT_CONSENT
    )
    key, _ = await eng.apikeys.create("k", ["send"])
    host, port = eng.http_address
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as c:
        bad = await c.post("/v1/messages", headers={"Authorization": f"Bearer {key}"}, json={
            "from": "shop@example.com", "to": ["ann@example.net"], "subject": "x", "text": "t",
            "attachments": [{"filename": "a\r\nb.txt", "content": "eA=="}]})
        assert bad.status_code == 422 and bad.json()["field"].startswith("attachments")
        r = await c.post("/v1/messages", headers={"Authorization": f"Bearer {key}"}, json={
            "from": "shop@example.com", "to": ["ann@example.net"], "subject": "Logo", "stream": "bulk",
            "html": '<p>Our logo: <img src="cid:logo@shop"></p>', "text": "Our logo",
            "inline_images": [{"content_id": "logo@shop", "content_type": "image/png", "content": base64.b64encode(png).decode()}],
            "attachments": [{"filename": "terms.txt", "content_type": "text/plain", "content": base64.b64encode(b"terms").decode()}]})
        assert r.status_code == 202, r.text
    worker = DeliveryWorker(eng.settings, eng.pool, owner="e2e2", dsn=eng.dsn,
                            composer=Composer(eng.settings, renderer=eng.renderer, keyring=eng.keyring))
    task = asyncio.create_task(worker.run())
    try:
        deadline = time.monotonic() + 20
        while not rx.messages and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
    msg = email.message_from_bytes(rx.messages[0].data, policy=policy.default)
    assert msg.get_content_type() == "multipart/mixed"
    related = next(p for p in msg.walk() if p.get_content_type() == "multipart/related")
    image = next(p for p in related.walk() if p.get_content_type() == "image/png")
    assert image["Content-ID"] == "<logo@shop>" and image.get_content() == png
    attachment = next(p for p in msg.iter_attachments() if p.get_filename() == "terms.txt")
    assert attachment.get_content() == "terms"
    unsub = msg["List-Unsubscribe"]
    assert "<mailto:unsubscribe@bounces.example.com?subject=unsubscribe%20" in unsub and "/u/" in unsub
