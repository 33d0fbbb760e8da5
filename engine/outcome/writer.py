"""What a delivery attempt means for the outbox, written in batches.

The delivery loop never waits on the database per message: it hands results
to :class:`OutcomeWriter`, which turns them into final outcomes, deferrals
(exponential backoff with jitter, expiry after ``max_age``), attempt rows,
events, hard-bounce suppressions, reputation counters and automation signals,
and flushes them in one transaction of a few statements every
``flush_interval``. When Postgres is unreachable the writer keeps the results
and retries: an outcome is never dropped (at worst a lease runs out and the
recipient is tried again).

Final failures of mail that came in over the SMTP relay with a non-null
return path produce an RFC 3464 DSN back to the sender, enqueued through the
accept door (:func:`engine.accept.enqueue_notifications`) with the null sender
so a DSN can never cause another DSN.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import structlog

from engine import metrics
from engine.accept import enqueue_notifications
from engine.db.pool import acquire
from engine.errors import DatabaseUnavailable
from engine.feedback.classify import HARD_CATEGORIES, Classifier, default_classifier
from engine.outbox import Attempted, Deferral, NewMessage, Outbox, Outcome, record_attempts
from engine.outcome.feedback import SUPPRESS_CATEGORIES, apply_feedback, domain_of, scope_for, suppression_key
from engine.outcome.reputation import CounterRow
from engine.shaping.automation import Signal, evaluate_campaign_signals, evaluate_results, record_campaigns

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One recipient's result of one try, as the delivery loop saw it: the outcome stage's one input type."""

    recipient_id: int
    address: str
    attempts_before: int
    expires_at: datetime
    kind: str  # delivered | temporary | permanent
    code: int | None
    status: str | None
    reply: str
    mx: str | None
    duration_ms: int
    message_id: Any = None
    source: str = ""
    mail_from: str = ""
    stream: str = ""
    counted: bool = True  # False: not really tried (destination suspended); no attempt is counted
    provider: str = ""  # shaping provider of the destination ('' = the recipient's domain)
    egress: str = ""  # egress source name the attempt left from
    campaign: str = ""  # metadata.campaign ('' = none): automation holds campaigns by it


@dataclass(frozen=True, slots=True)
class Decided:
    """An attempt and what it means: its outcome, classification, and the retry time of a deferral."""

    attempt: Attempt
    outcome: str  # delivered | deferred | bounced | expired
    category: str
    permanent: bool
    next_attempt_at: datetime | None = None


DsnBuilder = Callable[[Sequence[Attempt]], list[NewMessage]]


RESERVED_SUFFIXES = ("test", "example", "invalid", "localhost", "example.com", "example.net", "example.org")
"""RFC 2606 / RFC 6761 names: they never exist, so a bounce there says nothing about the person."""


def reserved_domain(address: str) -> bool:
    """A reserved test domain has no DNS: the bounce says nothing about the person, and suppressing the
    address (for every stream) would silently swallow every later test and demo message to it, so a
    DNS failure there bounces but never suppresses (a real receiver's 550 for such a name still does)."""
    domain = address.rpartition("@")[2].rstrip(".").lower()
    return any(domain == s or domain.endswith("." + s) for s in RESERVED_SUFFIXES)


def _count(decided: Sequence[Decided]) -> None:
    """Delivery counters, after the outcomes committed (KumoMTA's delivered / transfail / fail)."""
    m = metrics.get()
    for d in decided:
        a = d.attempt
        if not a.counted:
            continue
        provider, egress = metrics.provider_label(a.provider), a.egress or "default"
        if d.outcome == "delivered":
            metrics.inc(m.delivered, provider=provider, egress=egress, stream=a.stream)
        elif d.outcome == "deferred":
            metrics.inc(m.transfail, provider=provider, egress=egress, stream=a.stream)
        else:
            metrics.inc(m.failed, provider=provider, egress=egress, stream=a.stream, category=d.category or "unknown")


@dataclass
class _Pending:
    decided: list[Decided] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.decided)


