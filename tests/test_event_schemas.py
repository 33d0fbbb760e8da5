"""Every public event type, emitted through the engine's real paths, matches its published JSON Schema.

One engine (real Postgres, real HTTP) delivers to real aiosmtpd receivers (one greylists and
rejects an unknown user, one answers 451 until the mail expires), serves the real tracking
endpoints (open pixel, click redirect, one-click and form unsubscribe), takes complaints and
bounce reports on its real inbound listener (verified by VERP and unverified), suppresses
through the REST API, records consent (bulk mail needs it, as shipped) and erases a contact
through the REST API, and stops a queued recipient whose consent lapsed when a worker claims it. Every event it wrote is read back twice, through ``GET /v1/events``
(paging with ``next``) and through a real webhook receiver that checks the Standard Webhooks
signature; each is validated with ``jsonschema`` (draft 2020-12, formats checked) against the
schema of its type. A batched endpoint's arrays are validated against the OpenAPI document's
``webhooks`` entry, its ``$ref`` s resolved within the served document.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiosmtplib
import httpx
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from engine.compose.tracking import Keyring, TokenKind
from engine.deliver.scheduler import DeliveryWorker
from engine.events import catalog
from engine.events.public import PUBLIC_TYPES
from engine.feedback.verp import Verp
from tests.configs import BOUNCE_DOMAIN, MARKETING_GRANT, tracked_feedback
from tests.receivers import Behaviour, smtp_receiver, tls_ca  # noqa: F401  (fixtures)
from tests.test_inbound import arf, dsn
from tests.webhook_receiver import webhook_receiver  # noqa: F401  (fixture)

SCHEMAS = Path(__file__).resolve().parent.parent / "engine" / "events" / "schemas"
TRACKING_SECRET = "schema-tracking-secret-" + "t" * 32
VERP_SECRET = "schema-verp-secret-" + "v" * 32
VERP = Verp(BOUNCE_DOMAIN, {1: VERP_SECRET})
RING = Keyring({3: TRACKING_SECRET})
HTML = '<p>Hello <a href="https://shop.example.com/spring?x=1&amp;y=2">shop</a></p>'
METADATA = {"customer": "c-42", "tags": ["spring", "vip"], "n": 7}
EXTERNAL = {"segment": "spring-vip", "membership": {"id": "m-9", "reason": "opened twice"}, "owner": "kim"}
GRANT = MARKETING_GRANT


def _config(mx: Any, plain: Any, slow: Any) -> str:
    return f"""
[queue]
max_age = "6s"

[delivery]
retry_schedule = ["0.5s"]
retry_jitter = 0
flush_interval = "20ms"
poll_interval = "100ms"

[routing.static]
"example.net" = "{mx.address}:{mx.port}"
"example.org" = "{plain.address}:{plain.port}"
"slow.test" = "{slow.address}:{slow.port}"

""" + tracked_feedback(TRACKING_SECRET, VERP_SECRET, tracking_key=3)


# ---- validation

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def format_checker() -> FormatChecker:
    """jsonschema's format checks, plus date-time and uri written here (their optional packages are not installed)."""
    checker = FormatChecker()

    @checker.checks("date-time", raises=ValueError)
    def _date_time(value: object) -> bool:
        if not isinstance(value, str):
            return True
        if not _RFC3339.match(value):
            return False
        datetime.fromisoformat(value.upper().replace("Z", "+00:00"))  # a real date and time, or ValueError
        return True

    @checker.checks("uri")
    def _uri(value: object) -> bool:
        if not isinstance(value, str):
            return True
        parts = urlsplit(value)
        return bool(parts.scheme) and bool(parts.netloc or parts.path) and not any(c.isspace() for c in value)

    return checker


FORMATS = format_checker()


def errors(event: dict[str, Any]) -> list[str]:
    """Why ``event`` does not match the schema of its own type ([] when it does)."""
    public_type = event.get("type")
    if public_type not in PUBLIC_TYPES.values():
        return [f"unknown type {public_type!r}"]
    validator = Draft202012Validator(catalog.schema(public_type), format_checker=FORMATS)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(event)]


