"""The audit log: who changed what, from where, before and after. The only writer of ``audit_log``.

Every admin action (API keys, templates, suppressions, consent by hand, queue holds and purges,
shaping reloads, webhook changes, erasure) is recorded here, from the REST API and from the CLI,
in the same transaction as the change where its owner takes a connection, otherwise right after
it. Rows are never changed or deleted: the table refuses ``UPDATE`` and ``TRUNCATE`` itself, and
``DELETE`` from anything but :func:`prune` (retention). ``GET /v1/audit`` and ``engine audit``
read it by cursor for a SIEM.

``before``/``after`` describe the change, never a secret: :func:`scrub` drops key material,
webhook secrets and anything else named like a credential, whatever a caller passes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import asyncpg

from engine.db.pool import acquire
from engine.db.queries import q
from engine.errors import EngineError, ValidationFailed
from engine.events.public import Cursor

ACTIONS = frozenset({
    "apikey.create", "apikey.revoke", "apikey.rotate", "apikey.allow",
    "template.upload",
    "suppression.add", "suppression.remove", "suppression.import",
    "consent.change", "consent.import",
    "queue.hold", "queue.release", "queue.purge", "queue.retry",
    "shaping.reload",
    "webhook.create", "webhook.update", "webhook.delete", "webhook.rotate", "webhook.replay",
    "contact.erase",
})
"""Every action the log knows; recording another is a programming error."""

SECRET_FIELDS = frozenset({
    "secret", "secrets", "key", "api_key", "key_hash", "prefix", "password", "token", "secret_key",
    "previous_secret", "signing_key",
})
"""Field names never stored in ``before``/``after``, at any depth."""

MAX_TARGET = 500


def check_action(action: str | None, field: str = "action") -> str | None:
    """An exact action (``queue.hold``) or a family (``queue.`` or ``queue.*``)."""
    if action is None or action == "":
        return None
    family = action[:-1] if action.endswith("*") else action
    if family.endswith("."):
        if any(a.startswith(family) for a in ACTIONS):
            return family
    elif family in ACTIONS:
        return family
    raise ValidationFailed(f"unknown action {action!r}; known: {', '.join(sorted(ACTIONS))} (or a family like 'queue.*')", field=field)


def audit_target(target: str | None, field: str = "target") -> str | None:
    """A target filter as given, an email address normalized (the reader matches it by its hash)."""
    if not target:
        return None
    if "@" in target and not target.startswith("sha256:"):
        from engine.suppression import normalize_address

        try:
            return normalize_address(target)
        except ValidationFailed as exc:
            raise ValidationFailed(exc.message, field) from None
    return target


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acted: an API key (by name and id) from a client address, or an operator at the CLI."""

    name: str
    key_id: int | None = None
    ip: str | None = None

    @classmethod
    def cli(cls) -> Actor:
        """``cli:<os user>``, from the password database (not $USER, which anyone can set)."""
        try:
            import pwd

            user = pwd.getpwuid(os.getuid()).pw_name
        except (ImportError, KeyError):
            user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
        return cls(f"cli:{user}")

    @classmethod
    def api_key(cls, name: str, key_id: int, ip: str | None) -> Actor:
        return cls(name, key_id, _ip(ip))

    @classmethod
    def system(cls, what: str) -> Actor:
        """An action the engine took on an operator's signal (``signal:SIGHUP``)."""
        return cls(what)


def _ip(text: str | None) -> str | None:
    """A client address Postgres can store as ``inet``, or None (test clients, unix sockets)."""
    if not text:
        return None
    try:
        return str(ipaddress.ip_address(text.split("%", 1)[0]))
    except ValueError:
        return None


def redact_url(url: str) -> str:
    """A URL without what may be a credential: the userinfo and the query string's values."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    if ":" in (parts.hostname or ""):
        host = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port is not None else "")
    query = "&".join(f"{k}=…" for k, _ in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, host, parts.path, query, ""))


def webhook_view(endpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A webhook endpoint (its public JSON) as the audit log keeps it: URL redacted, no timestamps."""
    out = {k: v for k, v in endpoint.items() if k not in ("created_at", "updated_at", "secret")}
    if isinstance(out.get("url"), str):
        out["url"] = redact_url(out["url"])
    return out


def replay_view(
    dead_letters: bool, event_ids: Sequence[Any] | None, since: datetime | None, until: datetime | None, queued: int,
) -> dict[str, Any]:
    """What a webhook replay asked for and how many deliveries it queued."""
    return {
        "dead_letters": dead_letters, "event_ids": None if event_ids is None else [str(e) for e in event_ids][:100],
        "since": since, "until": until, "queued": queued,
    }


