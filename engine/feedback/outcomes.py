"""Apply feedback to the database: events, suppression and reputation counters, in batches.

Two writers call this module inside transactions they already hold, so the
feedback loop adds statements to existing round trips instead of new ones:

* the delivery outcome writer (``engine.deliver.outcomes``), with the final
  SMTP results of a flush: :func:`apply_delivery_feedback`;
* the inbound bounce/FBL listener (``engine.feedback.inbound``), with the
  results of one report mapped to recipient rows: :func:`apply_report_results`.

Both record events (``delivered``/``deferred``/``bounced``/``expired``/
``complained``), suppress hard bounces and complaints (``[feedback]
suppress_scope``: the stream, or every stream) and stop mail already queued for
a newly suppressed address in the same transaction, and add reputation counters.

Event payloads name where the signal came from in ``origin`` (``smtp``,
``dsn``, ``fbl``); ``source`` is kept for the egress source name (the warm-up
health check reads ``complained`` events by ``data.source`` / ``data.sending_domain``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog

from engine.db.queries import q
from engine.errors import ValidationFailed
from engine.events.store import payload
from engine.feedback.classify import HARD_CATEGORIES, Classifier, default_classifier
from engine.feedback.report import RecipientResult
from engine.feedback.reputation import CounterRow, record_counters
from engine.suppression import GLOBAL, normalize_address, suppress_pending_many

log = structlog.get_logger(__name__)

ProviderOf = Callable[[str], str]
"""recipient domain -> provider name (the shaping layer's match rules); default: the domain itself."""


SUPPRESS_CATEGORIES = HARD_CATEGORIES | {"mailbox_disabled"}
"""Permanent failures that suppress the address (issue 6: unknown user, bad domain, disabled mailbox).
Wider than the classifier's ``hard`` flag by ``mailbox_disabled``: a provider that says an account is
disabled does not reopen it for our mail; a full mailbox or a policy block says nothing final."""


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].rstrip(".").lower()


def scope_for(suppress_scope: str, stream: str) -> str:
    """The suppression scope of a hard bounce or complaint under ``[feedback] suppress_scope``."""
    return GLOBAL if suppress_scope == "global" else stream


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """A final result of one delivery attempt, as the outcome writer decided it."""

    recipient_id: int
    address: str
    stream: str
    outcome: str  # delivered | deferred | bounced | expired
    reply: str = ""
    code: int | None = None
    status: str | None = None
    message_id: uuid.UUID | None = None
    category: str | None = None  # None: classified here from code/status/reply
    permanent: bool | None = None
    provider: str = ""  # shaping provider name; '' = the recipient's domain
    source: str = ""  # egress source name
    sending_domain: str = ""  # '' = the domain of mail_from
    mail_from: str = ""
    mx: str | None = None
    counted: bool = True  # False: not really tried (destination suspended): no counters, no deferred event


@dataclass
class FeedbackStats:
    events: int = 0
    suppressed: int = 0  # new suppression rows
    pending_stopped: int = 0  # queued rows moved to 'suppressed'
    bounced_rows: int = 0  # rows moved to 'bounced' by asynchronous bounces
    counters: int = 0
    ignored: int = 0


@dataclass
class _Batch:
    events: list[tuple[str, int | None, uuid.UUID | None, dict[str, Any]]] = field(default_factory=list)
    suppress: list[tuple[str, str, str, str]] = field(default_factory=list)  # address, scope, reason, source
    bounced: list[tuple[int, str | None, str | None]] = field(default_factory=list)
    counters: list[CounterRow] = field(default_factory=list)

    async def write(self, conn: asyncpg.Connection, stats: FeedbackStats) -> FeedbackStats:
        if self.bounced:
            ids, statuses, replies = (list(c) for c in zip(*self.bounced))
            rows = await conn.fetch(*q("feedback_mark_bounced", ids=ids, statuses=statuses, replies=replies))
            stats.bounced_rows += len(rows)
        if self.suppress:
            cols = list(zip(*self.suppress))
            new = await conn.fetch(
                *q("suppressions_add_many", addresses=list(cols[0]), scopes=list(cols[1]), reasons=list(cols[2]), sources=list(cols[3]))
            )
            stats.suppressed += len(new)
            moved = await suppress_pending_many(conn, [(a, s, r) for a, s, r, _ in self.suppress])
            stats.pending_stopped += len(moved)
        if self.events:
            cols = list(zip(*self.events))
            await conn.execute(
                *q(
                    "events_insert",
                    types=list(cols[0]),
                    recipient_ids=list(cols[1]),
                    message_ids=list(cols[2]),
                    datas=[payload(d) for d in cols[3]],
                    created_ats=[None] * len(self.events),
                )
            )
            stats.events += len(self.events)
        if self.counters:
            stats.counters += await record_counters(conn, self.counters)
        return stats


def _suppression_key(address: str) -> str | None:
    try:
        return normalize_address(address)
    except ValidationFailed:
        return None


