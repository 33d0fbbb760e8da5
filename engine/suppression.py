"""Suppressions: addresses that must not receive mail, per stream or everywhere.

A suppression is ``(address, scope)``: scope is a stream name (an unsubscribe
from ``bulk`` mail stops bulk mail only) or ``*`` for every stream (a hard
bounce, a complaint, an operator's block). Addresses are keyed wholly
lower-cased (in Python, so the folding never depends on the database's
locale): RFC 5321 lets a local part be case-sensitive, but no mailbox provider
uses that, and an unsubscribe must not be dodged by ``Ann@`` vs ``ann@``. A
lookup is an exact, indexed equality.

At submit, the outbox's enqueue statement checks the list for the whole
submission (accept's policy, no extra round trip); :meth:`Suppressions.suppressed_pairs`
answers the same question for callers outside a submission. The tracking endpoints, operators and
the feedback loop (:func:`add_many`) add rows. This module is the only writer
of ``suppressions``. Adding is idempotent: the first reason recorded for
``(address, scope)`` stays, and mail already queued for the address is
stopped in the same transaction (:func:`engine.outbox.suppress_pending`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from engine import metrics
from engine.addresses import AddressError, normalize_domain, split_address
from engine.db.pool import acquire
from engine.db.queries import q
from engine.errors import ValidationFailed
from engine.outbox import suppress_pending

GLOBAL = "*"
_SCOPE_RE = re.compile(r"^(?:\*|[a-z0-9_-]{1,64})$")
_MAX_TEXT = 200


@dataclass(frozen=True, slots=True)
class Suppression:
    address: str
    scope: str
    reason: str
    source: str
    created_at: datetime


def normalize_address(address: str) -> str:
    """``Ann@Example.COM.`` -> ``ann@example.com``, the suppression key; raises ValidationFailed."""
    try:
        local, domain = split_address(address.strip())
    except AddressError as exc:
        raise ValidationFailed(str(exc), "address") from None
    return f"{local}@{normalize_domain(domain)}".lower()


def _scope(scope: str) -> str:
    if not isinstance(scope, str) or not _SCOPE_RE.match(scope):
        raise ValidationFailed("scope must be a stream name ([a-z0-9_-]{1,64}) or '*' for every stream", "scope")
    return scope


def configured_scope(scope: str, streams: Iterable[str]) -> str:
    """``scope`` checked against the configured ``streams``: one of them, or ``*``.

    The edges that take a scope from an operator (REST, CLI) call this with
    ``settings.queue.streams``, so a typo such as ``bulkk`` is refused the way an
    unknown stream is refused at submission, instead of silently blocking nothing.
    """
    scope = _scope(scope)
    known = sorted(streams)
    if scope != GLOBAL and scope not in known:
        raise ValidationFailed(
            f"unknown scope {scope!r}; use '*' or a configured stream: {', '.join(known)}", "scope"
        )
    return scope


def _text(value: str, field: str) -> str:
    value = (value or "").strip()
    if not value or len(value) > _MAX_TEXT or not value.isprintable():
        raise ValidationFailed(f"{field} must be 1-{_MAX_TEXT} printable characters", field)
    return value


class Suppressions:
    """The ``suppressions`` table. Methods take ``conn`` to join a caller's transaction."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def add(
        self, address: str, scope: str, reason: str, source: str, *, conn: asyncpg.Connection | None = None
    ) -> bool:
        """Suppress ``address`` for ``scope``; True when the row is new (False: already suppressed).

        Mail already queued for the address (in that stream, or every stream for ``*``) is
        stopped in the same transaction (:func:`suppress_pending`).
        """
        new, _ = await self.suppress(address, scope, reason, source, conn=conn)
        return new

    async def suppress(
        self, address: str, scope: str, reason: str, source: str, *, conn: asyncpg.Connection | None = None
    ) -> tuple[bool, int]:
        """:meth:`add`, returning (new, how many pending recipient rows became 'suppressed')."""
        key, scope, reason = normalize_address(address), _scope(scope), _text(reason, "reason")
        args = q("suppression_add", address=key, scope=scope, reason=reason, source=_text(source, "source"))
        if conn is not None:
            async with conn.transaction():  # a savepoint inside the caller's transaction
                new = await conn.fetchval(*args) is not None
                moved = await suppress_pending(conn, [(key, scope, reason)])
        else:
            async with acquire(self.pool) as c, c.transaction():
                new = await c.fetchval(*args) is not None
                moved = await suppress_pending(c, [(key, scope, reason)])
        if new:
            metrics.inc(metrics.get().suppressions_added, reason=_reason_label(reason))
        return new, len(moved)

    async def add_batch(self, items: Sequence[tuple[str, str, str, str]]) -> tuple[int, int]:
        """Many (normalized address, scope, reason, source) in one transaction: (new rows, queued rows stopped)."""
        async with acquire(self.pool) as conn, conn.transaction():
            return await add_many(conn, items)

    async def remove(self, address: str, scope: str | None = None) -> list[str]:
        """Lift a suppression (every scope when ``scope`` is None); returns the scopes removed."""
        async with acquire(self.pool) as conn:
            rows = await conn.fetch(
                *q("suppression_remove", address=normalize_address(address), scope=None if scope is None else _scope(scope))
            )
        return sorted(r["scope"] for r in rows)

    async def is_suppressed(self, addresses: Iterable[str], stream: str) -> set[str]:
        """Which of ``addresses`` (valid addresses, as in recipients.address) may not get ``stream`` mail."""
        found = await self.suppressed_pairs({stream: addresses})
        return found.get(stream, set())

    async def suppressed_pairs(
        self, by_stream: Mapping[str, Iterable[str]], *, conn: asyncpg.Connection | None = None
    ) -> dict[str, set[str]]:
        """stream -> suppressed addresses (as given), for a whole submission in one query."""
        addrs: list[str] = []
        streams: list[str] = []
        given: dict[tuple[str, str], list[str]] = {}  # (key, stream) -> the spellings asked about
        for stream, group in by_stream.items():
            for a in set(group):
                key = a.lower()
                if (key, stream) not in given:
                    addrs.append(key)
                    streams.append(stream)
                given.setdefault((key, stream), []).append(a)
        if not addrs:
            return {}
        args = q("suppression_match", addresses=addrs, streams=streams)
        if conn is not None:
            rows = await conn.fetch(*args)
        else:
            async with acquire(self.pool) as c:
                rows = await c.fetch(*args)
        out: dict[str, set[str]] = {}
        for r in rows:
            out.setdefault(r["stream"], set()).update(given[(r["address"], r["stream"])])
        return out

    async def page(
        self, after: tuple[str, str] | None, limit: int, address: str | None = None,
    ) -> list[Suppression]:
        """Suppressions in (address, scope) order after ``after``: the export's keyset pages."""
        a, s = after if after is not None else ("", "")
        key = None if address is None else normalize_address(address)
        async with acquire(self.pool) as conn:
            rows = await conn.fetch(*q("suppression_page", after_address=a, after_scope=s, address=key, limit=limit))
        return [Suppression(**dict(r)) for r in rows]

    async def list(self, address: str | None = None, limit: int = 100) -> list[Suppression]:
        async with acquire(self.pool) as conn:
            rows = await conn.fetch(
                *q("suppression_list", address=None if address is None else normalize_address(address), limit=limit)
            )
        return [Suppression(**dict(r)) for r in rows]


