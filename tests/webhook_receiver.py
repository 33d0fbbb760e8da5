"""A real HTTP webhook receiver on loopback (aiohttp), for the webhook tests.

It verifies every request's signature with the Standard Webhooks algorithm written here
independently of the engine (``whsec_`` + base64 key; HMAC-SHA256 over
``id.timestamp.body``; ``v1,<base64>`` entries separated by spaces), and answers what the
test tells it to: 2xx, 500, 429 + Retry-After, 410, a redirect, or a hang past the
dispatcher's timeout. ``respond`` decides per request from the parsed events.

``requests`` holds the requests that were answered (the dispatcher saw the status);
``arrivals`` every request as it came in, also those whose client gave up (a timeout)
before the answer. A receiver can be stopped (connection refused) and started again on
the same port. :class:`FakeClock` is the dispatcher clock the tests move by hand.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance: float = 300.0) -> bool:
    """Standard Webhooks verification, independent of engine.webhooks.signing."""
    assert secret.startswith("whsec_")
    key = base64.b64decode(secret[len("whsec_"):])
    msg_id, ts = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    if not msg_id or not ts.isdigit() or abs(time.time() - int(ts)) > tolerance:
        return False
    expected = base64.b64encode(hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()).decode()
    for part in headers.get("webhook-signature", "").split(" "):
        version, _, sig = part.partition(",")
        if version == "v1" and hmac.compare_digest(sig, expected):
            return True
    return False


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hang: float = 0.0
    """Seconds to sleep before answering (past the dispatcher's timeout: a hang)."""
    gate: asyncio.Event | None = None
    """Answer only once this is set (a slow receiver the test releases)."""


@dataclass
class Request:
    headers: dict[str, str]
    body: bytes
    events: list[dict[str, Any]]
    verified: bool
    status: int
    at: float
    path: str = "/hooks"


class WebhookReceiver:
    def __init__(self) -> None:
        self.secrets: list[str] = []
        self.requests: list[Request] = []
        self.respond: Callable[[list[dict[str, Any]]], Reply] = lambda events: Reply()
        self.arrivals: list[Request] = []
        self.url = ""
        self.port = 0
        self.changed = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def accepted(self) -> list[dict[str, Any]]:
        """Events of requests answered 2xx, in arrival order."""
        return [e for r in self.requests if 200 <= r.status < 300 for e in r.events]

    def accepted_ids(self, address: str | None = None) -> list[str]:
        """Ids of accepted events (of one recipient address), in arrival order."""
        return [e["id"] for e in self.accepted if address is None or e["data"].get("address") == address]

    def tried(self, event_id: str) -> list[Request]:
        """Every request that carried ``event_id``, answered or not."""
        return [r for r in self.arrivals if any(e["id"] == event_id for e in r.events)]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        parsed = json.loads(body)
        events = parsed if isinstance(parsed, list) else [parsed]
        verified = any(verify(s, headers, body) for s in self.secrets) if self.secrets else False
        reply = self.respond(events)
        rec = Request(headers, body, events, verified, reply.status, time.monotonic(), request.path)
        self.arrivals.append(rec)
        self.changed.set()
        if reply.hang:
            await asyncio.sleep(reply.hang)  # cancelled when the client gives up (handler_cancellation)
        if reply.gate is not None:
            await reply.gate.wait()
        self.requests.append(rec)
        self.changed.set()
        return web.Response(status=reply.status, headers=reply.headers, text="ok")

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen (again) on ``port`` (0: any free one); a hung handler is cancelled when its client leaves."""
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.url = f"http://{host}:{self.port}/hooks"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"receiver: condition not met in {timeout}s; got {len(self.requests)} requests")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=min(left, 0.2))
            except TimeoutError:
                pass


@pytest.fixture
async def webhook_receiver() -> AsyncIterator[Callable[[], Any]]:
    """``rx = await webhook_receiver()``: a started receiver; all are stopped at teardown."""
    made: list[WebhookReceiver] = []

    async def make() -> WebhookReceiver:
        rx = WebhookReceiver()
        await rx.start()
        made.append(rx)
        return rx

    yield make
    for rx in made:
        await rx.stop()


class FakeClock:
    """The dispatcher's clock, moved only by the test: retry times are exact and nothing is due early.

    It starts at real time. Times the API writes (a replay's "due now") are real time, so a
    test that replays calls :meth:`catch_up` before expecting the replay to go out.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self.t = start or datetime.now(UTC)

    def now(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> datetime:
        self.t += timedelta(seconds=seconds)
        return self.t

    def catch_up(self) -> datetime:
        self.t = max(self.t, datetime.now(UTC))
        return self.t


def toml_section(name: str, values: dict[str, Any]) -> str:
    """A TOML table from simple values (JSON's spelling of str, number, bool and list is TOML's)."""
    return f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


WEBHOOKS_FAST = {
    "enabled": False,  # the tests run their own dispatchers, on a FakeClock
    "allow_private_targets": True,
    "jitter": 0,
    "poll_interval": "50ms",
    "timeout": "2s",
}


class Stack:
    """A real engine (HTTP API, no dispatcher of its own) plus dispatchers the test starts, on one clock."""

    def __init__(self, eng: Any, http: Any, clock: FakeClock, dsn: str) -> None:
        self.eng = eng
        self.http = http
        self.clock = clock
        self.dsn = dsn
        self.dispatchers: list[tuple[Any, asyncio.Task[None], Any]] = []

    @property
    def pool(self) -> Any:
        return self.eng.pool

    async def start_dispatcher(self, settings: Any = None, clock: Any = None) -> Any:
        """A real :class:`Dispatcher` as a task, on a pool of its own (as ``Engine`` runs it)."""
        from engine.db.pool import create_pool
        from engine.webhooks.dispatcher import Dispatcher

        settings = settings or self.eng.settings
        pool = await create_pool(self.dsn, settings, min_size=1, max_size=4)
        d = Dispatcher(settings, pool, clock=clock or self.clock, owner=f"test-{len(self.dispatchers)}")
        self.eng.dispatcher = d  # the API's wake() (after a replay or a change) reaches it
        self.dispatchers.append((d, asyncio.create_task(d.run()), pool))
        return d

    async def stop_dispatchers(self) -> None:
        for d, _, _ in self.dispatchers:
            d.request_stop()
        for _, task, pool in self.dispatchers:
            await asyncio.wait_for(task, 30)
            await pool.close()
        self.dispatchers.clear()
        self.eng.dispatcher = None

    def wake(self) -> None:
        for d, _, _ in self.dispatchers:
            d.wake()

    def advance(self, seconds: float) -> datetime:
        """Move the clock and let the dispatchers look at once (no waiting out a poll)."""
        t = self.clock.advance(seconds)
        self.wake()
        return t

    async def endpoint(self, url: str, **body: Any) -> dict[str, Any]:
        r = await self.http.post("/v1/webhooks", json={"url": url, **body})
        assert r.status_code == 201, r.text
        return dict(r.json())

    async def submit(self, to: list[str], **fields: Any) -> dict[str, int]:
        """Accept one message through the real acceptor (one ``accepted`` event per recipient); address -> recipient id."""
        from engine.apikeys import ApiKey
        from engine.submit.models import MessageIn

        item = MessageIn.model_validate({"from": "app@sender.test", "to": to, "subject": "Hi", "text": "Hello", **fields})
        msg = self.eng.acceptor.build_http_message(item, ApiKey(1, "test", frozenset({"send"})))
        (rcpts,) = await self.eng.acceptor.commit([msg])
        return {r.address: r.id for r in rcpts}

    async def record(self, event_type: str, recipient_id: int, data: dict[str, Any] | None = None) -> str:
        """An observation for a recipient (an open, a click) as tracking records it; its public id."""
        assert await self.eng.events.record_for_recipient(event_type, recipient_id, data or {})
        n = await self.pool.fetchval("SELECT max(id) FROM events WHERE recipient_id = $1 AND type = $2", recipient_id, event_type)
        return f"evt_{n}"

    async def event_ids(self, recipient_id: int | None = None) -> list[str]:
        """Public ids of the stream's events (of one recipient), in stream order."""
        rows = await self.pool.fetch(
            "SELECT id FROM events WHERE ($1::bigint IS NULL OR recipient_id = $1) ORDER BY tx, id", recipient_id
        )
        return [f"evt_{r['id']}" for r in rows]

    async def deliveries(self, endpoint_id: str, state: str | None = None) -> list[dict[str, Any]]:
        """``GET /v1/webhooks/{id}/deliveries``, oldest first."""
        r = await self.http.get(
            f"/v1/webhooks/{endpoint_id}/deliveries", params={"state": state, "limit": 1000} if state else {"limit": 1000}
        )
        assert r.status_code == 200, r.text
        return list(reversed(r.json()["deliveries"]))

    async def delivery(self, endpoint_id: str, event_id: str) -> dict[str, Any] | None:
        """The (first, not replayed) delivery of one event to one endpoint; None before the fan-out made it."""
        found = [d for d in await self.deliveries(endpoint_id) if d["event_id"] == event_id and not d["replay"]]
        assert len(found) <= 1, found
        return found[0] if found else None

    async def wait_delivery(
        self, endpoint_id: str, event_id: str, check: Callable[[dict[str, Any]], bool], timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Wait until the event's delivery to the endpoint satisfies ``check``; returns it."""
        async def probe() -> dict[str, Any] | None:
            d = await self.delivery(endpoint_id, event_id)
            return d if d is not None and check(d) else None

        got: dict[str, Any] = await self.until(probe, timeout, f"delivery of {event_id}")
        return got

    async def until(self, check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
        """Poll an async ``check`` until it returns something truthy (generous: the machine may be loaded)."""
        deadline = time.monotonic() + timeout
        while True:
            got = await check()
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not met in {timeout}s (last: {got!r})")
            await asyncio.sleep(0.05)


@pytest.fixture
async def webhook_stack(engine_factory: Any, db_dsn: str) -> AsyncIterator[Callable[..., Any]]:
    """``st = await webhook_stack(retry_schedule=[...], extra="[routing.static]...")``: engine + admin client + clock.

    Keyword arguments are ``[webhooks]`` settings over :data:`WEBHOOKS_FAST`; ``extra`` is more TOML.
    """
    import httpx

    made: list[Stack] = []
    clients: list[Any] = []

    async def make(extra: str = "", **webhooks: Any) -> Stack:
        eng = await engine_factory(toml_section("webhooks", {**WEBHOOKS_FAST, **webhooks}) + extra)
        key, _ = await eng.apikeys.create(f"admin{len(made)}", ["send", "read", "admin"])
        base = f"http://{eng.http_address[0]}:{eng.http_address[1]}"
        http = httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        clients.append(http)
        st = Stack(eng, http, FakeClock(), db_dsn)
        made.append(st)
        return st

    yield make
    for st in made:
        await st.stop_dispatchers()
    for c in clients:
        await c.aclose()
