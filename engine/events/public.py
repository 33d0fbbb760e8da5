"""The public face of the event stream: type names, cursors and the payload consumers see.

The ``events`` table keeps the engine's own short names (``delivered``) and a versioned
payload written by whichever stage knew the fact. Webhooks, ``GET /v1/events`` and
exports all speak the public form built here, once, so the three never disagree:
``{"id": "evt_42", "type": "email.delivered", "timestamp": "...", "data": {...}}``.
``data`` joins what the event row says with what the queue knows about its recipient
(address, stream, message metadata, attempt number), so a consumer never has to call
back to learn who an event is about.

Every public type has a JSON Schema under ``engine/events/schemas/`` (``<type>.v<N>.json``);
a new field is a minor change within a version, a changed field a new version.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from engine.errors import ValidationFailed

PUBLIC_TYPES: dict[str, str] = {
    "accepted": "email.accepted",
    "deferred": "email.deferred",
    "delivered": "email.delivered",
    "bounced": "email.bounced",
    "expired": "email.expired",
    "suppressed": "email.suppressed",
    "complained": "email.complained",
    "opened": "email.opened",
    "clicked": "email.clicked",
    "unsubscribed": "email.unsubscribed",
    "consent_changed": "consent.changed",
    "contact_erased": "contact.erased",
}
"""Engine event type -> public name. Other engine types (held, released, shaping decisions) stay inside."""
INTERNAL_TYPES: dict[str, str] = {v: k for k, v in PUBLIC_TYPES.items()}
SCHEMA_VERSION = 1

# Stored field -> public field: the stored names are short and shared by several stages;
# the public ones say what they are.
_RENAMED = {"code": "smtp_code", "status": "enhanced_status", "source": "egress"}
_OWN_NAMES = frozenset({"consent_changed", "contact_erased"})
"""Types whose stored names are already public: a consent change's ``status`` is the consent
status and its ``source`` the system that recorded it, not an SMTP status or an egress."""
_COMMON = ("message_id", "recipient_id", "address", "stream", "metadata")


def internal_types(public: list[str] | None, field: str = "events") -> list[str]:
    """Public type names (or None: every public type) as engine types; unknown names name ``field``."""
    if public is None:
        return sorted(PUBLIC_TYPES)
    out = []
    for name in public:
        if name not in INTERNAL_TYPES:
            raise ValidationFailed(f"unknown event type {name!r}; known: {', '.join(sorted(INTERNAL_TYPES))}", field=field)
        out.append(INTERNAL_TYPES[name])
    return sorted(set(out))


def event_id(n: int) -> str:
    """The public id of event ``n``: stable across retries and replays (the ``webhook-id``)."""
    return f"evt_{n}"


def parse_event_id(text: str, field: str = "event_ids") -> int:
    """``evt_42`` (or ``42``) -> 42; anything else is a 4xx naming ``field``."""
    raw = text.removeprefix("evt_")
    if not raw.isdigit() or len(raw) > 18:
        raise ValidationFailed(f"{text!r} is not an event id like 'evt_42'", field=field)
    return int(raw)


@dataclass(frozen=True, slots=True, order=True)
class Cursor:
    """A position in the commit-ordered stream: (writing transaction, event id)."""

    tx: int = 0
    id: int = 0

    def encode(self) -> str:
        return base64.urlsafe_b64encode(f"{self.tx}.{self.id}".encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str, field: str = "after") -> Cursor:
        """An opaque cursor from a client; anything malformed is a 4xx naming ``field``."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
            tx, _, n = raw.partition(".")
            cur = cls(int(tx), int(n))
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise ValidationFailed("not a cursor this engine issued (use the 'next' value of a previous page)", field=field) from None
        if not (0 <= cur.tx < 2**63 and 0 <= cur.id < 2**63):
            raise ValidationFailed("cursor out of range", field=field)
        return cur


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def public_event(row: Mapping[str, Any] | asyncpg.Record) -> dict[str, Any]:
    """One event row (joined with its recipient and message, see ``events_page``) in public form."""
    kind = row["type"]
    stored: Mapping[str, Any] = row["data"] or {}
    data: dict[str, Any] = {}
    renamed = {} if kind in _OWN_NAMES else _RENAMED
    for k, v in stored.items():
        if k == "v" or k in _COMMON:
            continue
        if k == "source" and (kind == "accepted" or stored.get("at") == "submit"):
            data["source"] = v  # where the message came in (smtp or http), not an egress source
        else:
            data[renamed.get(k, k)] = v
    mid = row["message_id"]
    data["message_id"] = str(mid) if isinstance(mid, uuid.UUID) else mid
    data["recipient_id"] = row["recipient_id"]
    # Events about an address rather than a recipient row (consent changes) carry their own.
    data["address"] = row["address"] if row["address"] is not None else stored.get("address")
    data["stream"] = row["stream"]
    data["metadata"] = row["metadata"] if row["metadata"] is not None else {}
    if row["recipient_id"] is not None:
        data["contact_id"] = row["contact_id"]
        data["external"] = row["external"] if row["external"] is not None else {}
    if kind in ("delivered", "bounced", "expired") and "attempt" not in data and row["attempts"] is not None:
        data["attempt"] = row["attempts"]
    return {
        "id": event_id(row["id"]),
        "type": PUBLIC_TYPES[kind],
        "timestamp": _iso(row["created_at"]),
        "data": data,
    }