def scrub(value: Any) -> Any:
    """``value`` without any field named like a secret (see :data:`SECRET_FIELDS`), recursively."""
    if isinstance(value, Mapping):
        return {str(k): scrub(v) for k, v in value.items() if str(k).lower() not in SECRET_FIELDS}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [scrub(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)  # UUIDs, networks, paths: their text


async def record(
    conn: asyncpg.Connection,
    actor: Actor,
    action: str,
    target: str | None = None,
    *,
    address: str | None = None,
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
) -> int:
    """Append one row inside the caller's transaction (if any); returns its id.

    An action about an email address passes it as ``address`` (normalized, see
    :func:`engine.suppression.normalize_address`) instead of ``target``: the row names it
    ``sha256:<hash>``, the hash erasure keeps (so an erased address is nowhere in clear).
    Never put an address in ``before``/``after`` either.
    """
    if action not in ACTIONS:
        raise EngineError(f"unknown audit action {action!r}")
    if target is not None and address is not None:
        raise EngineError("give an audit row a target or an address, not both")
    row = await conn.fetchrow(
        *q(
            "audit_insert",
            actor=actor.name[:200],
            actor_key_id=actor.key_id,
            source_ip=actor.ip,
            action=action,
            target=None if target is None else str(target)[:MAX_TARGET],
            address=address,
            before=None if before is None else scrub(before),
            after=None if after is None else scrub(after),
        )
    )
    assert row is not None  # INSERT ... RETURNING
    return int(row["id"])


@dataclass(frozen=True, slots=True)
class AuditPage:
    entries: list[dict[str, Any]]
    next: Cursor
    """Where the next page starts (the cursor given when the page is empty)."""
    has_more: bool


def entry(row: Mapping[str, Any] | asyncpg.Record) -> dict[str, Any]:
    """One row as the API and the CLI print it; ``cursor`` resumes a read right after it."""
    at = row["at"]
    return {
        "id": row["id"],
        "cursor": Cursor(row["tx"], row["id"]).encode(),
        "at": at.isoformat() if isinstance(at, datetime) else at,
        "actor": row["actor"],
        "actor_key_id": row["actor_key_id"],
        "source_ip": row["source_ip"],
        "action": row["action"],
        "target": row["target"],
        "before": row["before"],
        "after": row["after"],
    }


async def read_page(
    conn: asyncpg.Connection, after: Cursor, *, limit: int, action: str | None = None, actor: str | None = None,
    target: str | None = None, since: datetime | None = None, until: datetime | None = None,
) -> AuditPage:
    """Rows after ``after`` in commit order; ``action`` ending in ``.`` matches a family (``queue.``).

    ``target`` with an ``@`` is an email address (normalized): it matches the rows naming its hash.
    """
    if target is not None and "@" in target:
        target = await conn.fetchval(*q("audit_address_target", address=target))
    rows = await conn.fetch(*q(
        "audit_page", tx=str(after.tx), id=after.id, action=action, actor=actor, target=target, since=since, until=until,
        limit=limit + 1,
    ))
    more = len(rows) > limit
    rows = rows[:limit]
    nxt = Cursor(rows[-1]["tx"], rows[-1]["id"]) if rows else after
    return AuditPage([entry(r) for r in rows], nxt, more)


async def prune(conn: asyncpg.Connection, before: datetime, limit: int = 5000) -> int:
    """Retention: delete up to ``limit`` of the oldest rows older than ``before``; returns how many.

    The only delete the table's trigger lets through, and only inside this call's transaction.
    Call it again until it returns less than ``limit``.
    """
    async with conn.transaction():
        await conn.fetchval(*q("audit_prune_allow", on="on"))
        status = await conn.execute(*q("audit_prune", before=before, limit=limit))
        await conn.fetchval(*q("audit_prune_allow", on="off"))
    return int(status.split()[-1])


class AuditLog:
    """The log over a pool, for code that holds no connection of its own."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection in a transaction: pass it to the change's owner and to :meth:`record`."""
        async with acquire(self.pool) as conn, conn.transaction():
            yield conn

    async def record(
        self, actor: Actor, action: str, target: str | None = None, *, address: str | None = None,
        before: Mapping[str, Any] | None = None, after: Mapping[str, Any] | None = None,
        conn: asyncpg.Connection | None = None,
    ) -> int:
        """:func:`record` in ``conn``'s transaction, or on a connection of its own."""
        if conn is not None:
            return await record(conn, actor, action, target, address=address, before=before, after=after)
        async with acquire(self.pool) as c:
            return await record(c, actor, action, target, address=address, before=before, after=after)

    async def page(self, after: Cursor, *, limit: int, **filters: Any) -> AuditPage:
        async with acquire(self.pool) as conn:
            return await read_page(conn, after, limit=limit, **filters)
