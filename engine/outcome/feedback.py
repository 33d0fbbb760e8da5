"""Apply feedback to the database: suppressions and reputation counters, and inbound reports.

Two writers call this module inside transactions they already hold, so the
feedback loop adds statements to existing round trips instead of new ones:

* the delivery outcome writer (:mod:`engine.outcome.writer`), with the hard
  bounces and counters of a flush: :func:`apply_feedback`;
* the inbound bounce/FBL listener (:mod:`engine.outcome.inbound`), with the
  results of one report mapped to recipient rows: :func:`apply_report_results`.

Hard bounces and complaints are suppressed (``[feedback] suppress_scope``: the
stream, or every stream) through :mod:`engine.suppression`, which stops mail
already queued for the address in the same transaction. Row changes go through
the outbox (:func:`engine.outbox.mark_bounced`) and observations that change
no row (a complaint, a delay notice, a bounce for a row a worker holds) through
the event store: this module writes no table itself.

Event payloads name where the signal came from in ``origin`` (``smtp``,
``dsn``, ``fbl``); ``source`` is kept for the egress source name (the warm-up
health check reads ``complained`` events by ``data.source`` / ``data.sending_domain``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog

from engine.consent.models import ConsentIn
from engine.consent.policy import ConsentPolicy
from engine.consent.store import apply_changes
from engine.errors import ValidationFailed
from engine.events.store import Event, event_exists_for_recipient, record_events
from engine.feedback.classify import HARD_CATEGORIES
from engine.feedback.report import RecipientResult, Report
from engine.outbox import Bounce, mark_bounced
from engine.outcome.reputation import CounterRow, record_counters
from engine.suppression import GLOBAL, add_many, normalize_address

log = structlog.get_logger(__name__)

ProviderOf = Callable[[str], str]
"""recipient domain -> provider name (the shaping layer's match rules); default: the domain itself."""


SUPPRESS_CATEGORIES = HARD_CATEGORIES | {"mailbox_disabled"}
"""Permanent failures that suppress the address (issue 6: unknown user, bad domain, disabled mailbox).
Wider than the classifier's ``hard`` flag by ``mailbox_disabled``: a provider that says an account is
disabled does not reopen it for our mail; a full mailbox or a policy block says nothing final."""


def domain_of(address: str) -> str:
    """The lower-cased domain of an address ('' for the null sender)."""
    return address.rpartition("@")[2].rstrip(".").lower()


def scope_for(suppress_scope: str, stream: str) -> str:
    """The suppression scope of a hard bounce or complaint under ``[feedback] suppress_scope``."""
    return GLOBAL if suppress_scope == "global" else stream


def suppression_key(address: str) -> str | None:
    """The suppression key of an address, or None when it is not one we could ever mail."""
    try:
        return normalize_address(address)
    except ValidationFailed:
        return None


@dataclass
class FeedbackStats:
    events: int = 0
    suppressed: int = 0  # new suppression rows
    pending_stopped: int = 0  # queued rows moved to 'suppressed'
    bounced_rows: int = 0  # rows moved to 'bounced' by asynchronous bounces
    counters: int = 0
    ignored: int = 0


async def apply_feedback(
    conn: asyncpg.Connection,
    suppress: Sequence[tuple[str, str, str, str]],
    counters: Sequence[CounterRow],
    stats: FeedbackStats | None = None,
) -> FeedbackStats:
    """Suppressions (address, scope, reason, source) and reputation counters, in the caller's transaction."""
    stats = stats or FeedbackStats()
    if suppress:
        new, moved = await add_many(conn, suppress)
        stats.suppressed += new
        stats.pending_stopped += moved
    if counters:
        stats.counters += await record_counters(conn, counters)
    return stats


@dataclass
class _ReportBatch:
    events: list[Event] = field(default_factory=list)
    bounced: list[tuple[Bounce, uuid.UUID]] = field(default_factory=list)  # with the row's message id
    suppress: list[tuple[str, str, str, str]] = field(default_factory=list)  # address, scope, reason, source
    counters: list[CounterRow] = field(default_factory=list)
    revoke: list[ConsentIn] = field(default_factory=list)  # complaints on streams with a consent rule
    policy: ConsentPolicy | None = None

    async def write(self, conn: asyncpg.Connection, stats: FeedbackStats) -> FeedbackStats:
        if self.bounced:
            moved = await mark_bounced(conn, [b for b, _ in self.bounced])  # each with its event
            stats.bounced_rows += len(moved)
            stats.events += len(moved)
            # A bounce for a row that did not change (a worker holds it, or it was already final)
            # is still reported, as an observation.
            self.events += [Event("bounced", b.id, mid, b.event) for b, mid in self.bounced if b.id not in moved]
        await apply_feedback(conn, self.suppress, self.counters, stats)
        if self.revoke and self.policy is not None:
            applied = await apply_changes(conn, self.revoke, "arf", self.policy)
            stats.pending_stopped += applied.stopped
        stats.events += await record_events(conn, self.events)
        return stats


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
    consent: ConsentPolicy | None = None,
) -> FeedbackStats:
    """Apply the mapped results of one inbound report (kind ``dsn`` or ``arf``) in the caller's transaction.

    * hard bounce (or a disabled mailbox, :data:`SUPPRESS_CATEGORIES`): row 'bounced' (if delivered or
      still waiting), ``bounced`` event, suppression;
    * other permanent failure: row 'bounced', ``bounced`` event, no suppression;
    * temporary (a delay notice): ``bounced`` event with ``permanent: false``, nothing else;
    * complaint: ``complained`` event (once per recipient row); on a stream with a consent rule
      (``consent``), a revocation of that stream's purpose (source ``arf``), else a suppression
      (reason ``complaint``): the suppression list stays for bounces and manual blocks.
    """
    batch = _ReportBatch(policy=consent)
    stats = FeedbackStats()
    seen: set[tuple[int, str]] = set()
    for m in mapped:
        row, res = m.row, m.result
        rid, mid, stream = row["id"], row["message_id"], row["stream"]
        sending_domain = domain_of(row["mail_from"] or "")
        provider = (provider_of or (lambda d: d))(row["domain"])
        scope = scope_for(suppress_scope, stream)
        if kind == "arf":
            if (rid, "complained") in seen or await event_exists_for_recipient(conn, "complained", mid, rid):
                stats.ignored += 1
                continue
            seen.add((rid, "complained"))
            key = suppression_key(row["address"])
            complaint: dict[str, Any] = {
                "origin": "fbl",
                "verified": True,
                "feedback_type": res.feedback_type or "abuse",
                "format": report_format,
                "stream": stream,
                "sending_domain": sending_domain,
            }
            if key is not None and consent is not None and consent.enforced(stream):
                purpose = consent.purposes[stream]
                batch.revoke.append(
                    ConsentIn(address=key, purpose=purpose, status="revoked", source="arf", captured_at=datetime.now(UTC))
                )
                complaint["revoked"] = purpose
            else:
                complaint["suppressed"] = scope
                if key is not None:
                    batch.suppress.append((key, scope, "complaint", "fbl"))
            batch.events.append(Event("complained", rid, mid, complaint))
            batch.counters.append(CounterRow(provider, "complained", "complaint", "", sending_domain))
            continue
        if res.category == "delivered" or (rid, "bounced") in seen:
            stats.ignored += 1
            continue
        seen.add((rid, "bounced"))
        data: dict[str, Any] = {
            "origin": "dsn",
            "verified": True,
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
        if not res.permanent:
            batch.events.append(Event("bounced", rid, mid, data))  # a delay notice: nothing changes
            continue
        batch.counters.append(CounterRow(provider, "bounced", res.category, "", sending_domain))
        if res.hard or res.category in SUPPRESS_CATEGORIES:
            key = suppression_key(row["address"])
            if key is not None:
                batch.suppress.append((key, scope, res.category, "bounce"))
                data["suppressed"] = scope
        reply = (res.reply or f"{res.status or '5.0.0'} asynchronous bounce ({res.category})")[:1000]
        batch.bounced.append((Bounce(rid, res.status, reply, data), mid))
    return await batch.write(conn, stats)


UNVERIFIED_MAX_RESULTS = 20
"""At most this many events for one unverified report (a hostile report may list thousands)."""


async def record_unverified_report(conn: asyncpg.Connection, report: Report, *, peer: str | None = None) -> int:
    """Record a report that no signed token ties to a recipient row, in the caller's transaction.

    Observations only: ``bounced`` (a DSN) or ``complained`` (an ARF) events with ``verified: false``,
    the reported address and the Message-ID it claims, and no ``recipient_id`` / ``message_id``. No row
    changes, nothing is suppressed or counted, and ``complained`` dedup per row is not touched (a forged
    report must not stop a later genuine one). Returns how many events were written.
    """
    kind = "complained" if report.kind == "arf" else "bounced"
    events = []
    for res in report.recipients[:UNVERIFIED_MAX_RESULTS]:
        data: dict[str, Any] = {
            "origin": "fbl" if report.kind == "arf" else "dsn",
            "verified": False,
            "format": report.format,
            "reported_recipient": (res.recipient or res.original_recipient or "")[:320] or None,
            "claimed_message_id": (report.original_message_id or "")[:200] or None,
            "peer": peer,
        }
        if report.kind == "arf":
            data["feedback_type"] = res.feedback_type or "abuse"
        else:
            data.update(category=res.category, status=res.status, permanent=bool(res.permanent))
        events.append(Event(kind, None, None, data))
    return await record_events(conn, events)
