"""The outbox: every statement that touches the queue, and nothing else. The only writer of
``messages``, ``recipients`` and ``attempts`` (tests/test_ownership.py holds that).

A message's content is stored once in ``messages``; each recipient is one row of
``recipients`` carrying its own state machine::

    queued ─claim─> leased ─ack─> delivered | bounced | expired | suppressed
      ^               │
      └── deferred <──┘ defer (backoff)      held <─> queued (ops)

Every operation is batched (``unnest`` arrays), so the hot path costs one round
trip per batch, not per recipient. Claims use ``FOR UPDATE SKIP LOCKED`` and a
lease, so any number of worker processes on any number of hosts can share the
queue; a dead worker's leases run out and :meth:`Outbox.reclaim_expired_leases`
puts its rows back.

Every change of a recipient's state that the world may care about writes its
event (:mod:`engine.events.store`) in the same transaction, for exactly the rows
the statement changed: ``accepted`` or ``suppressed`` at enqueue, ``delivered``
/ ``bounced`` / ``expired`` / ``suppressed`` at ack, ``deferred`` (with the
attempt number) at defer, ``held`` / ``released`` / ``bounced`` (purge) for
operator actions, ``bounced`` for asynchronous bounces and ``suppressed`` when a
new suppression stops pending mail. Lease bookkeeping (claim, release, lease
renewal and reclaim, a shaping postponement) hands a row between workers without
a delivery attempt and writes no event: the row is waiting before and after.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from engine.db import partitions
from engine.db.pool import acquire
from engine.db.queries import q
from engine.events.store import Event, record_events

if TYPE_CHECKING:
    from engine.consent.policy import ConsentPolicy

NOTIFY_CHANNEL = "engine_outbox"
SUPPRESSED_AT_SUBMIT = "on the suppression list"
_MANAGE_EVENTS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "retry": (None, {}),  # the row stays queued/deferred, only sooner: no state change
    "hold": ("held", {"origin": "operator"}),
    "release": ("released", {"origin": "operator"}),
    "purge": ("bounced", {"origin": "operator", "category": "purged", "permanent": True, "hard": False,
                          "status": "5.0.0", "reply": "5.0.0 purged by operator"}),
}
EXACT_STATS_ROWS = 200_000
"""Up to this many recipient rows, :meth:`Outbox.stats` counts exactly (a scan is cheap)."""
STATS_SAMPLE_ROWS = 50_000
"""Rows an estimated :meth:`Outbox.stats` samples (a share of the table's pages)."""
STATES = ("queued", "leased", "deferred", "delivered", "bounced", "expired", "suppressed", "held")
FINAL_STATES = frozenset({"delivered", "bounced", "expired", "suppressed"})


@dataclass(slots=True)
class NewRecipient:
    address: str
    domain: str
    kind: str = "to"
    vars: dict[str, Any] | None = None
    state: str = "queued"
    reason: str | None = None
    """Why the row starts in a state other than queued (e.g. the suppression that stopped it)."""
    contact_id: str | None = None
    """The CRM/CDP id of this recipient: on every event of the row, never in a URL."""
    external: dict[str, Any] | None = None
    """Other external ids (segment, membership, owner ...), carried to every event like contact_id."""


@dataclass(slots=True)
class NewMessage:
    id: uuid.UUID
    source: str
    mail_from: str
    stream: str
    priority: int
    recipients: list[NewRecipient]
    raw: bytes | None = None
    content: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    api_key_id: int | None = None
    send_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class EnqueuedRecipient:
    id: int
    address: str
    state: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """A final result for one leased recipient (delivered, bounced, expired, suppressed)."""

    id: int
    state: str
    code: int | None = None
    status: str | None = None
    reply: str | None = None
    attempted: bool = True
    event: Mapping[str, Any] | None = None
    """Payload of the event recorded with the change (default: code, status and reply)."""


@dataclass(frozen=True, slots=True)
class Deferral:
    id: int
    next_attempt_at: datetime
    code: int | None = None
    status: str | None = None
    reply: str | None = None
    attempted: bool = True
    event: Mapping[str, Any] | None = None
    """Payload of the ``deferred`` event (not recorded when nothing was attempted)."""


@dataclass(frozen=True, slots=True)
class Bounce:
    """An asynchronous permanent failure of one recipient row (a DSN that arrived after the fact)."""

    id: int
    status: str | None
    reply: str
    event: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Attempted:
    """One row of ``attempts``: the history of tries behind a recipient's state."""

    recipient_id: int
    outcome: str
    code: int | None
    status: str | None
    reply: str
    mx: str | None
    duration_ms: int


def _default_event(code: int | None, status: str | None, reply: str | None) -> dict[str, Any]:
    return {"code": code, "status": status, "reply": (reply or "")[:1000]}


async def record_attempts(conn: asyncpg.Connection, rows: Sequence[Attempted]) -> None:
    """Append attempt rows in one statement (inside the caller's outcome transaction)."""
    if not rows:
        return
    await conn.execute(
        *q(
            "insert_attempts",
            recipient_ids=[a.recipient_id for a in rows],
            outcomes=[a.outcome for a in rows],
            codes=[a.code for a in rows],
            statuses=[a.status for a in rows],
            replies=[a.reply for a in rows],
            mxs=[a.mx for a in rows],
            durations=[a.duration_ms for a in rows],
        )
    )


async def mark_bounced(conn: asyncpg.Connection, bounces: Sequence[Bounce]) -> set[int]:
    """Rows that were delivered or are still waiting become 'bounced', each with its ``bounced`` event.

    Leased rows are left to their worker (its ack must still find them leased). Returns the
    ids that changed, so the caller can record what happened to the others as observations.
    """
    if not bounces:
        return set()
    rows = await conn.fetch(
        *q("mark_bounced", ids=[b.id for b in bounces], statuses=[b.status for b in bounces],
           replies=[b.reply for b in bounces])
    )
    by_id = {b.id: b for b in bounces}
    await record_events(conn, [Event("bounced", r["id"], r["message_id"], by_id[r["id"]].event) for r in rows])
    return {r["id"] for r in rows}


async def suppress_pending(conn: asyncpg.Connection, items: Iterable[tuple[str, str, str]]) -> list[int]:
    """Queued, deferred or held rows of newly suppressed addresses become 'suppressed'.

    ``items`` are (lower-cased address, scope, reason); scope ``*`` means every stream.
    Why: a suppression must also stop mail accepted before it, not only later submissions.
    Call it in the transaction that inserts the suppression; each row moved gets a
    ``suppressed`` event. Leased rows (a worker is sending them right now) finish their
    attempt. Returns the recipient ids moved.
    """
    addrs: list[str] = []
    scopes: list[str] = []
    reasons: list[str] = []
    for address, scope, reason in items:
        addrs.append(address)
        scopes.append(scope)
        reasons.append(reason)
    if not addrs:
        return []
    rows = await conn.fetch(*q("suppress_pending", addresses=addrs, scopes=scopes, reasons=reasons))
    await record_events(
        conn,
        [
            Event("suppressed", r["id"], r["message_id"],
                  {"reason": r["reason"], "scope": r["scope"], "stream": r["stream"], "pending": True})
            for r in rows
        ],
    )
    return [r["id"] for r in rows]


class Outbox:
    """Batched queue operations over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool, max_age: float, consent: ConsentPolicy | None = None) -> None:
        self.pool = pool
        self.max_age = max_age
        self.consent = consent
        """Stream consent rules applied at enqueue (with ``suppress``) and at claim; None: no consent check."""

    async def enqueue(
        self, messages: Sequence[NewMessage], conn: asyncpg.Connection | None = None, *, suppress: bool = False
    ) -> list[list[EnqueuedRecipient]]:
        """Insert messages, their recipient rows and their events in one transaction (two statements).

        Returns, per message, its recipient rows in submission order. Pass ``conn``
        to join a transaction the caller already holds (idempotency bookkeeping).
        ``suppress``: recipients on the suppression list for their stream start as
        ``suppressed`` (the accept layer's policy, applied inside the insert so a
        submission costs no extra round trip).
        """
        parts = [(m, m.recipients) for m in messages]
        if conn is None:
            async with acquire(self.pool) as c, c.transaction():
                return await self._enqueue(c, messages, parts, suppress)
        return await self._enqueue(conn, messages, parts, suppress)

    async def enqueue_part(
        self, conn: asyncpg.Connection, messages: Sequence[NewMessage],
        parts: Sequence[tuple[NewMessage, Sequence[NewRecipient]]], *, suppress: bool = False,
    ) -> list[list[EnqueuedRecipient]]:
        """One slice of a large submission, inside the caller's transaction: the rows of ``messages``
        and the recipient rows of ``parts`` (a message's recipients may be spread over several slices,
        its own row goes with the first); returns, per part, its rows in order.

        Why: a request of tens of thousands of recipients, enqueued in one statement, held several
        Python objects per recipient at once (~2 KB each); slices bound that by the slice.
        """
        return await self._enqueue(conn, messages, parts, suppress)

    async def _enqueue(
        self, conn: asyncpg.Connection, messages: Sequence[NewMessage],
        parts: Sequence[tuple[NewMessage, Sequence[NewRecipient]]], suppress: bool,
    ) -> list[list[EnqueuedRecipient]]:
        mids: list[uuid.UUID] = []
        addresses: list[str] = []
        domains: list[str] = []
        kinds: list[str] = []
        vars_: list[Any] = []
        states: list[str] = []
        streams: list[str] = []
        prios: list[int] = []
        nexts: list[datetime | None] = []
        reasons: list[str | None] = []
        contact_ids: list[str | None] = []
        externals: list[dict[str, Any] | None] = []
        purposes: list[str | None] = []
        rules: list[str | None] = []
        policy = self.consent if suppress else None
        for m, recipients in parts:
            purpose, rule = policy.rule(m.stream) if policy is not None else (None, None)
            for r in recipients:
                mids.append(m.id)
                addresses.append(r.address)
                domains.append(r.domain)
                kinds.append(r.kind)
                vars_.append(r.vars)
                streams.append(m.stream)
                prios.append(m.priority)
                nexts.append(m.send_at)
                contact_ids.append(r.contact_id)
                externals.append(r.external)
                purposes.append(purpose)
                rules.append(rule)
                barred = policy.role_barred(r.address, m.stream) if policy is not None else None
                if barred is not None and r.state == "queued":
                    states.append("suppressed")
                    reasons.append(barred)
                else:
                    states.append(r.state)
                    reasons.append(r.reason)
        rows = await conn.fetch(
            *q(
                "enqueue",
                ids=[m.id for m in messages],
                sources=[m.source for m in messages],
                mail_froms=[m.mail_from for m in messages],
                raws=[m.raw for m in messages],
                contents=[m.content for m in messages],
                streams=[m.stream for m in messages],
                metadatas=[m.metadata for m in messages],
                api_key_ids=[m.api_key_id for m in messages],
                send_ats=[m.send_at for m in messages],
                message_ids=mids,
                addresses=addresses,
                lowered=[a.lower() for a in addresses],
                domains=domains,
                kinds=kinds,
                vars=vars_,
                states=states,
                reasons=reasons,
                contact_ids=contact_ids,
                externals=externals,
                purposes=purposes,
                rules=rules,
                require_reconfirm=policy.require_reconfirm if policy is not None else False,
                rcpt_streams=streams,
                priorities=prios,
                next_attempt_ats=nexts,
                max_age=self.max_age,
                notify="queued" in states,
                check_suppressions=suppress,
            )
        )
        by_key = {(r["message_id"], r["address"]): r for r in rows}
        del rows
        out: list[list[EnqueuedRecipient]] = []
        events: list[Event] = []
        for m, recipients in parts:
            lst = []
            accepted = {"stream": m.stream, "source": m.source}
            for rcpt in recipients:
                row = by_key[(m.id, rcpt.address)]
                lst.append(EnqueuedRecipient(row["id"], row["address"], row["state"]))
                if row["state"] == "queued":
                    events.append(Event("accepted", row["id"], m.id, accepted))
                else:
                    events.append(
                        Event(row["state"], row["id"], m.id,
                              {**accepted, "reason": row["reason"] or rcpt.reason or SUPPRESSED_AT_SUBMIT, "at": "submit"})
                    )
            out.append(lst)
        await record_events(conn, events)
        return out

    async def claim(
        self, owner: str, limit: int, lease_seconds: float, skip_domains: Sequence[str] = ()
    ) -> list[asyncpg.Record]:
        """Lease up to ``limit`` ready recipients, highest priority and oldest first.

        Consent is judged again as rows are taken: a row whose stream's rule its address now
        fails (a revocation after accept) becomes ``suppressed`` with its event instead.

        ``skip_domains`` are destinations the caller cannot take more of right now
        (suspended or saturated): their rows stay for other workers or later.
        """
        streams, purposes, kinds = self.consent.sql_rules() if self.consent is not None else ([], [], [])
        args = q(
            "claim", owner=owner, limit=limit, lease_seconds=lease_seconds, skip_domains=list(skip_domains),
            rule_streams=streams, rule_purposes=purposes, rule_kinds=kinds,
            require_reconfirm=self.consent.require_reconfirm if self.consent is not None else False,
        )
        async with acquire(self.pool) as conn:
            if not streams:
                return await conn.fetch(*args)
            async with conn.transaction():  # rows stopped by consent get their event in the same transaction
                rows = await conn.fetch(*args)
                stopped = [r for r in rows if r["blocked"] is not None]
                if not stopped:
                    return rows
                await record_events(conn, [
                    Event("suppressed", r["id"], r["message_id"], {"reason": r["blocked"], "stream": r["stream"], "at": "claim"})
                    for r in stopped
                ])
        return [r for r in rows if r["blocked"] is None]

    @contextlib.asynccontextmanager
    async def _tx(self, conn: asyncpg.Connection | None) -> AsyncIterator[asyncpg.Connection]:
        """The caller's connection (already inside its transaction), or a pooled one in a new transaction.

        A state change and its events must commit together; a savepoint inside the caller's
        transaction would only add round trips to the hot path.
        """
        if conn is not None:
            yield conn
        else:
            async with acquire(self.pool) as c, c.transaction():
                yield c

    async def ack(self, owner: str, outcomes: Sequence[Outcome], conn: asyncpg.Connection | None = None) -> int:
        """Record final outcomes and their events; returns how many rows this owner still held."""
        if not outcomes:
            return 0
        async with self._tx(conn) as conn:
            rows = await conn.fetch(
                *q(
                    "ack",
                    owner=owner,
                    ids=[o.id for o in outcomes],
                    states=[o.state for o in outcomes],
                    attempted=[int(o.attempted) for o in outcomes],
                    codes=[o.code for o in outcomes],
                    statuses=[o.status for o in outcomes],
                    replies=[o.reply for o in outcomes],
                )
            )
            by_id = {o.id: o for o in outcomes}
            events = []
            for r in rows:
                o = by_id[r["id"]]
                data = o.event if o.event is not None else _default_event(o.code, o.status, o.reply)
                events.append(Event(o.state, r["id"], r["message_id"], data))
            await record_events(conn, events)
        return len(rows)

    async def defer(self, owner: str, deferrals: Sequence[Deferral], conn: asyncpg.Connection | None = None) -> int:
        """Temporary failures back to the ready set; a ``deferred`` event (with the attempt number) per try."""
        if not deferrals:
            return 0
        async with self._tx(conn) as conn:
            rows = await conn.fetch(
                *q(
                    "defer",
                    owner=owner,
                    ids=[d.id for d in deferrals],
                    next_attempt_ats=[d.next_attempt_at for d in deferrals],
                    attempted=[int(d.attempted) for d in deferrals],
                    codes=[d.code for d in deferrals],
                    statuses=[d.status for d in deferrals],
                    replies=[d.reply for d in deferrals],
                )
            )
            by_id = {d.id: d for d in deferrals}
            events = []
            for r in rows:
                d = by_id[r["id"]]
                if d.attempted:
                    data = dict(d.event) if d.event is not None else _default_event(d.code, d.status, d.reply)
                    data["attempt"] = r["attempts"]
                    data["next_attempt_at"] = d.next_attempt_at.isoformat()
                    events.append(Event("deferred", r["id"], r["message_id"], data))
            await record_events(conn, events)
        return len(rows)

    async def release(self, owner: str, ids: Sequence[int]) -> int:
        """Hand leased rows back without counting an attempt (graceful shutdown)."""
        if not ids:
            return 0
        async with acquire(self.pool) as conn:
            rows = await conn.fetch(*q("release", owner=owner, ids=list(ids)))
        return len(rows)

    async def postpone(self, owner: str, ids: Sequence[int], next_attempt_at: datetime) -> int:
        """Hand throttled rows back untried, ready again at ``next_attempt_at`` (no attempt counted)."""
        if not ids:
            return 0
        async with acquire(self.pool) as conn:
            rows = await conn.fetch(*q("postpone", owner=owner, ids=list(ids), next_attempt_at=next_attempt_at))
        return len(rows)

    async def extend_leases(self, owner: str, ids: Collection[int], lease_seconds: float) -> None:
        """Renew the leases of ``ids`` still held by ``owner`` (its heartbeat): rows waiting in a busy
        worker stay its own.

        Only the ids the worker knows: a claim whose reply was lost leased rows to this owner
        that it will never send; renewing "everything the owner holds" would keep them forever.
        """
        if not ids:
            return
        async with acquire(self.pool) as conn:
            await conn.execute(*q("extend_leases", owner=owner, ids=list(ids), lease_seconds=lease_seconds))

    async def reclaim_expired_leases(self, limit: int = 1000) -> int:
        async with acquire(self.pool) as conn:
            rows = await conn.fetch(*q("reclaim_expired_leases", limit=limit))
        return len(rows)

    async def get_message(self, message_id: uuid.UUID) -> tuple[asyncpg.Record, list[asyncpg.Record]] | None:
        async with acquire(self.pool) as conn:
            msg = await conn.fetchrow(*q("get_message", id=message_id))
            if msg is None:
                return None
            rcpts = await conn.fetch(*q("get_message_recipients", id=message_id))
        return msg, rcpts

    async def messages_for_delivery(self, ids: Sequence[uuid.UUID]) -> list[asyncpg.Record]:
        async with acquire(self.pool) as conn:
            return await conn.fetch(*q("get_messages_for_delivery", ids=list(ids)))

    async def attempts(self, message_id: uuid.UUID) -> list[asyncpg.Record]:
        async with acquire(self.pool) as conn:
            return await conn.fetch(*q("get_attempts", id=message_id))

    async def get_raw(self, message_id: uuid.UUID) -> bytes | None:
        async with acquire(self.pool) as conn:
            raw: bytes | None = await conn.fetchval(*q("get_message_raw", id=message_id))
        return raw

    async def manage(
        self, action: str, *, domain: str | None = None, message_id: uuid.UUID | None = None,
        states: Sequence[str] = ("queued", "deferred", "held"),
    ) -> int:
        """Ops actions on non-final rows: ``retry``, ``hold``, ``release``, ``purge``; returns rows changed."""
        if action not in _MANAGE_EVENTS:
            raise ValueError(f"unknown queue action {action!r}")
        params: dict[str, Any] = {"domain": domain, "message_id": message_id}
        if action == "purge":
            params["states"] = list(states)
        event_type, data = _MANAGE_EVENTS[action]
        async with acquire(self.pool) as conn, conn.transaction():
            rows = await conn.fetch(*q(f"queue_{action}", **params))
            if event_type is not None:
                await record_events(
                    conn, [Event(event_type, r["id"], r["message_id"], {**data, "stream": r["stream"]}) for r in rows]
                )
        return len(rows)

    async def stats(
        self, exact: bool = False, *, exact_rows: int = EXACT_STATS_ROWS, sample_rows: int = STATS_SAMPLE_ROWS
    ) -> list[asyncpg.Record]:
        """Recipient counts by (state, stream, domain) and the earliest next attempt of waiting groups.

        An exact count reads every row of the table: seconds at a million rows, for an operator's
        glance or each dashboard refresh. Above ``exact_rows`` rows (the planner's count, kept by
        autovacuum) the counts are scaled up from a sample of about ``sample_rows`` rows (whole
        pages) and each row says ``estimate``: small groups may be missing. ``exact=True`` always scans.
        """
        async with acquire(self.pool) as conn:
            rows = int(await conn.fetchval(*q("queue_stats_rows")) or -1)
            if exact or rows < exact_rows:
                return await conn.fetch(*q("queue_stats"))
            return await conn.fetch(*q("queue_stats_sampled", percent=min(100.0, 100.0 * sample_rows / rows)))

    async def list(
        self, *, state: str | None = None, domain: str | None = None, message_id: uuid.UUID | None = None, limit: int = 100
    ) -> list[asyncpg.Record]:
        async with acquire(self.pool) as conn:
            return await conn.fetch(*q("queue_list", state=state, domain=domain, message_id=message_id, limit=limit))


@dataclass(frozen=True, slots=True)
class Erased:
    recipient_ids: list[int]
    message_ids: list[uuid.UUID]
    blanked: int
    """Messages whose body, sender and metadata were wiped (nobody else waits for them)."""


ERASED_ADDRESS = "erased@erased.invalid"
"""What an erased address becomes inside a message another recipient still needs (``.invalid``: RFC 2606)."""


async def erase_address(conn: asyncpg.Connection, address: str) -> Erased:
    """Remove ``address`` (lower-cased) from the queue: its rows and attempts, and bodies no one else needs.

    A body another recipient still needs is kept, but every mention of the address in it (a to or
    cc entry, the text, metadata, raw headers; any case) becomes :data:`ERASED_ADDRESS`.
    """
    row = await conn.fetchrow(*q("outbox_erase_address", address=address))
    assert row is not None  # an aggregate always returns its row
    erased = Erased(list(row["recipient_ids"] or []), list(row["message_ids"] or []), row["blanked"])
    pattern = re.compile(re.escape(address.encode()), re.IGNORECASE)
    placeholder = ERASED_ADDRESS.encode()

    def scrub(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bytes):
            return pattern.sub(placeholder, value)
        if isinstance(value, str):
            return pattern.sub(placeholder, value.encode()).decode()
        return orjson.loads(pattern.sub(placeholder, orjson.dumps(value)))

    for m in await conn.fetch(*q("outbox_kept_messages", ids=erased.message_ids)):
        fields = {k: scrub(m[k]) for k in ("mail_from", "raw", "content", "metadata")}
        if any(fields[k] != m[k] for k in fields):
            await conn.execute(*q("outbox_scrub_message", id=m["id"], **fields))
    return erased


# --------------------------------------------------------------------------- retention (engine.retention asks)


@dataclass(frozen=True, slots=True)
class Pruned:
    recipients: int
    """Recipient rows deleted (their attempts went with them)."""
    messages: int
    """Message rows deleted because none of their recipients was left."""


async def prune_bodies(conn: asyncpg.Connection, before: datetime, limit: int) -> int:
    """Blank up to ``limit`` message bodies whose recipients have all been final since before ``before``.

    Why blank and not delete: the message row still carries the sender, stream and metadata that
    events, late bounces and ``GET /v1/messages`` need; the content is what disk space and privacy
    ask to drop first. Each recipient's template variables stay until its row goes (blanking them
    here would rewrite every recipient row, with all its indexes, to save a few bytes each).
    Returns how many were blanked.
    """
    return int(await conn.fetchval(*q("outbox_prune_bodies", before=before, limit=limit)))


async def prune_recipients(conn: asyncpg.Connection, before: datetime, limit: int) -> Pruned:
    """Delete up to ``limit`` recipient rows final since before ``before``, with their attempts,
    and the messages left without any recipient."""
    row = await conn.fetchrow(*q("outbox_prune_recipients", before=before, limit=limit))
    assert row is not None  # aggregates always return their row
    return Pruned(row["recipients"], row["messages"])


async def drop_attempt_days(conn: asyncpg.Connection, before: datetime) -> list[date]:
    """Drop the day partitions of ``attempts`` whose whole day lies before ``before``; the days dropped.

    Attempts go by the time they were made (the ``recipients`` window), a day at a time: the
    recipient rows themselves still go by the batches of :func:`prune_recipients` (their attempts
    with them, by cascade), counted from when they became final. An attempt is history once that
    window has passed, whatever became of its recipient since.
    """
    dropped = []
    for part in partitions.whole_days_before(await partitions.partitions(conn, "attempts"), before):
        if part.day is not None and await partitions.drop(conn, "attempts", part.day):
            dropped.append(part.day)
    return dropped


async def due_for_retention(
    conn: asyncpg.Connection, bodies_before: datetime | None, recipients_before: datetime | None
) -> dict[str, int | None]:
    """How many bodies, recipients and attempts the purge would take now (None: that kind is kept forever)."""
    out: dict[str, int | None] = {"message_bodies": None, "recipients": None, "attempts": None}
    if bodies_before is not None:
        out["message_bodies"] = int(await conn.fetchval(*q("outbox_due_bodies", before=bodies_before)))
    if recipients_before is not None:
        row = await conn.fetchrow(*q("outbox_due_recipients", before=recipients_before))
        assert row is not None
        out["recipients"], out["attempts"] = int(row["recipients"]), int(row["attempts"])
    return out
