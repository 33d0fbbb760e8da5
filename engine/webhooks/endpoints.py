"""Webhook endpoints: where events go and which ones. The only writer of ``webhook_endpoints``.

An endpoint is a URL, an optional filter (event types, streams), batching and a secret.
Every input is checked here, for the API and the CLI alike: unknown event types and
streams, malformed or non-public URLs (see :mod:`engine.webhooks.safety`) are a
:class:`ValidationFailed` naming the field. The secret is shown once, at creation or
rotation, and stored encrypted (:class:`engine.webhooks.secrets.SecretBox`).
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from engine.config import Settings
from engine.db.pool import acquire
from engine.db.queries import q
from engine.errors import NotFound, ValidationFailed
from engine.events.public import PUBLIC_TYPES, internal_types
from engine.webhooks.safety import check_target
from engine.webhooks.secrets import SecretBox, new_secret, secret_bytes

UNSET: Any = object()
"""A field left out of an update (None can be a value: "every type", "every stream")."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    id: uuid.UUID
    url: str
    description: str
    event_types: list[str] | None
    """Public names (``email.delivered``); None: every type."""
    streams: list[str] | None
    enabled: bool
    disabled_reason: str | None
    batch_max: int
    batch_wait: float
    created_at: datetime
    updated_at: datetime
    rotating_until: datetime | None
    """While set (and in the future), requests carry a second signature with the previous secret."""

    @property
    def engine_types(self) -> list[str] | None:
        return None if self.event_types is None else internal_types(self.event_types)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id), "url": self.url, "description": self.description,
            "events": self.event_types, "streams": self.streams, "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            "batch": {"max_events": self.batch_max, "max_wait_ms": int(self.batch_wait * 1000)},
            "created_at": self.created_at.isoformat(), "updated_at": self.updated_at.isoformat(),
            "secret_rotation_ends_at": self.rotating_until.isoformat() if self.rotating_until else None,
        }


def _endpoint(row: asyncpg.Record) -> Endpoint:
    types = row["event_types"]
    until = row["prev_secret_until"]
    return Endpoint(
        id=row["id"], url=row["url"], description=row["description"],
        event_types=None if types is None else sorted(PUBLIC_TYPES[t] for t in types if t in PUBLIC_TYPES),
        streams=None if row["streams"] is None else list(row["streams"]),
        enabled=row["enabled"], disabled_reason=row["disabled_reason"],
        batch_max=row["batch_max"], batch_wait=row["batch_wait_ms"] / 1000.0,
        created_at=row["created_at"], updated_at=row["updated_at"],
        rotating_until=until if until is not None and until > datetime.now(UTC) else None,
    )


@dataclass(frozen=True, slots=True)
class SigningKeys:
    """What the dispatcher signs with: the current key, then the previous one during a rotation."""

    keys: tuple[bytes, ...]


