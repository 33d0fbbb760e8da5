"""Consent and identity end to end: real engine, real Postgres, real SMTP receivers, real HTTP.

A CRM bulk-loads consent (NDJSON, plain and gzip) and a bulk campaign then reaches exactly the
granted addresses at an aiosmtpd receiver; imports are idempotent, never half-apply a line and
name the field and line of each error; a revocation stops queued mail at once (the sweep in
its transaction) and, when consent lapses without any change being recorded, the worker's
claim stops it; unsubscribes and ARF complaints revoke; contact ids given over REST, the batch
API and SMTP headers reach every event (API and webhooks) and never the wire or a URL; erasure
leaves the address in no column of any table; exports page everything exactly once; the CLI
does the same from a shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import gzip
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import orjson
import pytest
from pydantic import ValidationError

from engine.compose.tracking import Keyring, TokenKind
from engine.config import load_settings
from engine.consent.imports import BATCH
from engine.consent.models import ConsentIn, ConsentRecord, fast_record
from engine.deliver.scheduler import DeliveryWorker
from engine.errors import ConfigError, ValidationFailed
from engine.events.public import INTERNAL_TYPES, PUBLIC_TYPES
from engine.feedback.verp import Verp
from tests.configs import BOUNCE_DOMAIN, MARKETING_GRANT, tracked_feedback
from tests.receivers import Receiver, smtp_receiver, tls_ca  # noqa: F401  (fixtures)
from tests.test_consent_smoke import _all_text
from tests.test_event_schemas import errors as schema_errors
from tests.test_inbound import arf
from tests.webhook_receiver import webhook_receiver  # noqa: F401  (fixture)

TRACKING_SECRET = "consent-tracking-secret-" + "t" * 32
VERP_SECRET = "consent-verp-secret-" + "v" * 32
VERP = Verp(BOUNCE_DOMAIN, {1: VERP_SECRET})
RING = Keyring({1: TRACKING_SECRET})
CAPTURED = "2026-01-05T10:00:00Z"
GRANT = MARKETING_GRANT
HTML = '<p>Spring sale: <a href="https://shop.example.com/spring?x=1">shop</a></p>'
IMPORT_N = int(os.environ.get("ENGINE_TEST_CONSENT_IMPORT_N", "5000"))
"""Contacts the CRM bulk-loads in the campaign test (the 100,000 figure is the benchmark's)."""


def config(mx: Receiver, extra: str = "", *, smtp: bool = False) -> str:
    """One engine: example.net/.org routed to ``mx``, tracking and one-click unsubscribe, the inbound listener."""
    text = f"""
[routing.static]
"example.net" = "{mx.address}:{mx.port}"
"example.org" = "{mx.address}:{mx.port}"

[delivery]
flush_interval = "20ms"
poll_interval = "100ms"
retry_schedule = ["0.5s"]
retry_jitter = 0

"""
    text += tracked_feedback(TRACKING_SECRET, VERP_SECRET, track_opens=False)
    if smtp:
        text += '\n[[smtp.listeners]]\nname = "sub"\nlisten = "127.0.0.1:0"\ntrusted_networks = ["127.0.0.0/8"]\n'
    return text + "\n" + extra


def ndjson(records: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


async def until(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


class Crm:
    """The engine under test and a client holding an API key (the CRM/CDP side)."""

    def __init__(self, eng: Any, http: httpx.AsyncClient) -> None:
        self.eng, self.http = eng, http

    @property
    def pool(self) -> Any:
        return self.eng.pool

    async def consent(self, *records: dict[str, Any]) -> dict[str, Any]:
        r = await self.http.post("/v1/consent", json=list(records))
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    async def grant(self, *addresses: str, **fields: Any) -> None:
        await self.consent(*({**GRANT, "address": a, **fields} for a in addresses))

    async def import_(self, body: bytes, *, gz: bool = False, header: bool = True, path: str = "/v1/consent/import") -> dict[str, Any]:
        headers = {"Content-Type": "application/x-ndjson"}
        if gz:
            body = gzip.compress(body)
            if header:
                headers["Content-Encoding"] = "gzip"
        r = await self.http.post(path, content=body, headers=headers)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    async def send(self, to: list[Any], stream: str = "bulk", **fields: Any) -> dict[str, Any]:
        body = {"from": "news@sender.test", "to": to, "subject": "Spring", "html": HTML, "stream": stream, **fields}
        r = await self.http.post("/v1/messages", json=body)
        assert r.status_code == 202, r.text
        out: dict[str, Any] = r.json()
        return out

    async def contact(self, address: str) -> dict[str, Any]:
        r = await self.http.get(f"/v1/contacts/{address}")
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    async def events(self, type: str | None = None, recipient: str | None = None) -> list[dict[str, Any]]:
        """Every public event of ``type`` (and ``recipient`` address) through GET /v1/events, following ``next``.

        The stream shows an event once every transaction that could commit before it has ended (in
        the whole test cluster), so this polls until all the matching rows in the table are readable.
        """
        types = [INTERNAL_TYPES[type]] if type else list(PUBLIC_TYPES)
        want = await self.pool.fetchval(
            "SELECT count(*) FROM events e LEFT JOIN recipients r ON r.id = e.recipient_id "
            "WHERE e.type = ANY($1::text[]) AND ($2::text IS NULL OR lower(r.address) = $2)", types, recipient)
        params = {k: v for k, v in (("type", type), ("recipient", recipient)) if v}

        async def read() -> list[dict[str, Any]] | None:
            out: list[dict[str, Any]] = []
            after = None
            while True:
                r = await self.http.get("/v1/events", params={**params, "limit": 1000, **({"after": after} if after else {})})
                assert r.status_code == 200, r.text
                page = r.json()
                out += page["events"]
                if not page["events"]:
                    return out if len(out) >= want else None
                after = page["next"]

        got: list[dict[str, Any]] = await until(read, f"{want} events of {type or 'every type'} to be readable")
        return got

    async def states(self) -> dict[str, str]:
        return {r["address"]: r["state"] for r in await self.pool.fetch("SELECT address, state FROM recipients")}

    async def rows(self, address: str) -> list[Any]:
        return await self.pool.fetch("SELECT * FROM recipients WHERE address = $1 ORDER BY id", address)

    @contextlib.asynccontextmanager
    async def worker(self) -> AsyncIterator[DeliveryWorker]:
        w = DeliveryWorker(self.eng.settings, self.eng.pool, owner=f"w{time.monotonic_ns()}", dsn=self.eng.dsn)
        task = asyncio.create_task(w.run())
        try:
            yield w
        finally:
            w.request_stop()
            await asyncio.wait_for(task, 60)

    async def deliver(self, want: dict[str, str], timeout: float = 90.0) -> None:
        """Run a delivery worker until every address in ``want`` has its state."""
        async with self.worker():
            async def reached() -> bool:
                st = await self.states()
                return all(st.get(a) == s for a, s in want.items())

            await until(reached, f"states {want}", timeout)


@pytest.fixture
async def crm_factory(engine_factory) -> Callable[..., Any]:
    """``await crm_factory(toml, scopes=[...])``: an engine and a client with a key of those scopes."""
    clients: list[httpx.AsyncClient] = []

    async def make(toml: str, scopes: tuple[str, ...] = ("send", "read", "consent", "admin")) -> Crm:
        eng = await engine_factory(toml)
        key, _ = await eng.apikeys.create(f"crm{len(clients)}", list(scopes))
        host, port = eng.http_address
        http = httpx.AsyncClient(base_url=f"http://{host}:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=120)
        clients.append(http)
        return Crm(eng, http)

    yield make
    for c in clients:
        await c.aclose()


async def key_client(crm: Crm, name: str, scopes: list[str]) -> httpx.AsyncClient:
    key, _ = await crm.eng.apikeys.create(name, scopes)
    return httpx.AsyncClient(base_url=crm.http.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


# ------------------------------------------------------------------ bulk load, then a campaign


def campaign_status(i: int) -> str | None:
    """The CRM's consent for contact i: None = the CRM never sent a record for it."""
    if i % 10 == 2:
        return None
    return {0: "revoked", 1: "unknown"}.get(i % 4, "granted")


@pytest.mark.timeout(600)
async def test_crm_bulk_load_then_bulk_campaign_reaches_only_granted(crm_factory, smtp_receiver) -> None:
    mx = smtp_receiver()
    crm = await crm_factory(config(mx))
    records = [
        {**GRANT, "address": f"C{i:06d}@Example.net", "status": status, "contact_id": f"crm-{i}"}
        for i in range(IMPORT_N) if (status := campaign_status(i)) is not None
    ]
    body = ndjson(records)
    cut = body.index(b"\n", len(body) // 2) + 1
    plain = await crm.import_(body[:cut])
    zipped = await crm.import_(body[cut:], gz=True)
    assert plain["lines"] + zipped["lines"] == len(records)
    assert plain["new"] + zipped["new"] == len(records)
    assert plain["invalid"] == zipped["invalid"] == 0 and plain["errors"] == zipped["errors"] == []
    assert await crm.pool.fetchval("SELECT count(*) FROM consent") == len(records)
    one = await crm.contact("c000003@example.net")
    assert one["consent"]["marketing"]["status"] == "granted" and one["consent"]["marketing"]["source"] == "crm:hubspot"
    assert one["consent"]["marketing"]["contact_id"] == "crm-3"

    # The campaign: 200 one-recipient messages through the batch API, each with the CDP's ids.
    n = 200
    msgs = [{"from": "news@sender.test", "subject": "Spring", "html": HTML, "stream": "bulk",
             "to": [{"email": f"c{i:06d}@example.net", "contact_id": f"crm-{i}", "external": {"segment": "spring"}}]}
            for i in range(n)]
    r = await crm.http.post("/v1/messages/batch", json={"messages": msgs})
    assert r.status_code == 202, r.text
    accepted = {rc["email"]: rc["state"] for m in r.json()["messages"] for rc in m["recipients"]}
    granted = {f"c{i:06d}@example.net" for i in range(n) if campaign_status(i) == "granted"}
    others = {f"c{i:06d}@example.net" for i in range(n)} - granted
    assert {a for a, s in accepted.items() if s == "queued"} == granted
    assert {a for a, s in accepted.items() if s == "suppressed"} == others
    assert len(granted) > 50 and len(others) > 50  # revoked, unknown and never-recorded all present

    await crm.deliver({a: "delivered" for a in granted})
    received = [rcpt for m in mx.messages for rcpt in m.rcpt_tos]
    assert sorted(received) == sorted(granted)
    reasons = {r["address"]: (r["state"], r["reason"]) for r in await crm.pool.fetch("SELECT address, state, reason FROM recipients")}
    assert {a: reasons[a] for a in others} == {a: ("suppressed", "consent:marketing") for a in others}
    # Each stopped recipient has its event, with the reason and the contact id given at submit.
    stopped = await crm.events(type="email.suppressed")
    assert {e["data"]["address"]: (e["data"]["reason"], e["data"]["at"], e["data"]["contact_id"]) for e in stopped} == {
        a: ("consent:marketing", "submit", f"crm-{int(a[1:7])}") for a in others}
    delivered = await crm.events(type="email.delivered")
    assert {e["data"]["address"]: (e["data"]["contact_id"], e["data"]["external"]) for e in delivered} == {
        a: (f"crm-{int(a[1:7])}", {"segment": "spring"}) for a in granted}


# ------------------------------------------------------------------ import semantics and bad input


async def test_import_is_idempotent_ordered_by_captured_at_and_never_half_applies(crm_factory, smtp_receiver) -> None:
    crm = await crm_factory(config(smtp_receiver()))
    t1, t0, t2 = "2026-02-01T10:00:00Z", "2026-01-01T10:00:00Z", "2026-03-01T10:00:00+02:00"
    base = [
        {**GRANT, "address": "a1@example.net", "captured_at": t1},
        {**GRANT, "address": "a2@example.net", "status": "revoked", "captured_at": t1, "legal_basis": None},
        {**GRANT, "address": "a3@example.net", "purpose": "sales", "status": "unknown", "captured_at": t1,
         "evidence": {"ip": "192.0.2.7", "user_agent": "Mozilla/5.0"}, "double_opt_in_at": t1},
    ]
    body = ndjson(base)

    async def history() -> int:
        return int(await crm.pool.fetchval("SELECT count(*) FROM consent_history"))

    async def changed_events() -> int:
        return int(await crm.pool.fetchval("SELECT count(*) FROM events WHERE type = 'consent_changed'"))

    first = await crm.import_(body)
    assert (first["lines"], first["new"], first["changed"], first["unchanged"], first["stale"]) == (3, 3, 0, 0, 0)
    assert (await history(), await changed_events()) == (3, 3)
    # The same file again, plain, gzip with the header, and a .gz posted as is: nothing changes.
    for kw in ({}, {"gz": True}, {"gz": True, "header": False}):
        again = await crm.import_(body, **kw)
        assert (again["lines"], again["new"], again["changed"], again["unchanged"]) == (3, 0, 0, 3), kw
    assert (await history(), await changed_events()) == (3, 3)
    a3 = (await crm.contact("a3@example.net"))["consent"]["sales"]
    assert a3["evidence"] == {"ip": "192.0.2.7", "user_agent": "Mozilla/5.0"} and a3["status"] == "unknown"

    # Older than the stored change by captured_at: ignored. Later: applied, with old -> new in the history.
    older = await crm.import_(ndjson([{**GRANT, "address": "a1@example.net", "status": "revoked", "captured_at": t0}]))
    assert (older["stale"], older["changed"]) == (1, 0)
    assert (await crm.contact("a1@example.net"))["consent"]["marketing"]["status"] == "granted"
    later = await crm.import_(ndjson([{**GRANT, "address": "A1@example.NET", "status": "revoked", "captured_at": t2}]))
    assert (later["changed"], later["stale"]) == (1, 0)
    a1 = await crm.contact("a1@example.net")
    assert a1["consent"]["marketing"]["status"] == "revoked"
    assert [(h["old_status"], h["status"]) for h in a1["history"]] == [("granted", "revoked"), (None, "granted")]
    assert (await history(), await changed_events()) == (4, 4)
    # Two lines for one address in one import: the later captured_at wins wherever it stands.
    dup = await crm.import_(ndjson([{**GRANT, "address": "a4@example.net", "captured_at": t2},
                                    {**GRANT, "address": "a4@example.net", "status": "revoked", "captured_at": t1}]))
    assert (dup["new"], dup["stale"]) == (1, 1)
    assert (await crm.contact("a4@example.net"))["consent"]["marketing"]["status"] == "granted"

    # Bad lines: each reported with its line number and the field; the good lines around them applied.
    future = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    lines = [
        orjson.dumps({**GRANT, "address": "ok1@example.net"}),                                      # 1
        b'{"address": "broken@example.net", "purpose": ',                                          # 2 not JSON
        orjson.dumps({**GRANT, "address": "not-an-address"}),                                      # 3
        orjson.dumps({**GRANT, "address": "fish@example.net", "purpose": "fishing"}),              # 4
        orjson.dumps({**GRANT, "address": "future@example.net", "captured_at": future}),           # 5
        orjson.dumps({k: v for k, v in {**GRANT, "address": "nosource@example.net"}.items() if k != "source"}),      # 6
        orjson.dumps({k: v for k, v in {**GRANT, "address": "notime@example.net"}.items() if k != "captured_at"}),   # 7
        orjson.dumps({**GRANT, "address": "colour@example.net", "colour": "blue"}),                # 8
        orjson.dumps({**GRANT, "address": "long@example.net", "policy_version": "x" * 70_000}),    # 9 too long
        b"[1, 2]",                                                                                 # 10
        orjson.dumps({**GRANT, "address": "maybe@example.net", "status": "maybe"}),                # 11
        orjson.dumps({"address": "legacy@example.net", "purpose": "marketing", "status": "granted", "legacy": True}),  # 12
        b"",                                                                                       # 13 blank
        orjson.dumps({**GRANT, "address": "ok2@example.net", "source": "crm\r\nX-Injected: 1"}),   # 14
        orjson.dumps({**GRANT, "address": "tz@example.net", "captured_at": "2026-01-05T10:00:00"}),  # 15 no zone
        orjson.dumps({**GRANT, "address": "ok3@example.net", "contact_id": "crm-ok3"}),            # 16
    ]
    out = await crm.import_(b"\n".join(lines) + b"\n")
    got = [(e["line"], e["field"]) for e in out["errors"]]
    assert got == [(2, "line"), (3, "address"), (4, "purpose"), (5, "captured_at"), (6, "source"), (7, "captured_at"),
                   (8, "colour"), (9, "line"), (10, "line"), (11, "status"), (14, "source"), (15, "captured_at")], out["errors"]
    assert all(e["error"] for e in out["errors"])
    assert (out["lines"], out["invalid"], out["new"], out["errors_truncated"]) == (15, 12, 3, False)
    assert "future" in out["errors"][3]["error"] and "unknown field" in out["errors"][6]["error"]
    stored = {r["address"] for r in await crm.pool.fetch("SELECT address FROM consent")}
    assert {"ok1@example.net", "legacy@example.net", "ok3@example.net"} <= stored
    for bad in ("fish@example.net", "future@example.net", "nosource@example.net", "notime@example.net", "colour@example.net",
                "long@example.net", "maybe@example.net", "ok2@example.net", "tz@example.net", "broken@example.net"):
        assert bad not in stored, bad  # never half a line
    legacy = (await crm.contact("legacy@example.net"))["consent"]["marketing"]
    assert legacy["legacy"] is True and legacy["source"] == "legacy"
    assert datetime.fromisoformat(legacy["captured_at"]) == datetime(1970, 1, 1, tzinfo=UTC)

    # The REST endpoint names the field of the bad record in a list, and applies none of that request.
    r = await crm.http.post("/v1/consent", json=[{**GRANT, "address": "rest1@example.net"},
                                                 {**GRANT, "address": "rest2@example.net", "purpose": "fishing"}])
    assert r.status_code == 422 and r.json()["field"] == "[1].purpose", r.text
    r = await crm.http.post("/v1/consent", json={**GRANT, "address": "rest3@example.net", "captured_at": future})
    assert r.status_code == 422 and r.json()["field"] == "captured_at", r.text
    r = await crm.http.post("/v1/consent", content=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["field"] == "body", r.text
    assert not await crm.pool.fetchval("SELECT count(*) FROM consent WHERE address LIKE 'rest%'")
    # An import of nothing valid answers the same counters (zeros), not fewer keys.
    none = await crm.import_(b'{"address": \n\n[]\n')
    assert {k: none[k] for k in ("lines", "invalid", "new", "changed", "unchanged", "stale", "pending_stopped")} == {
        "lines": 2, "invalid": 2, "new": 0, "changed": 0, "unchanged": 0, "stale": 0, "pending_stopped": 0}
    assert [(e["line"], e["field"]) for e in none["errors"]] == [(1, "line"), (3, "line")]
    # A body that claims gzip and is not is a 400, not a half import.
    r = await crm.http.post("/v1/consent/import", content=b"\x1f\x8bnot gzip at all", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and r.json()["field"] == "body", r.text


def _variants() -> list[dict[str, Any]]:
    base = {**GRANT, "address": "Ann@Example.NET", "contact_id": "crm-1"}
    drop = [{k: v for k, v in base.items() if k != key} for key in base]
    future = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    changes: list[dict[str, Any]] = [
        {"address": " ann@example.net "}, {"address": "a" * 321}, {"address": "not-an-address"}, {"address": 7},
        {"address": "ann@exa_mple.net"}, {"address": "ann@example.net."}, {"legal_basis": None}, {"legal_basis": "whim"},
        {"captured_at": "2026-01-05T10:00:00.123456+02:00"}, {"captured_at": "2026-01-05T10:00:00"},
        {"captured_at": "2026-01-05"}, {"captured_at": future}, {"captured_at": 1767607200}, {"captured_at": "2026-02-30T10:00:00Z"},
        {"captured_at": "2026-01-05 10:00:00Z"}, {"captured_at": "2026-01-05T10:00:00.1234567Z"}, {"status": "maybe"},
        {"status": ["granted"]}, {"purpose": "fishing"}, {"purpose": "sales"}, {"colour": "blue"},
        {"evidence": {"ip": "192.0.2.1"}}, {"legacy": True}, {"legacy": "true"}, {"legacy": 1}, {"contact_id": ""},
        {"contact_id": "a\nb"}, {"contact_id": "x" * 201}, {"source": "x" * 201}, {"source": ""}, {"source": "a\tb"},
        {"policy_version": "p" * 101}, {"policy_version": ""}, {"policy_version": 3},
        {"effective_from": "2026-02-01T00:00:00Z", "effective_until": "2026-01-01T00:00:00Z"},
        {"effective_from": "2026-01-01T00:00:00Z", "effective_until": "2026-02-01T00:00:00+05:30"},
        {"double_opt_in_at": "2026-01-04T09:00:00Z"}, {"double_opt_in_at": "yesterday"},
    ]
    return [base, *drop, *({**base, **c} for c in changes)]


def test_fast_path_agrees_with_the_model() -> None:
    """The import's fast path accepts only what the model accepts, and builds the same record from it."""
    purposes = ("marketing", "sales", "transactional")
    taken = 0
    for doc in _variants():
        fast = fast_record(doc, purposes)
        try:
            model: ConsentRecord | None = ConsentIn.model_validate(doc).record()
        except (ValidationError, ValidationFailed):
            model = None
        if fast is not None:
            taken += 1
            assert model == fast, doc
            assert fast.captured_at.utcoffset() is not None
    assert fast_record(_variants()[0], purposes) is not None and taken >= 12  # the plain shape takes it


async def test_imports_stream_past_the_request_body_limit(crm_factory, smtp_receiver) -> None:
    """[http] max_body_size guards bodies held in memory; an import streams line by line, so millions fit."""
    crm = await crm_factory('[http]\nlisten = "127.0.0.1:0"\nmax_body_size = "64k"\n' + config(smtp_receiver()))
    recs = [{**GRANT, "address": f"big{i:05d}@example.net"} for i in range(2000)]
    body = ndjson(recs)
    assert len(body) > 4 * 64 * 1024
    out = await crm.import_(body)
    assert (out["lines"], out["new"], out["invalid"]) == (2000, 2000, 0)
    sup = ndjson([{"address": f"big{i:05d}@example.net", "scope": "*"} for i in range(3000)])
    assert len(sup) > 64 * 1024
    assert (await crm.import_(sup, path="/v1/suppressions/import"))["new"] == 3000
    # Everything else still has the limit.
    r = await crm.http.post("/v1/messages", json={"from": "a@sender.test", "to": ["x@example.net"], "subject": "s",
                                                  "text": "x" * 70_000, "stream": "transactional"})
    assert r.status_code == 413, r.text
    r = await crm.http.post("/v1/consent", json=[{**GRANT, "address": f"p{i}@example.net", "source": "s" * 150} for i in range(400)])
    assert r.status_code == 413, r.text


@pytest.mark.parametrize(("legacy", "sent"), [("grandfathered", True), ("require_reconfirm", False)])
async def test_legacy_opt_ins_follow_the_configured_policy(crm_factory, smtp_receiver, legacy: str, sent: bool) -> None:
    mx = smtp_receiver()
    crm = await crm_factory(config(mx, f'[consent]\nlegacy = "{legacy}"\n'))
    out = await crm.import_(ndjson([
        {"address": "old@example.net", "purpose": "marketing", "status": "granted", "legacy": True},
        {"address": "renewed@example.net", "purpose": "marketing", "status": "granted", "legacy": True},
    ]))
    assert out["new"] == 2
    # A real record (with its metadata) supersedes a legacy one, whatever the policy.
    await crm.grant("renewed@example.net")
    res = await crm.send(["old@example.net", "renewed@example.net"])
    states = {x["email"]: x["state"] for x in res["recipients"]}
    assert states == {"old@example.net": "queued" if sent else "suppressed", "renewed@example.net": "queued"}
    await crm.deliver({"renewed@example.net": "delivered", **({"old@example.net": "delivered"} if sent else {})})
    assert sorted(r for m in mx.messages for r in m.rcpt_tos) == sorted(["renewed@example.net"] + (["old@example.net"] if sent else []))
    if not sent:
        [row] = await crm.rows("old@example.net")
        assert row["reason"] == "consent:marketing"


# ------------------------------------------------------------------ a revocation while mail is queued


async def test_revocation_pushed_while_queued_stops_that_mail_at_once(crm_factory, smtp_receiver) -> None:
    mx = smtp_receiver()
    crm = await crm_factory(config(mx))
    await crm.grant("ann@example.net", "bob@example.net")
    res = await crm.send([{"email": "ann@example.net"}, {"email": "bob@example.net", "contact_id": "crm-bob"}])
    assert {x["state"] for x in res["recipients"]} == {"queued"}
    later = await crm.send(["bob@example.net"], stream="bulk", send_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat())
    # The CRM pushes Bob's opt-out; no worker has run yet.
    out = await crm.import_(ndjson([{**GRANT, "address": "bob@example.net", "status": "revoked",
                                     "captured_at": "2026-02-01T00:00:00Z", "source": "crm:preference-center"}]))
    assert (out["changed"], out["pending_stopped"]) == (1, 2)
    assert [(r["state"], r["reason"]) for r in await crm.rows("bob@example.net")] == [("suppressed", "consent:marketing")] * 2
    stops = [e["data"] for e in await crm.events(type="email.suppressed", recipient="bob@example.net")]
    assert sorted((d["pending"], d["reason"], d["message_id"]) for d in stops) == sorted(
        (True, "consent:marketing", m) for m in (res["id"], later["id"]))
    assert {d["contact_id"] for d in stops if d["message_id"] == res["id"]} == {"crm-bob"}
    await crm.deliver({"ann@example.net": "delivered"})
    assert [list(m.rcpt_tos) for m in mx.messages] == [["ann@example.net"]]


async def test_claim_stops_mail_whose_consent_lapsed_after_accept(crm_factory, smtp_receiver) -> None:
    """No change is recorded between accept and send (so no sweep runs): only the claim can stop the mail."""
    mx = smtp_receiver()
    crm = await crm_factory(config(mx))
    until_ = datetime.now(UTC) + timedelta(seconds=3)
    await crm.grant("ann@example.net")
    await crm.grant("cy@example.net", effective_until=until_.isoformat())
    # Outreach: sales consent must not be revoked; Dee's revocation takes effect in 3 seconds.
    await crm.consent({**GRANT, "address": "dee@example.net", "purpose": "sales", "status": "revoked",
                       "effective_from": until_.isoformat()})
    bulk = await crm.send(["ann@example.net", {"email": "cy@example.net", "contact_id": "crm-cy"}])
    outreach = await crm.send(["dee@example.net", "eve@example.net", "fay@example.net"], stream="outreach")
    assert {x["state"] for x in bulk["recipients"] + outreach["recipients"]} == {"queued"}
    # Fay's revocation arrives while her mail waits, but only takes effect in 3 seconds: nothing stops it yet.
    out = await crm.consent({**GRANT, "address": "fay@example.net", "purpose": "sales", "status": "revoked",
                             "effective_from": until_.isoformat()})
    assert out["pending_stopped"] == 0
    assert await crm.pool.fetchval("SELECT count(*) FROM recipients WHERE state = 'suppressed'") == 0
    await until(lambda: crm.pool.fetchval("SELECT now() > $1::timestamptz", until_), "the consent changes to take effect")

    await crm.deliver({"ann@example.net": "delivered", "eve@example.net": "delivered",
                       "cy@example.net": "suppressed", "dee@example.net": "suppressed", "fay@example.net": "suppressed"})
    assert sorted(r for m in mx.messages for r in m.rcpt_tos) == ["ann@example.net", "eve@example.net"]
    rows = {r["address"]: r for r in await crm.pool.fetch("SELECT * FROM recipients WHERE state = 'suppressed'")}
    assert {a: (r["reason"], r["attempts"], r["lease_owner"]) for a, r in rows.items()} == {
        "cy@example.net": ("consent:marketing", 0, None), "dee@example.net": ("consent:sales", 0, None),
        "fay@example.net": ("consent:sales", 0, None)}
    events = await crm.events(type="email.suppressed")
    assert {e["data"]["address"]: (e["data"]["at"], e["data"]["reason"]) for e in events} == {
        "cy@example.net": ("claim", "consent:marketing"), "dee@example.net": ("claim", "consent:sales"),
        "fay@example.net": ("claim", "consent:sales")}
    assert [e["data"]["contact_id"] for e in events if e["data"]["address"] == "cy@example.net"] == ["crm-cy"]
    assert [schema_errors(e) for e in events] == [[], [], []]


# ------------------------------------------------------------------ stream rules and config


async def test_shipped_rules_outreach_not_revoked_and_transactional_unchecked(crm_factory, smtp_receiver) -> None:
    mx = smtp_receiver()
    crm = await crm_factory(config(mx))
    sales = {**GRANT, "purpose": "sales", "legal_basis": "legitimate_interest"}
    await crm.consent({**sales, "address": "r1@example.org", "status": "revoked"}, {**sales, "address": "r2@example.org"},
                      {**sales, "address": "r3@example.org", "status": "unknown"},
                      {**GRANT, "address": "r4@example.org", "status": "revoked"},  # marketing, not sales
                      {**GRANT, "address": "t1@example.org", "status": "revoked"},
                      {**GRANT, "address": "t1@example.org", "purpose": "transactional", "status": "revoked"},
                      {**GRANT, "address": "d1@example.org", "status": "revoked"})
    out = await crm.send(["r1@example.org", "r2@example.org", "r3@example.org", "r4@example.org", "r5@example.org"],
                         stream="outreach")
    assert {x["email"]: x["state"] for x in out["recipients"]} == {
        "r1@example.org": "suppressed", "r2@example.org": "queued", "r3@example.org": "queued", "r4@example.org": "queued",
        "r5@example.org": "queued"}
    tx = await crm.send(["t1@example.org"], stream="transactional")
    dflt = await crm.send(["d1@example.org"], stream="default")
    assert tx["recipients"][0]["state"] == dflt["recipients"][0]["state"] == "queued"
    want = ["r2@example.org", "r3@example.org", "r4@example.org", "r5@example.org", "t1@example.org", "d1@example.org"]
    await crm.deliver({a: "delivered" for a in want})
    assert sorted(r for m in mx.messages for r in m.rcpt_tos) == sorted(want)
    [r1] = await crm.rows("r1@example.org")
    assert r1["reason"] == "consent:sales"


async def test_config_relaxes_tightens_and_bars_role_accounts(crm_factory, smtp_receiver) -> None:
    mx = smtp_receiver()
    crm = await crm_factory(config(mx, """
[consent]
purposes = ["newsletter"]
role_account_purposes = ["marketing"]

[consent.streams.bulk]
purpose = "marketing"
rule = "none"

[consent.streams.default]
purpose = "newsletter"
rule = "granted"
"""))
    news = {**GRANT, "purpose": "newsletter"}
    await crm.consent({**news, "address": "n1@example.net"},
                      {**GRANT, "purpose": "sales", "address": "o1@example.net", "status": "revoked"})
    r = await crm.http.post("/v1/consent", json={**GRANT, "purpose": "fishing", "address": "x@example.net"})
    assert r.status_code == 422 and r.json()["field"] == "purpose" and "newsletter" in r.json()["error"], r.text
    bulk = await crm.send(["x1@example.net", "Info@example.net", "postmaster@example.net"])      # relaxed: no consent needed
    dflt = await crm.send(["n1@example.net", "n2@example.net", "info@example.org"], stream="default")  # tightened
    outreach = await crm.send(["o1@example.net"], stream="outreach")  # no longer listed: not checked
    states = {x["email"]: x["state"] for m in (bulk, dflt, outreach) for x in m["recipients"]}
    assert states == {"x1@example.net": "queued", "Info@example.net": "suppressed", "postmaster@example.net": "suppressed",
                      "n1@example.net": "queued", "n2@example.net": "suppressed", "info@example.org": "suppressed",
                      "o1@example.net": "queued"}
    reasons = {r["address"]: r["reason"] for r in await crm.pool.fetch("SELECT address, reason FROM recipients WHERE state = 'suppressed'")}
    # Role accounts are barred from marketing (bulk) only; on the newsletter stream info@ lacks newsletter consent.
    assert reasons == {"Info@example.net": "role_account:marketing", "postmaster@example.net": "role_account:marketing",
                       "n2@example.net": "consent:newsletter", "info@example.org": "consent:newsletter"}
    events = {e["data"]["address"]: e["data"]["reason"] for e in await crm.events(type="email.suppressed")}
    assert events == reasons
    # Transactional mail to a role account is not barred (its purpose is not listed).
    tx = await crm.send(["abuse@example.net"], stream="transactional")
    assert tx["recipients"][0]["state"] == "queued"


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ('[consent.streams.bulk]\npurpose = "fishing"\nrule = "granted"\n', ["consent", "streams.bulk.purpose", "fishing"]),
        ('[consent.streams.newsletter]\npurpose = "marketing"\nrule = "granted"\n', ["consent.streams.newsletter", "queue.streams"]),
        ('[consent.streams.bulk]\npurpose = "marketing"\nrule = "sometimes"\n', ["consent", "rule", "sometimes"]),
        ('[consent]\nrole_account_purposes = ["fishing"]\n', ["role_account_purposes", "fishing"]),
        ('[consent]\npurposes = ["Bad Name"]\n', ["consent", "purposes", "Bad Name"]),
        ('[consent]\nlegacy = "forever"\n', ["consent", "legacy", "forever"]),
        ('[consent]\ncolour = "blue"\n', ["consent", "colour"]),
    ],
)
def test_consent_config_errors_name_the_key(tmp_path: Path, text: str, needles: list[str]) -> None:
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_settings(p, env={})
    msg = str(exc.value)
    assert all(n in msg for n in needles), msg


def test_shipped_rules_apply_to_the_streams_a_config_has(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[queue]\nstreams = { transactional = 0, bulk = 9 }\ndefault_stream = "bulk"\n[smtp]\ndefault_stream = "bulk"\n')
    s = load_settings(p, env={})
    assert {k: (v.purpose, v.rule) for k, v in s.consent.streams.items()} == {
        "bulk": ("marketing", "granted"), "transactional": ("transactional", "none")}
    d = load_settings(None, env={})
    assert {k: (v.purpose, v.rule) for k, v in d.consent.streams.items()} == {
        "bulk": ("marketing", "granted"), "outreach": ("sales", "not_revoked"), "transactional": ("transactional", "none")}


# ------------------------------------------------------------------ unsubscribe and complaints revoke


def _unsubscribe_path(raw: bytes) -> str:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    header = str(msg["List-Unsubscribe"])
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click", header
    [url] = re.findall(r"<(https://[^>]+)>", header)
    assert url.startswith("https://t.example.test/u/"), url
    return url.removeprefix("https://t.example.test")


async def test_unsubscribe_and_complaint_revoke_consent_and_tell_the_crm(crm_factory, smtp_receiver, webhook_receiver) -> None:
    mx = smtp_receiver()
    rx = await webhook_receiver()
    crm = await crm_factory(config(mx))
    r = await crm.http.post("/v1/webhooks", json={"url": rx.url, "events": ["consent.changed"]})
    assert r.status_code == 201, r.text
    rx.secrets.append(r.json()["secret"])
    await crm.grant("xan@example.net", "yul@example.net")
    await crm.send([{"email": "xan@example.net", "contact_id": "crm-xan"}, {"email": "yul@example.net", "contact_id": "crm-yul"}])
    queued = await crm.send(["xan@example.net"], send_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat())
    await crm.deliver({"xan@example.net": "delivered", "yul@example.net": "delivered"})
    by_rcpt = {m.rcpt_tos[0]: m for m in mx.messages}

    # One-click unsubscribe, exactly as the mailbox provider sends it from the delivered message's header.
    r = await crm.http.post(_unsubscribe_path(by_rcpt["xan@example.net"].data), data={"List-Unsubscribe": "One-Click"})
    assert r.status_code == 200, r.text
    xan = await crm.contact("xan@example.net")
    assert (xan["consent"]["marketing"]["status"], xan["consent"]["marketing"]["source"]) == ("revoked", "list-unsubscribe")
    assert [(h["status"], h["actor"]) for h in xan["history"]] == [("revoked", "list-unsubscribe"), ("granted", "api:crm0")]
    assert xan["suppressions"] == []  # the suppression list stays for bounces and manual blocks
    [row] = [r for r in await crm.rows("xan@example.net") if str(r["message_id"]) == queued["id"]]
    assert (row["state"], row["reason"]) == ("suppressed", "consent:marketing")  # its queued mail stopped too
    [unsub] = await crm.events(type="email.unsubscribed")
    assert unsub["data"]["revoked"] == "marketing" and unsub["data"]["contact_id"] == "crm-xan"

    # An ARF complaint about Yul's message, tied to her by the VERP return path of what was delivered.
    host, port = crm.eng.inbound_address
    report = arf("yul@example.net", original_headers=f"Return-Path: <{by_rcpt['yul@example.net'].mail_from}>\r\n")
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=30) as client:
        errs, reply = await client.sendmail("staff@fbl.provider.example", ["fbl@fbl.example.test"], report)
    assert not errs and "applied" in reply, reply
    yul = await crm.contact("yul@example.net")
    assert (yul["consent"]["marketing"]["status"], yul["consent"]["marketing"]["source"]) == ("revoked", "arf")
    assert yul["suppressions"] == []
    [complaint] = await crm.events(type="email.complained")
    assert complaint["data"]["revoked"] == "marketing" and "suppressed" not in complaint["data"]

    # Both revocations are consent.changed events, through the API and to the CRM's webhook.
    changes = [e for e in await crm.events(type="consent.changed") if e["data"]["status"] == "revoked"]
    assert [(e["data"]["address"], e["data"]["source"], e["data"]["old_status"], e["data"]["contact_id"]) for e in changes] == [
        ("xan@example.net", "list-unsubscribe", "granted", "crm-xan"), ("yul@example.net", "arf", "granted", None)]
    await rx.wait_for(lambda: {e["id"] for e in rx.accepted} >= {e["id"] for e in changes}, timeout=30)
    assert all(e["type"] == "consent.changed" for e in rx.accepted) and all(r.verified for r in rx.requests)
    assert [schema_errors(e) for e in changes] == [[], []]
    # A second click (mail clients may repeat the POST): still revoked, still one unsubscribed event.
    r = await crm.http.post(_unsubscribe_path(by_rcpt["xan@example.net"].data), data={"List-Unsubscribe": "One-Click"})
    assert r.status_code == 200
    assert (await crm.contact("xan@example.net"))["consent"]["marketing"]["status"] == "revoked"
    assert len(await crm.events(type="email.unsubscribed")) == 1


# ------------------------------------------------------------------ contact identity end to end


def _smtp_message(headers: str, to: str = "cat@example.net, dan@example.net") -> bytes:
    return (f"From: News <news@sender.test>\r\nTo: {to}\r\nSubject: Hi\r\nMessage-ID: <{time.time_ns()}@sender.test>\r\n"
            f"{headers}\r\nHello from SMTP\r\n").encode()


async def test_contact_ids_reach_every_event_and_never_the_wire_or_a_url(crm_factory, smtp_receiver, webhook_receiver) -> None:
    mx = smtp_receiver()
    rx = await webhook_receiver()
    crm = await crm_factory(config(mx, smtp=True))
    r = await crm.http.post("/v1/webhooks", json={"url": rx.url})
    assert r.status_code == 201, r.text
    rx.secrets.append(r.json()["secret"])
    ext = {"segment": "seg-42", "membership": {"id": "m-7", "reason": "opened 3 of last 5"}, "owner": "kim@crm"}
    # REST: per-entry ids (one entry without); the batch API likewise.
    one = await crm.send([{"email": "ann@example.net", "contact_id": "crm-ann-77", "external": ext}, "bob@example.net"],
                         stream="transactional")
    r = await crm.http.post("/v1/messages/batch", json={"messages": [
        {"from": "news@sender.test", "subject": "B", "text": "b", "to": [{"email": "eli@example.net", "contact_id": "crm-eli"}]},
        {"from": "news@sender.test", "subject": "B", "text": "b", "cc": [{"email": "fox@example.net", "external": {"k": 1}}],
         "to": ["gus@example.net"]},
    ]})
    assert r.status_code == 202, r.text
    # SMTP: the ids ride in headers (one folded) and apply to every recipient of the submission.
    host, port = crm.eng.smtp_addresses["sub"]
    raw = _smtp_message('X-Engine-Contact-Id: crm-smtp-9\r\nX-Engine-Meta: {"segment": "smtp-seg",\r\n  "owner": "lee"}\r\n')
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=30) as client:
        await client.sendmail("news@sender.test", ["cat@example.net", "dan@example.net"], raw)
        # Bad X-Engine-Meta: refused with 554 5.6.0, nothing queued.
        for bad in ('X-Engine-Meta: {"segment": \r\n', "X-Engine-Meta: [1, 2]\r\n",
                    'X-Engine-Meta: {"segment": "a\\r\\nBcc: evil@example.net"}\r\n',
                    "X-Engine-Contact-Id: a\r\nX-Engine-Contact-Id: b\r\n"):
            with pytest.raises(aiosmtplib.SMTPDataError) as exc:
                await client.sendmail("news@sender.test", ["hal@example.net"], _smtp_message(bad, "hal@example.net"))
            assert exc.value.code == 554 and "5.6.0" in exc.value.message, (bad, exc.value)
    assert not await crm.pool.fetchval("SELECT count(*) FROM recipients WHERE address = 'hal@example.net'")

    everyone = ["ann@example.net", "bob@example.net", "eli@example.net", "fox@example.net", "gus@example.net",
                "cat@example.net", "dan@example.net"]
    await crm.deliver({a: "delivered" for a in everyone})
    ids = {"ann@example.net": ("crm-ann-77", ext), "bob@example.net": (None, {}), "eli@example.net": ("crm-eli", {}),
           "fox@example.net": (None, {"k": 1}), "gus@example.net": (None, {}),
           "cat@example.net": ("crm-smtp-9", {"segment": "smtp-seg", "owner": "lee"}),
           "dan@example.net": ("crm-smtp-9", {"segment": "smtp-seg", "owner": "lee"})}

    # The wire: no X-Engine header and no contact id in any delivered message; tracked links carry a token only.
    for m in mx.messages:
        assert b"x-engine-" not in m.data.lower() and b"crm-" not in m.data and b"seg-42" not in m.data, m.data[:500]
    [ann_msg] = [m for m in mx.messages if m.rcpt_tos == ("ann@example.net",)]
    body = email.message_from_bytes(ann_msg.data, policy=email.policy.default)
    html = next(p for p in body.walk() if p.get_content_type() == "text/html").get_content()
    links = re.findall(r'href="([^"]+)"', html)
    assert links and all(link.startswith("https://t.example.test/t/c/") for link in links), links
    token = RING.verify(links[0].rsplit("/", 1)[1])
    assert (token.kind, token.recipient_id) == (TokenKind.CLICK, one["recipients"][0]["id"])
    # A click through the link: an event that carries the ids too.
    r = await crm.http.get(links[0].removeprefix("https://t.example.test"))
    assert r.status_code == 302 and r.headers["location"] == "https://shop.example.com/spring?x=1"

    # Every event of every recipient carries its ids: GET /v1/events and the webhook say the same.
    api = [e for e in await crm.events() if e["type"].startswith("email.")]
    assert {e["type"] for e in api} == {"email.accepted", "email.delivered", "email.clicked"}
    assert {e["data"]["address"] for e in api} == set(everyone)
    assert {e["id"]: (e["data"]["contact_id"], e["data"]["external"]) for e in api} == {
        e["id"]: ids[e["data"]["address"]] for e in api}
    await rx.wait_for(lambda: {e["id"] for e in rx.accepted} >= {e["id"] for e in api}, timeout=40)
    hooks = {e["id"]: e for e in rx.accepted}
    assert all(hooks[e["id"]]["data"]["contact_id"] == e["data"]["contact_id"] and
               hooks[e["id"]]["data"]["external"] == e["data"]["external"] for e in api)
    assert all(schema_errors(e) == [] for e in api)
    # And the recipient rows hold them (the store behind every event).
    rows = {r["address"]: (r["contact_id"], r["external"] or {}) for r in await crm.pool.fetch("SELECT * FROM recipients")}
    assert rows == ids


async def test_header_injection_in_metadata_or_external_is_a_4xx_naming_the_path(crm_factory, smtp_receiver) -> None:
    crm = await crm_factory(config(smtp_receiver()))
    base = {"from": "news@sender.test", "subject": "Hi", "text": "x", "stream": "transactional"}
    cases = [
        ({**base, "to": ["a@example.net"], "metadata": {"note": "a\r\nBcc: evil@example.net"}}, "metadata.note"),
        ({**base, "to": [{"email": "a@example.net", "external": {"seg": {"name": "x\ny"}}}]}, "to[0].external.seg.name"),
        ({**base, "to": [{"email": "a@example.net", "contact_id": "crm\r\n1"}]}, "to[0].contact_id"),
        ({**base, "to": [{"email": "a@example.net", "contact_id": ""}]}, "to[0].contact_id"),
    ]
    for body, field in cases:
        r = await crm.http.post("/v1/messages", json=body)
        assert r.status_code == 422, (field, r.text)
        assert r.json()["field"] == field, (field, r.text)
    r = await crm.http.post("/v1/messages/batch", json={"messages": [cases[1][0]]})
    assert r.status_code == 422 and r.json()["field"] == "messages[0].to[0].external.seg.name", r.text
    assert not await crm.pool.fetchval("SELECT count(*) FROM recipients")


# ------------------------------------------------------------------ erasure


async def test_erasure_leaves_no_copy_and_the_address_is_never_mailed_again(crm_factory, smtp_receiver, webhook_receiver) -> None:
    mx = smtp_receiver()
    rx = await webhook_receiver()
    crm = await crm_factory(config(mx))
    r = await crm.http.post("/v1/webhooks", json={"url": rx.url})
    assert r.status_code == 201, r.text
    rx.secrets.append(r.json()["secret"])
    ann = "ann@example.net"
    # Ann's footprint: consent with history, a suppression, mail delivered, mail still queued next to others',
    # a stored idempotent answer, an unverified complaint naming her, events and webhook deliveries of all that.
    await crm.grant(ann)
    await crm.consent({**GRANT, "address": ann, "status": "revoked", "captured_at": "2026-02-01T00:00:00Z"})
    await crm.grant(ann, captured_at="2026-03-01T00:00:00Z", contact_id="crm-ann")
    r = await crm.http.post("/v1/suppressions", json={"address": ann, "scope": "outreach", "reason": "asked by phone"})
    assert r.status_code == 201, r.text
    r = await crm.http.post("/v1/messages", headers={"Idempotency-Key": "order-1"}, json={
        "from": "shop@sender.test", "to": [{"email": "Ann@Example.net", "contact_id": "crm-ann"}], "subject": "Receipt",
        "text": f"Dear {ann}", "stream": "transactional", "metadata": {"customer": ann}})
    assert r.status_code == 202, r.text
    alone = r.json()
    await crm.deliver({"Ann@example.net": "delivered"})  # the domain is stored lower-cased
    host, port = crm.eng.inbound_address
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=30) as client:
        await client.sendmail("staff@fbl.provider.example", ["fbl@fbl.example.test"], arf(ann))
    # Still waiting when she is erased: a message to Bob with Ann in bcc, and one to Cy with Ann in to.
    shared = await crm.send(["bob@example.net"], bcc=[ann], stream="transactional")
    both = await crm.send([ann, "cy@example.net"], stream="transactional", text=f"Hi all (cc {ann})")
    await until(lambda: rx.accepted, "webhook deliveries")
    assert await _all_text(crm.pool, ann)  # the search finds her before

    # Only admin may erase: read and consent keys get 403.
    for scopes in (["read"], ["consent", "send"]):
        other = await key_client(crm, f"k-{scopes[0]}", scopes)
        async with other:
            r = await other.delete(f"/v1/contacts/{ann}")
        assert r.status_code == 403, r.text
    r = await crm.http.delete("/v1/contacts/ANN@example.NET")
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["erased"] is True and re.fullmatch(r"[0-9a-f]{64}", report["address_hash"])
    assert report["recipients"] == 3 and report["consent_rows"] >= 4 and report["suppressions"] == 1
    assert report["idempotency_keys"] == 1

    # Nowhere: no text, jsonb, bytea or array column of any table holds her address (any case).
    assert await _all_text(crm.pool, ann) == []
    # Bodies: Bob still needs his (kept), nobody needs Ann's own receipt (blanked).
    msgs = {str(r["id"]): r for r in await crm.pool.fetch("SELECT id, raw, content, metadata FROM messages")}
    assert msgs[shared["id"]]["content"].get("erased") is None and msgs[shared["id"]]["content"]["subject"] == "Spring"
    assert msgs[both["id"]]["content"].get("erased") is None  # Cy still waits for it
    assert msgs[alone["id"]]["content"] == {"erased": True} and msgs[alone["id"]]["metadata"] == {}
    # The audit event: only the hash.
    [erased] = await crm.events(type="contact.erased")
    assert erased["data"]["address_hash"] == report["address_hash"] and erased["data"]["address"] is None
    assert schema_errors(erased) == []
    contact = await crm.contact(ann)
    assert contact["erased"] is True and contact["consent"] == {} and contact["history"] == [] and contact["suppressions"] == []

    # Refused at accept in every stream from now on (reason erased), by REST and by a CRM consent grant alike.
    for stream in crm.eng.settings.queue.streams:
        out = await crm.send([ann.upper()], stream=stream)
        [row] = await crm.pool.fetch("SELECT state, reason FROM recipients WHERE message_id = $1", uuid.UUID(out["id"]))
        assert (out["recipients"][0]["state"], row["reason"]) == ("suppressed", "erased"), stream
    # The others still get their mail, and Ann gets none of it.
    mx.messages.clear()
    await crm.deliver({"bob@example.net": "delivered", "cy@example.net": "delivered"})
    assert sorted(r for m in mx.messages for r in m.rcpt_tos) == ["bob@example.net", "cy@example.net"]
    assert all(ann.encode() not in m.data.lower() for m in mx.messages)
    [cy_msg] = [m for m in mx.messages if m.rcpt_tos == ("cy@example.net",)]
    assert b"Hi all (cc erased@erased.invalid)" in cy_msg.data  # her mention in the kept body, replaced


# ------------------------------------------------------------------ exports


async def test_exports_page_everything_exactly_once(crm_factory, smtp_receiver) -> None:
    crm = await crm_factory(config(smtp_receiver()))
    n = 1234
    recs = [{**GRANT, "address": f"e{i:05d}@example.net", "purpose": ("marketing", "sales")[i % 2]} for i in range(n)]
    recs += [{**GRANT, "address": f"e{i:05d}@example.net", "purpose": "transactional"} for i in range(0, n, 5)]
    assert (await crm.import_(ndjson(recs)))["new"] == len(recs)
    want = {(r["address"], r["purpose"]) for r in recs}

    got: list[tuple[str, str]] = []
    after: str | None = None
    for _ in range(100):
        r = await crm.http.get("/v1/consent", params={"limit": 97, **({"after": after} if after else {})})
        assert r.status_code == 200, r.text
        page = r.json()
        got += [(x["address"], x["purpose"]) for x in page["records"]]
        after = page["next"]
        if after is None:
            break
    assert len(got) == len(set(got)) == len(want) and set(got) == want
    r = await crm.http.get("/v1/consent", params={"purpose": "sales", "limit": 10000})
    assert {x["address"] for x in r.json()["records"]} == {a for a, p in want if p == "sales"}
    r = await crm.http.get("/v1/consent", params={"format": "ndjson"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert len(lines) == len(want) and {(x["address"], x["purpose"]) for x in lines} == want
    assert lines[0]["source"] == "crm:hubspot" and lines[0]["status"] == "granted"
    for bad in ({"after": "!!"}, {"after": "WyJhIl0"}, {"purpose": "fishing"}, {"format": "xml"}, {"limit": 0}):
        r = await crm.http.get("/v1/consent", params=bad)
        assert r.status_code == 422, (bad, r.text)

    # Suppressions: a bulk import (admin), then the same pages and stream.
    sup = [{"address": f"s{i:05d}@example.net", "scope": ("*", "bulk")[i % 2], "reason": "bounced"} for i in range(777)]
    out = await crm.import_(ndjson(sup) + b'{"address": "bad", "scope": "*"}\n{"address": "x@example.net", "scope": "nope"}\n'
                            b'{"address": "y@example.net", "why": 1}\n', path="/v1/suppressions/import")
    assert out["new"] == 777 and [(e["line"], e["field"]) for e in out["errors"]] == [(778, "address"), (779, "scope"), (780, "why")]
    again = await crm.import_(ndjson(sup), gz=True, path="/v1/suppressions/import")
    assert again["new"] == 0 and again["invalid"] == 0
    swant = {(s["address"], s["scope"]) for s in sup}
    sgot: list[tuple[str, str]] = []
    after = None
    for _ in range(100):
        r = await crm.http.get("/v1/suppressions", params={"limit": 50, **({"after": after} if after else {})})
        assert r.status_code == 200, r.text
        page = r.json()
        sgot += [(x["address"], x["scope"]) for x in page["suppressions"]]
        after = page["next"]
        if after is None:
            break
    assert len(sgot) == len(set(sgot)) == len(swant) and set(sgot) == swant
    r = await crm.http.get("/v1/suppressions", params={"format": "ndjson"})
    assert r.status_code == 200 and {(x["address"], x["scope"]) for x in map(json.loads, r.text.splitlines())} == swant
    r = await crm.http.get("/v1/suppressions", params={"address": "S00001@example.net"})
    assert [(x["address"], x["scope"]) for x in r.json()["suppressions"]] == [("s00001@example.net", "bulk")]
    r = await crm.http.get("/v1/suppressions", params={"after": "garbage!"})
    assert r.status_code == 422 and r.json()["field"] == "after", r.text


async def test_scopes(crm_factory, smtp_receiver) -> None:
    crm = await crm_factory(config(smtp_receiver()))
    line = ndjson([{**GRANT, "address": "s@example.net"}])
    clients = {s: await key_client(crm, f"k-{s}", [s]) for s in ("send", "read", "consent")}
    try:
        expect = [
            ("POST", "/v1/consent", {"json": {**GRANT, "address": "s@example.net"}}, {"send": 403, "read": 403, "consent": 200}),
            ("POST", "/v1/consent/import", {"content": line}, {"send": 403, "read": 403, "consent": 200}),
            ("GET", "/v1/consent", {}, {"send": 403, "read": 200, "consent": 403}),
            ("GET", "/v1/contacts/s@example.net", {}, {"send": 403, "read": 200, "consent": 403}),
            ("POST", "/v1/suppressions/import", {"content": line}, {"send": 403, "read": 403, "consent": 403}),
            ("DELETE", "/v1/contacts/s@example.net", {}, {"send": 403, "read": 403, "consent": 403}),
        ]
        for method, path, kw, by_scope in expect:
            for scope, status in by_scope.items():
                r = await clients[scope].request(method, path, **kw)
                assert r.status_code == status, (method, path, scope, r.text)
        r = await httpx.AsyncClient(base_url=crm.http.base_url).post("/v1/consent", json={})
        assert r.status_code == 401
    finally:
        for c in clients.values():
            await c.aclose()


# ------------------------------------------------------------------ the CLI


def engine_cli(db_dsn: str, home: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "DATABASE_URL": db_dsn, "ENGINE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "engine", *args], input=stdin, capture_output=True, env=env, timeout=120)


@pytest.mark.timeout(900)  # eight engine processes, each a few seconds to start on a loaded machine
async def test_cli_import_export_show_erase(db_dsn, tmp_path: Path, pool) -> None:
    recs = [{**GRANT, "address": f"cli{i}@example.net"} for i in range(4500)]
    path = tmp_path / "consent.ndjson.gz"
    path.write_bytes(gzip.compress(ndjson(recs) + b'{"address": "bad", "purpose": "marketing"}\n'))
    out = engine_cli(db_dsn, tmp_path, "consent", "import", str(path))
    assert out.returncode == 1, out  # some lines were refused
    text = out.stdout.decode()
    assert "new=4500" in text and "invalid=1" in text, text
    assert "line 4501: address:" in out.stderr.decode(), out.stderr
    # Again from stdin, plain: idempotent.
    out = engine_cli(db_dsn, tmp_path, "consent", "import", "-", stdin=ndjson(recs[:10] + [{**recs[0], "status": "revoked",
                                                                                            "captured_at": "2026-02-01T00:00:00Z"}]))
    assert out.returncode == 0, out
    # recs[0] twice: the later captured_at wins, the earlier copy counts as stale.
    assert "unchanged=9 stale=1" in out.stdout.decode() and " changed=1 " in out.stdout.decode(), out.stdout
    assert await pool.fetchval("SELECT count(*) FROM consent_history") == 4501
    assert await pool.fetchval("SELECT actor FROM consent_history ORDER BY id DESC LIMIT 1") == "cli"

    out = engine_cli(db_dsn, tmp_path, "consent", "export", "--ndjson")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 4500 and len({r["address"] for r in rows}) == 4500
    assert {r["status"] for r in rows if r["address"] == "cli0@example.net"} == {"revoked"}
    out = engine_cli(db_dsn, tmp_path, "consent", "export")
    assert out.returncode == 0 and len(out.stdout.decode().splitlines()) == 4500

    out = engine_cli(db_dsn, tmp_path, "consent", "show", "CLI0@example.net")
    assert out.returncode == 0, out.stderr
    shown = out.stdout.decode()
    assert "marketing" in shown and "revoked" in shown and "granted" in shown and "crm:hubspot" in shown, shown
    assert engine_cli(db_dsn, tmp_path, "consent", "show", "not-an-address").returncode == 1

    out = engine_cli(db_dsn, tmp_path, "consent", "erase", "cli1@example.net")
    assert out.returncode == 0 and "erased" in out.stdout.decode(), out
    assert await _all_text(pool, "cli1@example.net") == []
    assert await pool.fetchval("SELECT count(*) FROM do_not_mail") == 1
    out = engine_cli(db_dsn, tmp_path, "consent", "import", str(tmp_path / "missing.ndjson"))
    assert out.returncode == 1 and b"missing.ndjson" in out.stderr


# ------------------------------------------------------------------ set-based import across batches


@pytest.mark.timeout(600)
async def test_import_across_a_batch_boundary_judges_every_line_once(crm_factory, smtp_receiver) -> None:
    """A file longer than one batch: duplicates inside a batch and across the boundary, a mix of
    new, changed, unchanged and stale lines, each change with one history row and one event whose
    payload says old -> new; the same file again writes nothing."""
    crm = await crm_factory(config(smtp_receiver()))
    n = BATCH + 50
    t0, t1, t2 = "2026-01-01T10:00:00Z", "2026-02-01T10:00:00.250000Z", "2026-03-01T10:00:00Z"
    lines = [{**GRANT, "address": f"b{i}@example.net", "captured_at": t1, "contact_id": f"c-{i}"} for i in range(n)]
    # The same address twice in the first batch (the earlier line is later by captured_at: it wins) ...
    lines[10] = {**GRANT, "address": "dup@example.net", "captured_at": t2}
    lines[20] = {**GRANT, "address": "dup@example.net", "status": "revoked", "captured_at": t1}
    # ... and on both sides of the boundary (the later batch's line is older: it is stale).
    lines[BATCH - 1] = {**GRANT, "address": "edge@example.net", "status": "revoked", "captured_at": t2}
    lines[BATCH] = {**GRANT, "address": "edge@example.net", "captured_at": t1}
    first = await crm.import_(ndjson(lines))
    assert (first["lines"], first["new"], first["changed"], first["unchanged"], first["stale"], first["invalid"]) == (
        n, n - 2, 0, 0, 2, 0), first

    async def counts() -> tuple[int, int]:
        h = await crm.pool.fetchval("SELECT count(*) FROM consent_history")
        e = await crm.pool.fetchval("SELECT count(*) FROM events WHERE type = 'consent_changed'")
        return int(h), int(e)

    assert await counts() == (n - 2, n - 2)
    assert (await crm.contact("dup@example.net"))["consent"]["marketing"]["status"] == "granted"
    assert (await crm.contact("edge@example.net"))["consent"]["marketing"]["status"] == "revoked"

    # The same file again: every line unchanged (or stale against itself), nothing written.
    again = await crm.import_(ndjson(lines), gz=True)
    assert (again["new"], again["changed"], again["unchanged"], again["stale"]) == (0, 0, n - 2, 2), again
    assert await counts() == (n - 2, n - 2)

    # A mix in one file: revocations on both sides of the boundary, stale and unchanged lines around them.
    mix = [dict(line) for line in lines]
    for i in (5, BATCH + 5):
        mix[i] = {**lines[i], "status": "revoked", "captured_at": t2}
    mix[6] = {**lines[6], "status": "revoked", "captured_at": t0}
    out = await crm.import_(ndjson(mix))
    assert (out["new"], out["changed"], out["unchanged"], out["stale"]) == (0, 2, n - 5, 3), out
    assert await counts() == (n, n)
    rows = await crm.pool.fetch(
        "SELECT data FROM events WHERE type = 'consent_changed' AND data->>'address' = ANY($1::text[]) ORDER BY id",
        [f"b{i}@example.net" for i in (5, 6, BATCH + 5)])
    datas = [r["data"] if isinstance(r["data"], dict) else orjson.loads(r["data"]) for r in rows]
    assert [(d["address"], d["old_status"], d["status"]) for d in datas] == [
        ("b5@example.net", None, "granted"), ("b6@example.net", None, "granted"),
        (f"b{BATCH + 5}@example.net", None, "granted"), ("b5@example.net", "granted", "revoked"),
        (f"b{BATCH + 5}@example.net", "granted", "revoked")], datas
    first_five = datas[0]
    assert first_five["v"] == 1 and first_five["contact_id"] == "c-5" and first_five["actor"].startswith("import:")
    assert datetime.fromisoformat(first_five["captured_at"]) == datetime.fromisoformat(t1.replace("Z", "+00:00"))
    assert datetime.fromisoformat(datas[3]["captured_at"]) == datetime.fromisoformat(t2.replace("Z", "+00:00"))
    history = (await crm.contact(f"b{BATCH + 5}@example.net"))["history"]
    assert [(h["old_status"], h["status"]) for h in history] == [("granted", "revoked"), (None, "granted")]