async def add_many(conn: asyncpg.Connection, items: Iterable[tuple[str, str, str, str]]) -> tuple[int, int]:
    """Suppress many (address, scope, reason, source) at once in the caller's transaction.

    Addresses must already be normalized (:func:`normalize_address`). Returns (new
    suppression rows, pending recipient rows stopped). Two statements, whatever the count:
    the feedback loop calls this once per flush.
    """
    rows = list(items)
    if not rows:
        return 0, 0
    new = await conn.fetch(
        *q(
            "suppressions_add_many",
            addresses=[r[0] for r in rows],
            scopes=[_scope(r[1]) for r in rows],
            reasons=[r[2] for r in rows],
            sources=[r[3] for r in rows],
        )
    )
    moved = await suppress_pending(conn, [(a, s, r) for a, s, r, _ in rows])
    if new:
        m = metrics.get()
        reasons = {(r[0], r[1]): r[2] for r in rows}
        for row in new:
            metrics.inc(m.suppressions_added, reason=_reason_label(reasons.get((row["address"], row["scope"]), "")))
    return len(new), len(moved)


_KNOWN_REASONS = frozenset({"unsubscribed", "complaint", "unknown_user", "bad_domain", "disabled_mailbox", "manual", "import"})


def _reason_label(reason: str) -> str:
    """A bounded label: the known reasons, or ``other`` (operators type free text here)."""
    return reason if reason in _KNOWN_REASONS else "other"


async def erase(conn: asyncpg.Connection, address: str) -> int:
    """Remove an erased address's suppressions (the do-not-mail hash replaces them)."""
    return len(await conn.fetch(*q("suppression_erase", address=address)))
