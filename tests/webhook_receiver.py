"""A real HTTP webhook receiver on loopback (aiohttp), for the webhook tests.

It verifies every request's signature with the Standard Webhooks algorithm written here
independently of the engine (``whsec_`` + base64 key; HMAC-SHA256 over
``id.timestamp.body``; ``v1,<base64>`` entries separated by spaces), and answers what the
test tells it to: 2xx, 500, 429 + Retry-After, 410, a redirect, or a hang past the
dispatcher's timeout. ``respond`` decides per request from the parsed events.
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


@dataclass
class Request:
    headers: dict[str, str]
    body: bytes
    events: list[dict[str, Any]]
    verified: bool
    status: int
    at: float


class WebhookReceiver:
    def __init__(self) -> None:
        self.secrets: list[str] = []
        self.requests: list[Request] = []
        self.respond: Callable[[list[dict[str, Any]]], Reply] = lambda events: Reply()
        self.url = ""
        self.changed = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def accepted(self) -> list[dict[str, Any]]:
        """Events of requests answered 2xx, in arrival order."""
        return [e for r in self.requests if 200 <= r.status < 300 for e in r.events]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        parsed = json.loads(body)
        events = parsed if isinstance(parsed, list) else [parsed]
        verified = any(verify(s, headers, body) for s in self.secrets) if self.secrets else False
        reply = self.respond(events)
        rec = Request(headers, body, events, verified, reply.status, time.monotonic())
        if reply.hang:
            await asyncio.sleep(reply.hang)
        self.requests.append(rec)
        self.changed.set()
        return web.Response(status=reply.status, headers=reply.headers, text="ok")

    async def start(self, host: str = "127.0.0.1") -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{host}:{port}/hooks"

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
