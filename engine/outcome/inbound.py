"""The inbound bounce / FBL listener: an aiosmtpd server on its own port.

Receivers send asynchronous bounces (DSNs to our VERP return paths) and
feedback-loop complaints (ARF, to the address registered with the provider)
here. It is never a relay and never a mailbox: ``RCPT`` is accepted only for
``[feedback] bounce_domain`` and ``[feedback.inbound] accept_domains``
(anything else gets ``550 5.7.1``), the message is size-limited, nothing raw
is stored, and a message only changes state through the results it parses to.

``handle_DATA``:

1. parse with :func:`engine.feedback.parse_report` in a worker process
   (:class:`~engine.outcome.report_parser.ReportParser`, bounded by ``parse_concurrency``:
   a message slow to parse must take neither the loop's time nor its GIL); reading the
   message and its limits are :mod:`engine.outcome.inbound_smtp`'s;
2. find the recipient row each result is about: the VERP token of the
   envelope recipient, else a VERP address inside the report (its To, the
   original message's Return-Path, an ARF's Original-Mail-From...), else the
   signed token in the Message-ID of a personalized copy
   (``<{message uuid}.{token}@...>``, which names exactly that one row). One
   VERP token names one row; its siblings in the same SMTP transaction are
   found by address within that message;
3. apply everything in one transaction (:func:`engine.outcome.feedback.apply_report_results`)
   and answer ``250`` after the commit.

Only signed evidence changes state. A Message-ID without a token
(``<{message uuid}@...>``, or a relayed message's own) is visible to every
recipient of the message, so a report that names its recipients only through
it and the reported addresses could be written by anyone about anyone: it is
recorded as ``bounced`` / ``complained`` events with ``verified: false`` and no
recipient row (:func:`engine.outcome.feedback.record_unverified_report`), and
changes no row, adds no suppression and counts nothing.

A report carrying a forged VERP token changes nothing (logged). Reports that
map to nothing, auto-replies and unparseable mail are answered ``250`` (so the
sender does not retry or bounce the bounce) and logged; only a database outage
gets ``451`` so the sender tries again later.
"""

from __future__ import annotations

import asyncio
import collections
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session

from engine.config import Settings
from engine.consent.policy import ConsentPolicy
from engine.db.pool import acquire
from engine.db.queries import q
from engine.errors import DatabaseUnavailable
from engine.feedback.classify import Classifier, load_rules
from engine.feedback.report import Report
from engine.feedback.verp import Verp
from engine.outcome.feedback import MappedResult, ProviderOf, apply_report_results, record_unverified_report
from engine.outcome.inbound_smtp import InboundSMTP
from engine.outcome.report_parser import ReportParser
from engine.submit.server import NULL_SENDER, ListenerHandler, SmtpListenerHandle, format_peer, format_reply, start_listener

log = structlog.get_logger(__name__)

_SCAN_CHARS = 256 * 1024  # how much of a report is searched for a VERP address when nothing else names one
_MSGID_RE = re.compile(
    r"<?\s*([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.([a-z2-7]{16,40})@[^>\s]+", re.I
)