def openapi_validator(spec: dict[str, Any], pointer: str) -> Draft202012Validator:
    """A validator for the schema at JSON pointer ``pointer`` of the served OpenAPI document, its refs resolved there."""
    base = "urn:engine:openapi"
    registry: Registry = Registry().with_resource(base, Resource.from_contents(spec, default_specification=DRAFT202012))
    return Draft202012Validator({"$ref": f"{base}#{pointer}"}, registry=registry, format_checker=FORMATS)


BATCH_POINTER = f"/webhooks/{catalog.BATCH}/post/requestBody/content/application~1json/schema"


# ---- driving the engine


class Run:
    """The engine under test and the client calls the scenario needs."""

    def __init__(self, eng: Any, http: httpx.AsyncClient) -> None:
        self.eng, self.http = eng, http

    async def submit(self, to: list[str], **fields: Any) -> dict[str, Any]:
        body = {"from": "app@sender.test", "to": to, "subject": "Hi", "html": HTML, "metadata": METADATA, **fields}
        r = await self.http.post("/v1/messages", json=body)
        assert r.status_code == 202, r.text
        out: dict[str, Any] = r.json()
        return out

    async def grant(self, *addresses: str, **fields: Any) -> None:
        r = await self.http.post("/v1/consent", json=[{**GRANT, "address": a, **fields} for a in addresses])
        assert r.status_code == 200, r.text
        assert {x["outcome"] for x in r.json()["results"]} == {"new"}

    async def suppress(self, address: str) -> None:
        r = await self.http.post("/v1/suppressions", json={"address": address, "reason": "manual"})
        assert r.status_code == 201, r.text

    async def report(self, raw: bytes, rcpts: list[str]) -> str:
        host, port = self.eng.inbound_address
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=30) as client:
            errs, reply = await client.sendmail("staff@fbl.provider.example", rcpts, raw)
        assert not errs, errs
        return str(reply)

    async def states(self) -> dict[str, str]:
        rows = await self.eng.pool.fetch("SELECT address, state FROM recipients")
        return {r["address"]: r["state"] for r in rows}

    async def wait_states(self, want: dict[str, str], timeout: float = 40.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            st = await self.states()
            if all(st.get(a) == s for a, s in want.items()):
                return
            assert time.monotonic() < deadline, f"states not reached: want {want}, have {st}"
            await asyncio.sleep(0.1)

    async def public_event_count(self) -> int:
        n: int = await self.eng.pool.fetchval("SELECT count(*) FROM events WHERE type = ANY($1::text[])", list(PUBLIC_TYPES))
        return n

    async def page_all(self, want: int, limit: int = 7, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Every event through GET /v1/events, following ``next`` until ``want`` have come (none twice)."""
        got: list[dict[str, Any]] = []
        after: str | None = None
        deadline = time.monotonic() + timeout
        while len(got) < want:
            params: dict[str, Any] = {"limit": limit}
            if after is not None:
                params["after"] = after
            r = await self.http.get("/v1/events", params=params)
            assert r.status_code == 200, r.text
            page = r.json()
            got += page["events"]
            after = page["next"]
            if not page["events"]:
                assert time.monotonic() < deadline, f"/v1/events: {len(got)} of {want} events"
                await asyncio.sleep(0.1)
        ids = [e["id"] for e in got]
        assert len(ids) == len(set(ids)) == want, (len(ids), len(set(ids)), want)
        return got


async def test_every_emitted_event_matches_its_schema(engine_factory, smtp_receiver, webhook_receiver) -> None:
    mx = smtp_receiver(Behaviour(greylist=True, reject_users={"gone@example.net"}))
    plain = smtp_receiver()
    slow = smtp_receiver(Behaviour(replies={"rcpt": "451 4.3.0 Mailbox temporarily unavailable, try again later"}))
    eng = await engine_factory(_config(mx, plain, slow))
    key, _ = await eng.apikeys.create("admin", ["send", "read", "admin"])
    host, port = eng.http_address
    single, batched = await webhook_receiver(), await webhook_receiver()
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", headers={"Authorization": f"Bearer {key}"},
                                 timeout=30) as http:
        run = Run(eng, http)
        # Endpoints first: an endpoint receives the events written after it was created.
        r = await http.post("/v1/webhooks", json={"url": single.url, "description": "every event, one per request"})
        assert r.status_code == 201, r.text
        single.secrets.append(r.json()["secret"])
        r = await http.post("/v1/webhooks", json={"url": batched.url, "batch": {"max_events": 4, "max_wait_ms": 200}})
        assert r.status_code == 201, r.text
        batched.secrets.append(r.json()["secret"])

        # consent.changed: the CRM grants marketing consent to the bulk recipients below (bulk needs it).
        await run.grant("bob@example.org", "cat@example.org", "dan@example.org")
        # accepted; deferred then delivered (greylisting); bounced (550 5.1.1); suppressed at submit.
        # Ann comes with her CRM id and external ids: every event of hers carries them.
        await run.suppress("blocked@example.net")
        ann = {"email": "ann@example.net", "contact_id": "crm-ann-1", "external": EXTERNAL}
        first = await run.submit([ann, "gone@example.net", "blocked@example.net"])
        assert {x["email"]: x["state"] for x in first["recipients"]}["blocked@example.net"] == "suppressed"
        # suppressed while waiting (pending): mail scheduled for later, then a suppression.
        later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        await run.submit(["late@example.net"], send_at=later)
        await run.suppress("late@example.net")
        # expired: 451 on every attempt until [queue] max_age runs out.
        await run.submit(["zed@slow.test"])
        # Recipients for the tracking endpoints and the inbound reports, in another stream, without metadata.
        second = await run.submit(["bob@example.org", "cat@example.org", "dan@example.org"], stream="bulk", metadata={})
        assert {x["state"] for x in second["recipients"]} == {"queued"}
        # suppressed at claim: consent granted until shortly before the mail's send_at; the worker's claim
        # finds it lapsed (no change was recorded in between, so nothing stopped the row earlier).
        until = datetime.now(UTC) + timedelta(seconds=8)
        await run.grant("fin@example.org", effective_until=until.isoformat())
        third = await run.submit(["fin@example.org"], stream="bulk", send_at=(until + timedelta(seconds=1)).isoformat())
        assert third["recipients"][0]["state"] == "queued"
        rid = {x["email"]: x["id"] for x in first["recipients"] + second["recipients"]}

        worker = DeliveryWorker(eng.settings, eng.pool, owner="w1", dsn=eng.dsn)
        task = asyncio.create_task(worker.run())
        try:
            await run.wait_states({"ann@example.net": "delivered", "gone@example.net": "bounced",
                                   "zed@slow.test": "expired", "bob@example.org": "delivered",
                                   "cat@example.org": "delivered", "dan@example.org": "delivered",
                                   "late@example.net": "suppressed", "fin@example.org": "suppressed"})
        finally:
            worker.request_stop()
            await asyncio.wait_for(task, 30)

        # opened, clicked, unsubscribed (one-click and the confirmation form) through the tracking endpoints.
        r = await http.get(f"/t/o/{RING.sign(TokenKind.OPEN, rid['ann@example.net'])}")
        assert r.status_code == 200 and r.content.startswith(b"GIF89a")
        r = await http.get(f"/t/c/{RING.sign(TokenKind.CLICK, rid['ann@example.net'], 0)}")
        assert r.status_code == 302 and r.headers["location"] == "https://shop.example.com/spring?x=1&y=2", r.text
        r = await http.post(f"/u/{RING.sign(TokenKind.UNSUBSCRIBE, rid['bob@example.org'])}",
                            data={"List-Unsubscribe": "One-Click"})
        assert r.status_code == 200, r.text
        r = await http.post(f"/u/{RING.sign(TokenKind.UNSUBSCRIBE, rid['cat@example.org'])}",
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200, r.text

        # complained: a verified ARF (VERP in the returned headers) and an unverified one (no token).
        headers = f"Return-Path: <{VERP.return_path(rid['dan@example.org'])}>\r\n"
        assert "applied" in await run.report(arf("dan@example.org", original_headers=headers), ["fbl@fbl.example.test"])
        assert "unverified" in await run.report(arf("eve@example.net"), ["fbl@fbl.example.test"])
        # bounced by report: a hard DSN to bob's VERP address, a delay notice for cat, an unverified DSN.
        await run.report(dsn("bob@example.org"), [VERP.return_path(rid["bob@example.org"])])
        await run.report(dsn("cat@example.org", action="delayed", status="4.2.2",
                             diagnostic="smtp; 452 4.2.2 <{r}>: Mailbox full"), [VERP.return_path(rid["cat@example.org"])])
        await run.report(dsn("fay@example.net"), ["postmaster@fbl.example.test"])
        # contact.erased: an address the engine only knew from a suppression (it has no events to erase,
        # so what both ways out carried stays the same).
        await run.suppress("gil@example.net")
        r = await http.delete("/v1/contacts/Gil@Example.net")
        assert r.status_code == 200, r.text
        erased_hash = r.json()["address_hash"]

        want = await run.public_event_count()
        from_api = await run.page_all(want)
        await single.wait_for(lambda: len({e["id"] for e in single.accepted}) >= want, timeout=40)
        await batched.wait_for(lambda: len({e["id"] for e in batched.accepted}) >= want, timeout=40)
        spec = (await http.get("/openapi.json")).json()

    # Every type was emitted, and every event matches the schema of its type, on both ways out.
    assert {e["type"] for e in from_api} == set(PUBLIC_TYPES.values())
    bad = {e["id"]: errs for e in from_api + single.accepted if (errs := errors(e))}
    assert bad == {}, json.dumps(bad, indent=1)
    assert all(r.verified for r in single.requests + batched.requests)
    by_id = {e["id"]: e for e in from_api}
    assert {e["id"]: e for e in single.accepted} == by_id  # the webhook carries exactly what the API shows
    assert all(r.headers["webhook-id"] == r.events[0]["id"] for r in single.requests)

    # The batched endpoint's bodies are arrays valid against the OpenAPI document's batch entry.
    batch_validator = openapi_validator(spec, BATCH_POINTER)
    bodies = [json.loads(r.body) for r in batched.requests]
    assert all(isinstance(b, list) for b in bodies) and max(len(b) for b in bodies) > 1
    bad_batches = [[e.message for e in batch_validator.iter_errors(b)] for b in bodies]
    assert not any(bad_batches), bad_batches
    assert {e["id"] for b in bodies for e in b} == set(by_id)

    # What the issue requires in data is there, with the values of what really happened.
    def of(kind: str, address: str | None) -> list[dict[str, Any]]:
        return [e["data"] for e in from_api if e["type"] == f"email.{kind}" and e["data"]["address"] == address]

    ann_deferred, = of("deferred", "ann@example.net")
    assert ann_deferred["attempt"] == 1 and ann_deferred["smtp_code"] == 451 and ann_deferred["enhanced_status"] == "4.7.1"
    assert "Greylisted" in ann_deferred["reply"] and ann_deferred["mx"] and ann_deferred["category"]
    assert ann_deferred["message_id"] == first["id"] and ann_deferred["recipient_id"] == rid["ann@example.net"]
    assert ann_deferred["stream"] == "default" and ann_deferred["metadata"] == METADATA
    ann_delivered, = of("delivered", "ann@example.net")
    assert ann_delivered["attempt"] == 2 and ann_delivered["smtp_code"] == 250 and ann_delivered["mx"]
    gone, = of("bounced", "gone@example.net")
    assert (gone["origin"], gone["smtp_code"], gone["enhanced_status"], gone["category"]) == ("smtp", 550, "5.1.1", "unknown_user")
    assert gone["hard"] is True and gone["permanent"] is True and gone["attempt"] == 1 and gone["mx"]
    zed, = of("expired", "zed@slow.test")
    assert zed["smtp_code"] == 451 and zed["attempt"] >= 1 and zed["mx"] and zed["category"]
    fin, = of("suppressed", "fin@example.org")
    fin_event = next(e for e in from_api if e["data"] is fin)
    assert fin["at"] == "claim" and fin["reason"] == "consent:marketing" and "source" not in fin
    blocked, = of("suppressed", "blocked@example.net")
    assert blocked["at"] == "submit" and blocked["source"] == "http" and "egress" not in blocked
    late, = of("suppressed", "late@example.net")
    assert late["pending"] is True and late["scope"] == "*"
    [accepted] = of("accepted", "bob@example.org")
    assert accepted["source"] == "http" and accepted["stream"] == "bulk" and accepted["metadata"] == {}
    unsubscribed = of("unsubscribed", "bob@example.org") + of("unsubscribed", "cat@example.org")
    assert [(d["method"], d["revoked"]) for d in unsubscribed] == [("one-click", "marketing"), ("post", "marketing")]
    [clicked] = of("clicked", "ann@example.net")
    assert clicked["url"] == "https://shop.example.com/spring?x=1&y=2" and clicked["link_index"] == 0
    assert of("opened", "ann@example.net")
    [dan] = of("complained", "dan@example.org")
    assert dan["verified"] is True and dan["feedback_type"] == "abuse" and dan["revoked"] == "marketing"
    [unverified] = of("complained", None)
    assert unverified["verified"] is False and unverified["recipient_id"] is None and unverified["message_id"] is None
    assert [d["permanent"] for d in of("bounced", "bob@example.org") + of("bounced", "cat@example.org")] == [True, False]
    [fay] = of("bounced", None)
    assert fay["verified"] is False and fay["origin"] == "dsn"

    # Contact identity: every event of Ann's carries her CRM id and external ids; others carry none.
    ann_events = [e for e in from_api if e["data"]["address"] == "ann@example.net"]
    assert {e["type"] for e in ann_events} >= {"email.accepted", "email.deferred", "email.delivered", "email.opened",
                                              "email.clicked"}
    assert all(e["data"]["contact_id"] == "crm-ann-1" and e["data"]["external"] == EXTERNAL for e in ann_events)
    assert all(e["data"]["contact_id"] is None and e["data"]["external"] == {}
               for e in from_api if e["type"].startswith("email.") and e["data"]["address"] not in (None, "ann@example.net"))

    # consent.changed: the CRM's grants, then the revocations by unsubscribe and by complaint, each once.
    def consent(address: str) -> list[tuple[Any, ...]]:
        return [(d["old_status"], d["status"], d["source"], d["actor"]) for e in from_api if e["type"] == "consent.changed"
                for d in [e["data"]] if d["address"] == address]

    assert consent("bob@example.org") == [(None, "granted", "crm:hubspot", "api:admin"),
                                          ("granted", "revoked", "list-unsubscribe", "list-unsubscribe")]
    assert consent("cat@example.org")[-1] == ("granted", "revoked", "list-unsubscribe", "list-unsubscribe")
    assert consent("dan@example.org")[-1] == ("granted", "revoked", "arf", "arf")
    granted = next(e["data"] for e in from_api if e["type"] == "consent.changed" and e["data"]["address"] == "bob@example.org")
    assert (granted["purpose"], granted["legal_basis"], granted["policy_version"], granted["legacy"]) == (
        "marketing", "consent", "2026-01", False)
    assert datetime.fromisoformat(granted["captured_at"]) == datetime(2026, 1, 5, 10, tzinfo=UTC)
    assert (granted["message_id"], granted["recipient_id"], granted["stream"]) == (None, None, None)
    # contact.erased: only the hash; the address is in no event either way out.
    [gil] = [e["data"] for e in from_api if e["type"] == "contact.erased"]
    assert gil["address_hash"] == erased_hash and gil["address"] is None and gil["actor"] == "api:admin"
    assert "gil@example.net" not in json.dumps(from_api + single.accepted).lower()

    # The schemas are not vacuous: a real event with a field removed, mistyped or mislabelled fails.
    delivered = next(e for e in from_api if e["type"] == "email.delivered")
    broken = [
        {**delivered, "data": {k: v for k, v in delivered["data"].items() if k != "recipient_id"}},
        {**delivered, "data": {**delivered["data"], "smtp_code": "250"}},
        {**delivered, "data": {**delivered["data"], "message_id": "not-a-uuid"}},
        {**delivered, "timestamp": "yesterday"},
        {**delivered, "id": "42"},
    ]
    assert all(errors(b) for b in broken)
    assert Draft202012Validator(catalog.schema("email.bounced"), format_checker=FORMATS).iter_errors(delivered)
    changed = next(e for e in from_api if e["type"] == "consent.changed")
    erased = next(e for e in from_api if e["type"] == "contact.erased")
    broken = [
        {**changed, "data": {**changed["data"], "status": "maybe"}},
        {**changed, "data": {k: v for k, v in changed["data"].items() if k != "purpose"}},
        {**erased, "data": {**erased["data"], "address": "gil@example.net"}},
        {**erased, "data": {**erased["data"], "address_hash": "not-hex"}},
        {**delivered, "data": {**delivered["data"], "contact_id": 42}},
        {**delivered, "data": {**delivered["data"], "external": "segment"}},
        {**fin_event, "data": {**fin_event["data"], "at": "submit"}},  # at: submit comes with source
    ]
    assert all(errors(b) for b in broken)


def test_schema_files_are_valid_draft_2020_12_and_match_the_catalog() -> None:
    files = sorted(p.name for p in SCHEMAS.glob("*.json"))
    assert files == sorted(catalog.file_name(t) for t in PUBLIC_TYPES.values())
    for public_type in PUBLIC_TYPES.values():
        on_disk = json.loads((SCHEMAS / catalog.file_name(public_type)).read_text(encoding="utf-8"))
        Draft202012Validator.check_schema(on_disk)
        assert on_disk["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert on_disk["$id"] == catalog.schema_id(public_type) == f"https://engine.dev/schemas/events/{public_type}.v1.json"
        assert on_disk["properties"]["type"]["const"] == public_type
        assert on_disk["title"] and on_disk["description"]
        data = on_disk["properties"]["data"]
        assert data["additionalProperties"] is True  # a new field is a minor change within a version
        assert {"message_id", "recipient_id", "address", "stream", "metadata"} <= set(data["required"])
        assert set(data["required"]) <= set(data["properties"])
        assert all(p.get("description") for p in data["properties"].values())
        assert catalog.schema(public_type) == on_disk  # what the package ships is the file
    assert set(catalog.all_schemas()) == set(PUBLIC_TYPES.values())
    # A copy each time: a caller changing one cannot change what the next caller reads.
    catalog.schema("email.opened")["title"] = "changed"
    assert catalog.schema("email.opened")["title"] != "changed"


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _pointer(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


async def test_openapi_documents_one_webhook_per_event_type(engine_factory) -> None:
    eng = await engine_factory("")
    host, port = eng.http_address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as http:
        r = await http.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    assert spec["openapi"].startswith("3.1")
    assert spec["paths"]["/v1/events"] and spec["paths"]["/v1/webhooks"]  # the rest of the document is still there
    hooks = spec["webhooks"]
    assert set(hooks) == set(PUBLIC_TYPES.values()) | {catalog.BATCH}
    components = spec["components"]["schemas"]
    for public_type in PUBLIC_TYPES.values():
        op = hooks[public_type]["post"]
        assert {p["name"] for p in op["parameters"] if p["in"] == "header" and p["required"]} == {
            "webhook-id", "webhook-timestamp", "webhook-signature"}
        assert "2XX" in op["responses"] and op["summary"] and op["description"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{catalog.component_name(public_type)}"
        component = components[catalog.component_name(public_type)]
        # The published schema, less the keys that would give a component its own dialect or base URI.
        published = catalog.schema(public_type)
        assert "$id" not in component and "$schema" not in component
        assert component == {k: v for k, v in published.items() if k not in ("$id", "$schema")}
        Draft202012Validator.check_schema(component)
    batch = hooks[catalog.BATCH]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert batch["type"] == "array"
    assert {i["$ref"] for i in batch["items"]["oneOf"]} == {
        f"#/components/schemas/{catalog.component_name(t)}" for t in PUBLIC_TYPES.values()}
    # Every $ref of the document resolves within it; operation ids stay unique.
    refs = _refs(spec)
    assert len(refs) > 20
    for ref in refs:
        assert isinstance(_pointer(spec, ref), dict), ref
    op_ids = [op["operationId"] for section in (spec["paths"], hooks) for item in section.values()
              for op in item.values() if isinstance(op, dict) and "operationId" in op]
    assert len(op_ids) == len(set(op_ids))
    # A hand-made event of each type validates through the document's own references; a wrong one does not.
    opened = {"id": "evt_1", "type": "email.opened", "timestamp": "2025-01-02T03:04:05.123456Z",
              "data": {"message_id": str(uuid.uuid4()), "recipient_id": 1, "address": "a@example.net",
                       "stream": "default", "metadata": {}}}
    validator = openapi_validator(spec, BATCH_POINTER)
    assert list(validator.iter_errors([opened])) == []
    assert list(validator.iter_errors([{**opened, "type": "email.unknown"}]))
    assert list(validator.iter_errors([]))