class Backoff:
    """Retry schedule with jitter: ``schedule[n]`` after the n-th failed attempt, the last step repeating."""

    def __init__(self, schedule: Sequence[float], jitter: float, rng: random.Random | None = None) -> None:
        self.schedule = list(schedule) or [60.0]
        self.jitter = jitter
        self._rng = rng or random.Random()

    def delay(self, attempts: int) -> float:
        base = self.schedule[min(max(attempts, 1), len(self.schedule)) - 1]
        return base * (1 + self._rng.uniform(-self.jitter, self.jitter))


class OutcomeWriter:
    def __init__(
        self,
        outbox: Outbox,
        owner: str,
        backoff: Backoff,
        *,
        flush_interval: float = 0.05,
        max_batch: int = 1000,
        dsn_builder: DsnBuilder | None = None,
        suppress_scope: str = "global",
        classifier: Classifier | None = None,
    ) -> None:
        self.outbox = outbox
        self.owner = owner
        self.backoff = backoff
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self.dsn_builder = dsn_builder
        self.suppress_scope = suppress_scope
        self.classifier = classifier or default_classifier()
        self._pending = _Pending()
        #: () -> (Shaping, on_decision) | None: set by the scheduler when shaping is on.
        self.automation: Callable[[], tuple[Any, Callable[[Any], None]] | None] | None = None
        #: Told the recipient ids whose outcome is committed (their rows are no longer leased to us).
        self.on_written: Callable[[list[int]], None] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.written = 0

    # -- producing ------------------------------------------------------------------------

    def add(self, results: Sequence[Attempt]) -> None:
        """Decide what each attempt means (classification happens here, once, for failures)."""
        now = datetime.now(UTC)
        clf = self.classifier
        out = self._pending.decided
        for a in results:
            if a.kind == "delivered":
                out.append(Decided(a, "delivered", "delivered", False))
                continue
            c = clf.classify(a.code, a.status, a.reply)
            if a.kind == "permanent":
                out.append(Decided(a, "bounced", c.category, True))
                continue
            tried = a.attempts_before + (1 if a.counted else 0)
            when = now + timedelta(seconds=self.backoff.delay(tried))
            if when >= a.expires_at:
                out.append(Decided(a, "expired", c.category, c.permanent))
            else:
                out.append(Decided(a, "deferred", c.category, c.permanent, when))
        if len(self._pending) >= self.max_batch:
            self._wake.set()

    # -- flushing -------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outcome-writer")

    async def _run(self) -> None:
        delay = 0.2
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.flush_interval)
            self._wake.clear()
            try:
                await self.flush()
                delay = 0.2
            except DatabaseUnavailable as exc:
                log.warning("outcome_flush_failed", error=str(exc), retry_in=delay, pending=len(self._pending))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            if self._closing and not len(self._pending):
                return

    async def flush(self) -> None:
        p = self._pending
        if not len(p):
            return
        self._pending = _Pending()
        try:
            async with acquire(self.outbox.pool) as conn, conn.transaction():
                await self._write(conn, p.decided)
        except BaseException:
            # Keep everything for the next try, ahead of what arrived meanwhile.
            self._pending = _Pending(p.decided + self._pending.decided)
            raise
        self.written += len(p)
        _count(p.decided)
        if self.on_written is not None:
            self.on_written([d.attempt.recipient_id for d in p.decided])

    async def _write(self, conn: asyncpg.Connection, decided: list[Decided]) -> None:
        """One transaction: outbox rows and their events, attempts, DSNs, suppressions, counters, automation."""
        outcomes: list[Outcome] = []
        deferrals: list[Deferral] = []
        attempts: list[Attempted] = []
        dsn_failures: list[Attempt] = []
        suppress: list[tuple[str, str, str, str]] = []
        counters: list[CounterRow] = []
        for d in decided:
            a = d.attempt
            event = self._event(d)
            if d.outcome != "deferred":
                if d.outcome == "bounced" and d.category in SUPPRESS_CATEGORIES and not (
                    d.category == "bad_domain" and reserved_domain(a.address)
                ):
                    key = suppression_key(a.address)
                    if key is not None:
                        scope = scope_for(self.suppress_scope, a.stream)
                        suppress.append((key, scope, d.category, "bounce"))
                        event["suppressed"] = scope
                reply = a.reply
                status = a.status
                if d.outcome == "expired":
                    tried = a.attempts_before + (1 if a.counted else 0)
                    reply = f"expired after {tried} attempts; last reply: {a.reply}"
                    status = a.status or "4.4.7"
                outcomes.append(Outcome(a.recipient_id, d.outcome, a.code, status, reply, a.counted, event))
                if d.outcome != "delivered":
                    dsn_failures.append(a)
            else:
                assert d.next_attempt_at is not None
                deferrals.append(Deferral(a.recipient_id, d.next_attempt_at, a.code, a.status, a.reply, a.counted, event))
            if a.counted:
                attempts.append(Attempted(a.recipient_id, d.outcome, a.code, a.status, a.reply, a.mx, a.duration_ms))
                counted_outcome = "deferred" if d.outcome == "expired" else d.outcome
                counters.append(
                    CounterRow(
                        a.provider or domain_of(a.address), counted_outcome,
                        "" if counted_outcome == "delivered" else d.category, a.egress, event.get("sending_domain", ""),
                    )
                )
        await self.outbox.ack(self.owner, outcomes, conn=conn)
        await self.outbox.defer(self.owner, deferrals, conn=conn)
        await record_attempts(conn, attempts)
        if dsn_failures and self.dsn_builder is not None:
            await enqueue_notifications(conn, self.outbox, self.dsn_builder(dsn_failures))
        await apply_feedback(conn, suppress, counters)
        await self._automate(conn, decided)

    @staticmethod
    def _event(d: Decided) -> dict[str, Any]:
        """The event payload of one outcome: what a CRM or a warehouse needs to know about it."""
        a = d.attempt
        data: dict[str, Any] = {"origin": "smtp", "stream": a.stream, "code": a.code, "status": a.status,
                                "reply": a.reply[:1000]}
        if a.mx:
            data["mx"] = a.mx
        if a.egress:
            data["source"] = a.egress
        sending_domain = domain_of(a.mail_from)
        if sending_domain:
            data["sending_domain"] = sending_domain
        if a.provider:
            data["provider"] = a.provider
        if d.outcome != "delivered":
            data["category"] = d.category
        if d.outcome == "bounced":
            data["permanent"] = True
            data["hard"] = d.category in HARD_CATEGORIES
        return data

    async def _automate(self, conn: asyncpg.Connection, decided: list[Decided]) -> None:
        """Automation rules on this flush's replies; per-campaign counters for the bounce-rate hold."""
        hook = self.automation() if self.automation is not None else None
        if hook is None:
            return
        shaping, on_decision = hook
        signals: list[Signal] = []
        by_campaign: list[tuple[Signal, str]] = []
        finals: Counter[str] = Counter()
        hards: Counter[str] = Counter()
        for d in decided:
            a = d.attempt
            if not a.counted:
                continue
            campaign = a.campaign
            if d.outcome != "delivered":
                s = Signal(a.provider, a.egress, a.reply, d.category)
                signals.append(s)
                if campaign:
                    by_campaign.append((s, campaign))
            if campaign and d.outcome in ("delivered", "bounced"):
                finals[campaign] += 1
                if d.outcome == "bounced" and d.category in HARD_CATEGORIES:
                    hards[campaign] += 1
        await record_campaigns(conn, finals, hards)
        made = await evaluate_results(conn, shaping, signals) if signals else []
        if by_campaign:
            made += await evaluate_campaign_signals(conn, shaping, by_campaign)
        for decision in made:
            on_decision(decision)  # this worker obeys at once; others within [default.health] refresh

    async def close(self, timeout: float) -> None:
        """Flush what is left; keep trying until ``timeout`` (the database may be coming back)."""
        self._closing = True
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=timeout)
        except TimeoutError:
            log.error("outcomes_not_written", pending=len(self._pending))
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    def pending(self) -> int:
        return len(self._pending)


def monotonic_ms(start: float) -> int:
    return int((time.monotonic() - start) * 1000)
