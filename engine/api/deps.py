"""What handlers need, handed to them as FastAPI dependencies instead of closed over.

:func:`engine.api.app.create_app` stores one :class:`HttpContext` on ``app.state``;
:func:`get_ctx` reads it back for each request, so every handler is a plain module-level
function that tools (and people) can name. The dependencies are ``async def`` on purpose:
FastAPI runs a plain ``def`` dependency in its thread pool. Each resolved dependency costs
every request a little, so the submission handlers and ``require_*`` (which authenticate
the bearer key and check its scope) read the context from the request they already hold.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from engine.api.responses import ApiError
from engine.apikeys import ApiKey
from engine.audit import Actor, AuditLog

if TYPE_CHECKING:
    import asyncpg

    from engine.accept import Acceptor
    from engine.apikeys import ApiKeys
    from engine.compose.pipeline import Composer
    from engine.compose.render import Renderer
    from engine.compose.tracking import Keyring
    from engine.config import Settings
    from engine.consent.policy import ConsentPolicy
    from engine.consent.store import ConsentStore
    from engine.events.store import EventStore
    from engine.outbox import Outbox
    from engine.suppression import Suppressions
    from engine.templates_db import DbTemplateStore
    from engine.webhooks.deliveries import Deliveries
    from engine.webhooks.endpoints import Endpoints


@dataclass
class TrackingDeps:
    """What the tracking endpoints need; ``keyring`` None (no ``[[tracking.keys]]``) makes every token a 404."""

    pool: asyncpg.Pool
    keyring: Keyring | None
    composer: Composer | None
    events: EventStore
    suppressions: Suppressions
    templates: DbTemplateStore | None = None
    consent: ConsentPolicy | None = None
    """Unsubscribes on streams with a consent rule revoke its purpose (None: they always suppress)."""


@dataclass
class WebhookDeps:
    """What ``/v1/webhooks`` needs; ``wake`` tells this process's dispatcher to look now (after a replay)."""

    endpoints: Endpoints
    deliveries: Deliveries
    wake: Callable[[], None] | None = None


@dataclass
class ConsentDeps:
    """What ``/v1/consent`` and ``/v1/contacts`` need."""

    store: ConsentStore
    suppressions: Suppressions
    streams: dict[str, int]
    max_errors: int = 1000


@dataclass
class HttpContext:
    """Everything the handlers use, built once by the engine (see ``Engine._start_http``)."""

    settings: Settings
    outbox: Outbox
    apikeys: ApiKeys
    acceptor: Acceptor
    # Optional routers' dependencies: each router is mounted only when its part is set.
    templates: DbTemplateStore | None = None
    renderer: Renderer | None = None
    tracking: TrackingDeps | None = None
    events: EventStore | None = None
    webhooks: WebhookDeps | None = None
    consent: ConsentDeps | None = None
    audit: AuditLog | None = None
    """The audit log: admin actions record through :func:`get_audit`; ``GET /v1/audit`` reads it."""
    # For /readyz: which of this process's listeners are up (name -> up), and whether it is stopping.
    listeners: Callable[[], dict[str, bool]] | None = None
    stopping: Callable[[], bool] | None = None


def context(request: Request) -> HttpContext:
    """The context straight from the request: no dependency to resolve, for the submission path."""
    ctx: HttpContext = request.app.state.ctx
    return ctx


async def get_ctx(request: Request) -> HttpContext:
    """The context as a dependency: ``ctx: HttpContext = Depends(get_ctx)``."""
    return context(request)


class _NotMounted(RuntimeError):
    """A handler of an optional router ran although create_app did not mount it (a bug)."""


async def get_template_store(ctx: HttpContext = Depends(get_ctx)) -> DbTemplateStore:
    if ctx.templates is None:
        raise _NotMounted("templates")
    return ctx.templates


async def get_renderer(ctx: HttpContext = Depends(get_ctx)) -> Renderer:
    if ctx.renderer is None:
        raise _NotMounted("renderer")
    return ctx.renderer