@dataclass
class InboundHandler(ListenerHandler):
    """Policy (``handle_RCPT``) and processing (``handle_DATA``) of the bounce/FBL listener.

    ``handle_EHLO`` and the shutdown state come from :class:`ListenerHandler`.
    """

    settings: Settings
    pool: asyncpg.Pool
    verp: Verp | None
    classifier: Classifier
    provider_of: ProviderOf | None = None
    stats: collections.Counter[str] = field(default_factory=collections.Counter)
    """Counts by outcome (applied, auto_reply, unmapped, forged, not_a_report, ...), for tests and metrics."""

    def __post_init__(self) -> None:
        fb = self.settings.feedback
        self.domains = frozenset(([fb.bounce_domain] if fb.bounce_domain else []) + list(fb.inbound.accept_domains))
        self.parser = ReportParser(fb.inbound.parse_concurrency, fb.classifier_rules)
        self.max_lines = fb.inbound.max_lines  # read by InboundSMTP

    # -- aiosmtpd hooks ------------------------------------------------------------------

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        """Any sender: bounces come from the null sender, FBL reports from the provider's address."""
        if self.closing:
            return "421 4.3.2 Service shutting down, try again later"
        envelope.mail_from = address or NULL_SENDER
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        """Only our bounce and report domains: this server is never a relay and never a mailbox."""
        domain = address.rpartition("@")[2].strip().rstrip(".").lower() if "@" in address else ""
        if domain not in self.domains:
            self.stats["rcpt_refused"] += 1
            log.info("inbound_rcpt_refused", rcpt=address[:200], peer=format_peer(session))
            return "550 5.7.1 Relaying denied: this server only takes bounces and feedback reports"
        limit = self.settings.feedback.inbound.max_recipients
        if len(envelope.rcpt_tos) >= limit:
            return f"452 4.5.3 Too many recipients (at most {limit})"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.closing:
            return "421 4.3.2 Service shutting down, try again later"
        data = envelope.original_content
        if not isinstance(data, bytes):
            data = bytes(data or b"")
        report = await self.parser.parse(data)
        # Own task: a client hanging up must not cancel a transaction half-way; shutdown waits for it.
        work = self.process(list(envelope.rcpt_tos), report, data, format_peer(session))
        try:
            outcome = await self.shielded(work)
        except DatabaseUnavailable as exc:
            log.warning("inbound_database_unavailable", error=str(exc))
            return "451 4.3.0 Database unavailable, report not processed; try again later"
        except Exception:  # a bug must not bounce the bounce: logged, answered, counted
            log.exception("inbound_report_failed", peer=format_peer(session))
            self.stats["failed"] += 1
            return "250 2.0.0 Report received (not processed)"
        return format_reply("250 2.0.0", f"Report received: {outcome}")

    def on_closed(self) -> None:
        self.parser.close()

    async def handle_exception(self, error: Exception) -> str:
        log.error("inbound_session_error", error=f"{type(error).__name__}: {error}")
        return "451 4.3.0 Local error in processing; try again later"

    # -- processing ----------------------------------------------------------------------

    async def process(self, rcpts: Sequence[str], report: Report, raw: bytes, peer: str | None = None) -> str:
        """Map a parsed report to recipient rows and apply it in one transaction; returns a word for the reply."""
        info = dict(kind=report.kind, format=report.format, peer=peer, results=len(report.recipients))
        if report.kind == "auto_reply":
            self.stats["auto_reply"] += 1
            log.info("inbound_auto_reply_ignored", **info)
            return "auto-reply ignored"
        if report.kind not in ("dsn", "arf") or not report.recipients:
            self.stats["not_a_report"] += 1
            log.info("inbound_not_a_report", error=report.error, **info)
            return "not a report"
        ids, forged = self._verp_ids(rcpts, report, raw)
        if forged:
            self.stats["forged"] += 1
            log.warning("inbound_verp_forged", forged=forged, **info)
            return "ignored"
        signed = None if ids else self._signed_message_id(report)
        if not ids and signed is None:
            return await self._record_unverified(report, peer, info)
        fb = self.settings.feedback
        async with acquire(self.pool) as conn, conn.transaction():
            mapped, unmapped = await self._map(conn, report, ids, signed)
            if not mapped:
                self.stats["unmapped"] += 1
                log.info("inbound_report_unmapped", verp_ids=ids, message_id=report.original_message_id, **info)
                return "no matching message"
            stats = await apply_report_results(
                conn,
                report.kind,
                mapped,
                report_format=report.format,
                suppress_scope=fb.suppress_scope,
                provider_of=self.provider_of,
                consent=ConsentPolicy.from_config(self.settings.consent),
            )
        self.stats["applied"] += 1
        log.info(
            "inbound_report_applied",
            recipients=[m.row["id"] for m in mapped],
            unmapped=unmapped,
            events=stats.events,
            suppressed=stats.suppressed,
            pending_stopped=stats.pending_stopped,
            bounced_rows=stats.bounced_rows,
            **info,
        )
        return "applied"

    def _verp_ids(self, rcpts: Sequence[str], report: Report, raw: bytes) -> tuple[list[int], int]:
        """Genuine VERP recipient ids (envelope first, then the report's text) and how many were forged."""
        if self.verp is None:
            return [], 0
        ids: list[int] = []
        forged = 0
        for rcpt in rcpts:
            if self.verp.is_ours(rcpt):
                rid = self.verp.parse(rcpt)
                if rid is None:
                    forged += 1
                elif rid not in ids:
                    ids.append(rid)
        if ids or forged:
            return ids, forged
        ids, forged = self.verp.find([report.report_to, *report.original_headers.values()])
        if ids or forged:
            return ids, forged
        return self.verp.find([raw[:_SCAN_CHARS].decode("latin-1")])

    async def _record_unverified(self, report: Report, peer: str | None, info: Mapping[str, Any]) -> str:
        """No signed token names a row: an observation only, never applied (anyone can write such a report)."""
        async with acquire(self.pool) as conn, conn.transaction():
            n = await record_unverified_report(conn, report, peer=peer)
        self.stats["unverified"] += 1
        log.info("inbound_report_unverified", message_id=(report.original_message_id or "")[:200], events=n, **info)
        return "recorded unverified (no signed token), nothing changed"

    def _signed_message_id(self, report: Report) -> tuple[uuid.UUID, int] | None:
        """(message uuid, recipient id) from a genuinely signed Message-ID of ours, else None."""
        if self.verp is None:
            return None
        parsed = _parse_message_id(report)
        if parsed is None:
            return None
        rid = self.verp.parse_token(parsed[1])
        return None if rid is None else (parsed[0], rid)

    async def _map(
        self, conn: asyncpg.Connection, report: Report, ids: list[int], signed: tuple[uuid.UUID, int] | None = None
    ) -> tuple[list[MappedResult], int]:
        anchors = []
        for rid in ids[:20]:
            row = await conn.fetchrow(*q("feedback_recipient", recipient_id=rid))
            if row is None:
                log.info("inbound_verp_recipient_gone", recipient_id=rid)
            else:
                anchors.append(row)
        by_msgid = None
        if not ids and signed is not None:
            cand = await conn.fetchrow(*q("feedback_recipient", recipient_id=signed[1]))
            if cand is not None and cand["message_id"] == signed[0]:
                by_msgid = cand  # the token names this row, and the row belongs to that message
        mapped: list[MappedResult] = []
        unmapped = 0
        single = len(report.recipients) == 1
        for res in report.recipients[:1000]:
            addr = (res.recipient or res.original_recipient or "").strip().lower()
            row = None
            if anchors:
                row = next((a for a in anchors if addr and a["address"].lower() == addr), None)
                if row is None and addr:
                    for a in anchors:
                        row = await conn.fetchrow(*q("feedback_recipient_in_message", message_id=a["message_id"], address=addr))
                        if row is not None:
                            break
                if row is None and len(anchors) == 1 and (single or not addr):
                    row = anchors[0]  # the token names the row; the report shows a rewritten address
            elif by_msgid is not None and (single or not addr or by_msgid["address"].lower() == addr):
                row = by_msgid  # a personalized copy went to this row alone: no siblings by address
            if row is None:
                unmapped += 1
            else:
                mapped.append(MappedResult(row, res))
        return mapped, unmapped


