"""First-run truths (issue 16): what a new user hits before reading the fine print."""

from __future__ import annotations

import asyncio
import time

import httpx

from engine.compose.pipeline import Composer
from engine.deliver.scheduler import DeliveryWorker
from tests.dnsserver import dns_server  # noqa: F401  (fixture)
from tests.receivers import smtp_receiver, tls_ca  # noqa: F401

KEY_TOML = '[[tracking.keys]]\nid = 1\nsecret = "0123456789abcdef0123456789abcdef-test"\n'


async def _client(eng, scopes=("send", "read", "admin")) -> httpx.AsyncClient:
    key, _ = await eng.apikeys.create("k", list(scopes))
    return httpx.AsyncClient(base_url=f"http://{eng.http_address[0]}:{eng.http_address[1]}",
                             headers={"Authorization": f"Bearer {key}"})


async def test_bulk_without_tracking_keys_is_refused_at_submit_not_bounced_later(engine_factory) -> None:
    eng = await engine_factory('[webhooks]\nenabled = false\n[consent.streams.bulk]\npurpose = "marketing"\nrule = "none"\n')
    async with await _client(eng) as http:
        r = await http.post("/v1/messages", json={"from": "a@sender.test", "to": ["x@example.net"], "subject": "s",
                                                  "text": "t", "stream": "bulk"})
        assert r.status_code == 422, r.text
        assert r.json()["field"] == "stream" and "tracking.keys" in r.json()["error"]
        assert await eng.pool.fetchval("SELECT count(*) FROM messages") == 0
        # Raw messages carry their own headers: the engine does not add List-Unsubscribe to them.
        r = await http.post("/v1/messages", json={"raw": "Subject: s\r\n\r\nbody\r\n", "stream": "bulk",
                                                  "envelope": {"mail_from": "a@sender.test", "rcpt_to": ["x@example.net"]}})
        assert r.status_code == 202, r.text


async def test_too_many_recipients_in_one_request_is_413(engine_factory) -> None:
    eng = await engine_factory('[webhooks]\nenabled = false\n[api]\nmax_recipients_per_request = 50\n')
    async with await _client(eng) as http:
        msgs = [{"from": "a@sender.test", "to": [f"u{i}-{j}@example.net" for j in range(10)], "subject": "s", "text": "t"}
                for i in range(6)]
        r = await http.post("/v1/messages/batch", json={"messages": msgs})
        assert r.status_code == 413 and r.json()["field"] == "messages", r.text
        assert await eng.pool.fetchval("SELECT count(*) FROM recipients") == 0
        r = await http.post("/v1/messages/batch", json={"messages": msgs[:5]})
        assert r.status_code == 202, r.text


async def test_dns_failure_of_a_reserved_test_domain_bounces_but_never_suppresses(engine_factory, dns_server) -> None:
    srv = dns_server({})  # knows nothing: every name is NXDOMAIN
    eng = await engine_factory(f'[webhooks]\nenabled = false\n[routing]\nnameservers = ["{srv.nameserver}"]\ntimeout = "2s"\n'
                               '[delivery]\nflush_interval = "20ms"\npoll_interval = "100ms"\n')
    async with await _client(eng) as http:
        for to in ("someone@example.test", "someone@nowhere-at-all.org"):
            r = await http.post("/v1/messages", json={"from": "a@sender.test", "to": [to], "subject": "s", "text": "t"})
            assert r.status_code == 202
    w = DeliveryWorker(eng.settings, eng.pool, owner="w1", dsn=eng.dsn)
    t = asyncio.create_task(w.run())
    try:
        deadline = time.monotonic() + 30
        while await eng.pool.fetchval("SELECT count(*) FROM recipients WHERE state <> 'bounced'"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    finally:
        w.request_stop()
        await t
    cats = await eng.pool.fetch("SELECT address, data->>'category' AS c FROM events e JOIN recipients r ON r.id = e.recipient_id "
                                "WHERE e.type = 'bounced'")
    assert {r["address"]: r["c"] for r in cats} == {"someone@example.test": "bad_domain", "someone@nowhere-at-all.org": "bad_domain"}
    # The reserved name is not suppressed (the quick start's next example still goes out); a real-looking one is.
    sup = [r["address"] for r in await eng.pool.fetch("SELECT address FROM suppressions")]
    assert sup == ["someone@nowhere-at-all.org"]


async def test_templates_can_use_the_engines_own_unsubscribe_url(engine_factory, smtp_receiver) -> None:
    mx = smtp_receiver()
    eng = await engine_factory(
        f'[webhooks]\nenabled = false\n[routing.static]\n"example.net" = "{mx.address}:{mx.port}"\n'
        '[delivery]\nflush_interval = "20ms"\npoll_interval = "100ms"\n[tracking]\ntrack_opens = false\n'
        'track_clicks = false\n' + KEY_TOML
    )
    async with await _client(eng) as http:
        r = await http.post("/v1/templates", json={"name": "news", "parts": {
            "subject": "Hello", "text": "Read on. Unsubscribe: {{ unsubscribe_url }}"}})
        assert r.status_code == 201, r.text
        assert "unsubscribe_url" not in r.json()["required_variables"]
        r = await http.post("/v1/messages", json={"from": "a@sender.test", "to": ["x@example.net"], "template": "news"})
        assert r.status_code == 202, r.text
    # As `engine worker` builds it: the renderer reads uploaded templates through the database store.
    w = DeliveryWorker(eng.settings, eng.pool, owner="w1", dsn=eng.dsn, composer=Composer(eng.settings, renderer=eng.renderer))
    t = asyncio.create_task(w.run())
    try:
        deadline = time.monotonic() + 30
        while not mx.messages:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        w.request_stop()
        await t
    body = mx.messages[0].data.decode()
    assert "Unsubscribe: http://127.0.0.1:8025/u/" in body.replace("=\r\n", "")