class Endpoints:
    def __init__(self, pool: asyncpg.Pool, settings: Settings, box: SecretBox | None = None) -> None:
        self.pool = pool
        self.settings = settings
        self._box = box

    @property
    def box(self) -> SecretBox:
        if self._box is None:
            self._box = SecretBox(self.settings)
        return self._box

    # ---- input checks -------------------------------------------------------------------------
    def _types(self, events: Sequence[str] | None) -> list[str] | None:
        if events is None:
            return None
        if not events:
            raise ValidationFailed("give at least one event type, or leave 'events' out for all of them", field="events")
        return internal_types(list(events))

    def _streams(self, streams: Sequence[str] | None) -> list[str] | None:
        if streams is None:
            return None
        if not streams:
            raise ValidationFailed("give at least one stream, or leave 'streams' out for all of them", field="streams")
        known = self.settings.queue.streams
        for s in streams:
            if s not in known:
                raise ValidationFailed(f"unknown stream {s!r}; configured: {', '.join(sorted(known))}", field="streams")
        return sorted(set(streams))

    @staticmethod
    def _batch(batch_max: int, batch_wait: float) -> tuple[int, int]:
        if not 1 <= batch_max <= 1000:
            raise ValidationFailed("batch max_events must be 1-1000 (1 = one event per request)", field="batch.max_events")
        if not 0 <= batch_wait <= 60:
            raise ValidationFailed("batch max_wait_ms must be 0-60000", field="batch.max_wait_ms")
        return batch_max, int(batch_wait * 1000)

    @staticmethod
    def _description(text: str) -> str:
        if len(text) > 500:
            raise ValidationFailed("description is longer than 500 characters", field="description")
        return text

    # ---- operations ---------------------------------------------------------------------------
    async def create(
        self, url: str, *, events: Sequence[str] | None = None, streams: Sequence[str] | None = None,
        description: str = "", enabled: bool = True, batch_max: int = 1, batch_wait: float = 1.0,
    ) -> tuple[Endpoint, str]:
        """A new endpoint and its secret (returned once; only its encrypted form is kept)."""
        await check_target(url, self.settings.webhooks.allow_private_targets)
        types, streams_ = self._types(events), self._streams(streams)
        bmax, bwait = self._batch(batch_max, batch_wait)
        secret = new_secret()
        async with acquire(self.pool) as conn:
            row = await conn.fetchrow(
                *q(
                    "webhook_endpoint_insert", id=uuid.uuid4(), url=url, description=self._description(description),
                    event_types=types, streams=streams_, enabled=enabled, batch_max=bmax, batch_wait_ms=bwait,
                    secret_enc=self.box.seal(secret),
                )
            )
        assert row is not None  # INSERT ... RETURNING
        return _endpoint(row), secret

    async def list(self) -> list[Endpoint]:
        async with acquire(self.pool) as conn:
            return [_endpoint(r) for r in await conn.fetch(*q("webhook_endpoint_list"))]

    async def get(self, endpoint_id: uuid.UUID) -> Endpoint:
        async with acquire(self.pool) as conn:
            row = await conn.fetchrow(*q("webhook_endpoint_get", id=endpoint_id))
        if row is None:
            raise NotFound(f"no webhook endpoint {endpoint_id}")
        return _endpoint(row)

    async def update(
        self, endpoint_id: uuid.UUID, *, url: str = UNSET, events: Sequence[str] | None = UNSET,
        streams: Sequence[str] | None = UNSET, description: str = UNSET, enabled: bool = UNSET,
        batch_max: int = UNSET, batch_wait: float = UNSET,
    ) -> Endpoint:
        """Change the given fields; enabling clears the reason a 410 disabled it."""
        current = await self.get(endpoint_id)
        if url is not UNSET:
            await check_target(url, self.settings.webhooks.allow_private_targets)
        bmax, bwait = self._batch(
            current.batch_max if batch_max is UNSET else batch_max,
            current.batch_wait if batch_wait is UNSET else batch_wait,
        )
        async with acquire(self.pool) as conn:
            row = await conn.fetchrow(
                *q(
                    "webhook_endpoint_update", id=endpoint_id,
                    set_url=url is not UNSET, url=None if url is UNSET else url,
                    set_description=description is not UNSET,
                    description=None if description is UNSET else self._description(description),
                    set_event_types=events is not UNSET, event_types=None if events is UNSET else self._types(events),
                    set_streams=streams is not UNSET, streams=None if streams is UNSET else self._streams(streams),
                    set_enabled=enabled is not UNSET, enabled=None if enabled is UNSET else enabled,
                    set_batch_max=batch_max is not UNSET, batch_max=bmax,
                    set_batch_wait_ms=batch_wait is not UNSET, batch_wait_ms=bwait,
                )
            )
        if row is None:
            raise NotFound(f"no webhook endpoint {endpoint_id}")
        return _endpoint(row)

    async def delete(self, endpoint_id: uuid.UUID) -> None:
        """Remove the endpoint and every delivery of it (pending ones and dead letters too)."""
        async with acquire(self.pool) as conn:
            if await conn.fetchval(*q("webhook_endpoint_delete", id=endpoint_id)) is None:
                raise NotFound(f"no webhook endpoint {endpoint_id}")

    async def rotate(self, endpoint_id: uuid.UUID) -> tuple[Endpoint, str]:
        """A new secret; the previous one keeps signing too for ``[webhooks] secret_overlap``."""
        secret = new_secret()
        until = datetime.now(UTC) + timedelta(seconds=self.settings.webhooks.secret_overlap)
        async with acquire(self.pool) as conn:
            row = await conn.fetchrow(
                *q("webhook_endpoint_rotate", id=endpoint_id, secret_enc=self.box.seal(secret), overlap_until=until)
            )
        if row is None:
            raise NotFound(f"no webhook endpoint {endpoint_id}")
        return _endpoint(row), secret

    async def disable(self, endpoint_id: uuid.UUID, reason: str) -> bool:
        """The receiver said 410 Gone: stop sending (pending deliveries wait for a re-enable)."""
        async with acquire(self.pool) as conn:
            return await conn.fetchval(*q("webhook_endpoint_disable", id=endpoint_id, reason=reason[:500])) is not None

    async def active(self) -> builtins.list[tuple[Endpoint, SigningKeys]]:
        """Enabled endpoints with their signing keys (the dispatcher's view; never logged)."""
        async with acquire(self.pool) as conn:
            rows = await conn.fetch(*q("webhook_endpoint_list"))
        now = datetime.now(UTC)
        out = []
        for r in rows:
            if not r["enabled"]:
                continue
            keys = [secret_bytes(self.box.open(r["secret_enc"]))]
            if r["prev_secret_enc"] is not None and r["prev_secret_until"] is not None and r["prev_secret_until"] > now:
                keys.append(secret_bytes(self.box.open(r["prev_secret_enc"])))
            out.append((_endpoint(r), SigningKeys(tuple(keys))))
        return out