async def apply_delivery_feedback(
    conn: asyncpg.Connection,
    results: Sequence[DeliveryResult],
    *,
    suppress_scope: str = "global",
    classifier: Classifier | None = None,
) -> FeedbackStats:
    """Events, hard-bounce suppression and reputation counters for a flush of SMTP results.

    Call inside the outcome writer's flush transaction (after the ack/defer statements):
    a few statements per batch, none per message.
    """
    clf = classifier or default_classifier()
    batch = _Batch()
    stats = FeedbackStats()
    for r in results:
        category, permanent = r.category, r.permanent
        if r.outcome != "delivered" and (category is None or permanent is None):
            c = clf.classify(r.code, r.status, r.reply)
            category = category if category is not None else c.category
            permanent = permanent if permanent is not None else c.permanent
        category = category or ("delivered" if r.outcome == "delivered" else "transient_other")
        sending_domain = (r.sending_domain or _domain_of(r.mail_from)).lower()
        provider = r.provider or _domain_of(r.address)
        base: dict[str, Any] = {"origin": "smtp", "stream": r.stream, "code": r.code, "status": r.status, "reply": r.reply[:1000]}
        if r.mx:
            base["mx"] = r.mx
        if r.source:
            base["source"] = r.source
        if sending_domain:
            base["sending_domain"] = sending_domain
        if r.outcome == "delivered":
            batch.events.append(("delivered", r.recipient_id, r.message_id, base))
        elif r.outcome == "bounced":
            hard = bool(permanent) and category in HARD_CATEGORIES
            data = {**base, "category": category, "permanent": True, "hard": hard}
            if permanent and category in SUPPRESS_CATEGORIES:
                key = _suppression_key(r.address)
                if key is not None:
                    scope = scope_for(suppress_scope, r.stream)
                    batch.suppress.append((key, scope, category, "bounce"))
                    data["suppressed"] = scope
            batch.events.append(("bounced", r.recipient_id, r.message_id, data))
        elif r.outcome == "expired":
            batch.events.append(("expired", r.recipient_id, r.message_id, {**base, "category": category}))
        elif r.outcome == "deferred":
            if r.counted:
                batch.events.append(("deferred", r.recipient_id, r.message_id, {**base, "category": category}))
        else:
            stats.ignored += 1
            continue
        if r.counted:
            outcome = "deferred" if r.outcome == "expired" else r.outcome
            batch.counters.append(
                CounterRow(provider, outcome, "" if outcome == "delivered" else category, r.source, sending_domain)
            )
    return await batch.write(conn, stats)


@dataclass(frozen=True, slots=True)
class MappedResult:
    """One report result and the recipient row it is about (a ``feedback_recipient`` row)."""

    row: Any
    result: RecipientResult


async def apply_report_results(
    conn: asyncpg.Connection,
    kind: str,
    mapped: Iterable[MappedResult],
    *,
    report_format: str | None = None,
    suppress_scope: str = "global",
    provider_of: ProviderOf | None = None,
) -> FeedbackStats:
    """Apply the mapped results of one inbound report (kind ``dsn`` or ``arf``) in the caller's transaction.

    * hard bounce (or a disabled mailbox, :data:`SUPPRESS_CATEGORIES`): row 'bounced' (if delivered or
      still waiting), ``bounced`` event, suppression;
    * other permanent failure: row 'bounced', ``bounced`` event, no suppression;
    * temporary (a delay notice): ``bounced`` event with ``permanent: false``, nothing else;
    * complaint: ``complained`` event (once per recipient row), suppression (reason ``complaint``).
    """
    batch = _Batch()
    stats = FeedbackStats()
    seen: set[tuple[int, str]] = set()
    for m in mapped:
        row, res = m.row, m.result
        rid, mid, stream = row["id"], row["message_id"], row["stream"]
        sending_domain = _domain_of(row["mail_from"] or "")
        provider = (provider_of or (lambda d: d))(row["domain"])
        scope = scope_for(suppress_scope, stream)
        if kind == "arf":
            if (rid, "complained") in seen or await conn.fetchval(
                *q("event_exists_for_recipient", type="complained", message_id=mid, recipient_id=rid)
            ):
                stats.ignored += 1
                continue
            seen.add((rid, "complained"))
            batch.events.append(
                (
                    "complained",
                    rid,
                    mid,
                    {
                        "origin": "fbl",
                        "feedback_type": res.feedback_type or "abuse",
                        "format": report_format,
                        "stream": stream,
                        "sending_domain": sending_domain,
                        "suppressed": scope,
                    },
                )
            )
            key = _suppression_key(row["address"])
            if key is not None:
                batch.suppress.append((key, scope, "complaint", "fbl"))
            batch.counters.append(CounterRow(provider, "complained", "complaint", "", sending_domain))
            continue
        if res.category == "delivered" or (rid, "bounced") in seen:
            stats.ignored += 1
            continue
        seen.add((rid, "bounced"))
        data: dict[str, Any] = {
            "origin": "dsn",
            "format": report_format,
            "category": res.category,
            "status": res.status,
            "reply": (res.reply or "")[:1000] or None,
            "permanent": bool(res.permanent),
            "hard": bool(res.hard),
            "stream": stream,
            "sending_domain": sending_domain,
        }
        if res.remote_mta:
            data["remote_mta"] = res.remote_mta[:200]
        if res.permanent:
            reply = (res.reply or f"{res.status or '5.0.0'} asynchronous bounce ({res.category})")[:1000]
            batch.bounced.append((rid, res.status, reply))
            batch.counters.append(CounterRow(provider, "bounced", res.category, "", sending_domain))
            if res.hard or res.category in SUPPRESS_CATEGORIES:
                key = _suppression_key(row["address"])
                if key is not None:
                    batch.suppress.append((key, scope, res.category, "bounce"))
                    data["suppressed"] = scope
        batch.events.append(("bounced", rid, mid, data))
    return await batch.write(conn, stats)