def _parse_message_id(report: Report) -> tuple[uuid.UUID, str] | None:
    """A Message-ID of ours with a token in the report: (message uuid, token still to verify)."""
    candidates = [report.original_message_id]
    candidates += [v for k, v in report.original_headers.items() if k.lower() == "message-id"]
    for text in candidates:
        m = _MSGID_RE.search(text or "")
        if m:
            try:
                return uuid.UUID(m.group(1)), m.group(2)
            except ValueError:
                continue
    return None


# -- listener --------------------------------------------------------------------------


async def start_inbound(
    settings: Settings, pool: asyncpg.Pool, *, provider_of: ProviderOf | None = None
) -> SmtpListenerHandle:
    """Start the bounce/FBL listener on the running loop (``[feedback.inbound] listen``).

    Same lifecycle as the relay's listeners: ``close()`` stops accepting, lets in-flight
    reports commit (bounded), then drops open connections.
    """
    cfg = settings.feedback.inbound
    classifier = await asyncio.to_thread(load_rules, settings.feedback.classifier_rules)
    handler = InboundHandler(settings, pool, Verp.from_settings(settings), classifier, provider_of)
    listener = await start_listener(
        "inbound",
        handler,
        cfg.listen,
        label="feedback inbound listener",
        hostname=settings.server.hostname,
        ident="ESMTP feedback",
        data_size_limit=cfg.max_message_size,
        timeout=cfg.data_timeout,
        shutdown_timeout=settings.server.shutdown_timeout,
        auth_require_tls=True,  # no TLS here: AUTH is never offered
        max_sessions=cfg.max_sessions,
        protocol=InboundSMTP,
    )
    log.info("inbound_listener_started", address="%s:%d" % listener.address, domains=sorted(handler.domains))
    return listener