async def get_suppressions(ctx: HttpContext = Depends(get_ctx)) -> Suppressions:
    if ctx.acceptor.suppressions is None:
        raise _NotMounted("suppressions")
    return ctx.acceptor.suppressions


async def get_tracking(ctx: HttpContext = Depends(get_ctx)) -> TrackingDeps:
    if ctx.tracking is None:
        raise _NotMounted("tracking")
    return ctx.tracking


async def get_events(ctx: HttpContext = Depends(get_ctx)) -> EventStore:
    if ctx.events is None:
        raise _NotMounted("events")
    return ctx.events


async def get_consent(ctx: HttpContext = Depends(get_ctx)) -> ConsentDeps:
    if ctx.consent is None:
        raise _NotMounted("consent")
    return ctx.consent


async def get_webhooks(ctx: HttpContext = Depends(get_ctx)) -> WebhookDeps:
    if ctx.webhooks is None:
        raise _NotMounted("webhooks")
    return ctx.webhooks


def client_ip(request: Request) -> str | None:
    """The connecting client's address (a proxy in front of the engine is the client)."""
    return request.client.host if request.client is not None else None


@dataclass
class Audit:
    """The audit log bound to one request: records as the request's API key, from its client address."""

    log: AuditLog
    request: Request

    @property
    def actor(self) -> Actor:
        key: ApiKey | None = getattr(self.request.state, "api_key", None)
        if key is None:  # a handler recording without require_*: a bug, not a client error
            raise RuntimeError("audit recorded before the request's API key was verified")
        return Actor.api_key(key.name, key.id, client_ip(self.request))

    async def __call__(
        self, action: str, target: str | None = None, *, address: str | None = None,
        before: Mapping[str, Any] | None = None, after: Mapping[str, Any] | None = None,
        conn: asyncpg.Connection | None = None,
    ) -> None:
        """Record ``action`` (see :func:`engine.audit.record`: an email address goes in ``address``)."""
        await self.log.record(self.actor, action, target, address=address, before=before, after=after, conn=conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection in a transaction, for an owner that takes one, so change and row commit together."""
        async with self.log.transaction() as conn:
            yield conn


async def get_audit_log(ctx: HttpContext = Depends(get_ctx)) -> AuditLog:
    if ctx.audit is None:
        raise _NotMounted("audit")
    return ctx.audit


async def get_audit(request: Request, log: AuditLog = Depends(get_audit_log)) -> Audit:
    """``audit: Audit = Depends(get_audit)``, next to a ``require_*`` dependency."""
    return Audit(log, request)


bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`")


def require(scope: str) -> Callable[..., Awaitable[ApiKey]]:
    """A dependency returning the request's API key: 401 without a valid key, 403 without ``scope``."""

    async def dependency(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ApiKey:
        apikeys = context(request).apikeys
        ip = client_ip(request)
        wait = apikeys.failures.retry_after(ip)
        if wait > 0:  # too many failures from this address: refused before the key is looked up
            apikeys.failures.refused("http")
            raise ApiError(
                429, f"too many failed authentications from {ip}; try again in {math.ceil(wait)} s",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"})
        key = await apikeys.verify(creds.credentials)
        if key is None:
            apikeys.failures.failed(ip, "http")
            raise ApiError(401, "invalid, revoked or expired API key", headers={"WWW-Authenticate": "Bearer"})
        if not key.permits(ip):
            apikeys.failures.failed(ip, "http")
            raise ApiError(403, f"API key {key.name!r} may not be used from {ip} (not in its IP allowlist)")
        if not key.allows(scope):
            raise ApiError(403, f"this API key lacks the '{scope}' scope")
        request.state.api_key = key
        structlog.contextvars.bind_contextvars(api_key=key.name)
        return key

    dependency.__name__ = dependency.__qualname__ = f"require_{scope}"
    return dependency


require_send = require("send")
require_read = require("read")
require_admin = require("admin")
require_scope_consent = require("consent")
