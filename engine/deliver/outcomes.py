"""What a delivery attempt means for the outbox, written in batches.

The delivery loop never waits on the database per message: it hands results
to :class:`OutcomeWriter`, which turns them into final outcomes, deferrals
(exponential backoff with jitter, expiry after ``max_age``) and attempt rows,
and flushes them in a few statements every ``flush_interval``. When Postgres is
unreachable the writer keeps the results and retries: an outcome is never
dropped (at worst a lease runs out and the recipient is tried again).

Final failures of mail that came in over the SMTP relay with a non-null
return path produce an RFC 3464 DSN back to the sender, queued with the null
sender so a DSN can never cause another DSN.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import structlog

from engine.db.pool import acquire
from engine.db.queries import q
from engine.errors import DatabaseUnavailable
from engine.feedback.classify import HARD_CATEGORIES, Classifier, default_classifier
from engine.feedback.outcomes import DeliveryResult, apply_delivery_feedback
from engine.outbox import Deferral, NewMessage, Outbox, Outcome
from engine.shaping.automation import Signal, evaluate_campaign_signals, evaluate_results, record_campaigns

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One recipient's result of one try, as the delivery loop saw it."""

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


@dataclass
class _Pending:
    outcomes: list[Outcome] = field(default_factory=list)
    deferrals: list[Deferral] = field(default_factory=list)
    attempts: list[tuple[int, str, int | None, str | None, str, str | None, int]] = field(default_factory=list)
    dsn_failures: list[Attempt] = field(default_factory=list)
    feedback: list[DeliveryResult] = field(default_factory=list)
    campaigns: list[str] = field(default_factory=list)  # aligned with feedback

    def __len__(self) -> int:
        return len(self.outcomes) + len(self.deferrals)


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
        dsn_builder: Any = None,
        feedback: bool = True,
        suppress_scope: str = "global",
        classifier: Classifier | None = None,
    ) -> None:
        self.outbox = outbox
        self.owner = owner
        self.backoff = backoff
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self.dsn_builder = dsn_builder
        self.feedback = feedback
        self.suppress_scope = suppress_scope
        self.classifier = classifier
        self._pending = _Pending()
        #: () -> (Shaping, on_decision) | None: set by the scheduler when shaping is on.
        self.automation: Callable[[], tuple[Any, Callable[[Any], None]] | None] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.written = 0

    # -- producing ------------------------------------------------------------------------

    def add(self, results: Sequence[Attempt]) -> None:
        now = datetime.now(UTC)
        p = self._pending
        for a in results:
            tried = a.attempts_before + (1 if a.counted else 0)
            if a.kind == "delivered":
                p.outcomes.append(Outcome(a.recipient_id, "delivered", a.code, a.status, a.reply, a.counted))
                outcome = "delivered"
            elif a.kind == "permanent":
                p.outcomes.append(Outcome(a.recipient_id, "bounced", a.code, a.status, a.reply, a.counted))
                outcome = "bounced"
                p.dsn_failures.append(a)
            else:
                when = now + timedelta(seconds=self.backoff.delay(tried))
                if when >= a.expires_at:
                    reply = f"expired after {tried} attempts; last reply: {a.reply}"
                    p.outcomes.append(Outcome(a.recipient_id, "expired", a.code, a.status or "4.4.7", reply, a.counted))
                    outcome = "expired"
                    p.dsn_failures.append(a)
                else:
                    p.deferrals.append(Deferral(a.recipient_id, when, a.code, a.status, a.reply, a.counted))
                    outcome = "deferred"
            if a.counted:
                p.attempts.append((a.recipient_id, outcome, a.code, a.status, a.reply, a.mx, a.duration_ms))
            if self.feedback:
                p.feedback.append(
                    DeliveryResult(
                        a.recipient_id, a.address, a.stream, outcome, a.reply, a.code, a.status,
                        message_id=a.message_id, permanent=(a.kind == "permanent"), provider=a.provider,
                        source=a.egress, mail_from=a.mail_from, mx=a.mx, counted=a.counted,
                    )
                )
                p.campaigns.append(a.campaign)
        if len(p) >= self.max_batch:
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
            if self._closing and not len(self._pending) and not self._pending.attempts:
                return

    async def flush(self) -> None:
        p = self._pending
        if not len(p) and not p.attempts:
            return
        self._pending = _Pending()
        try:
            async with acquire(self.outbox.pool) as conn, conn.transaction():
                await self._write(conn, p)
        except BaseException:
            # Keep everything for the next try, ahead of what arrived meanwhile.
            n = self._pending
            self._pending = _Pending(
                p.outcomes + n.outcomes,
                p.deferrals + n.deferrals,
                p.attempts + n.attempts,
                p.dsn_failures + n.dsn_failures,
                p.feedback + n.feedback,
                p.campaigns + n.campaigns,
            )
            raise
        self.written += len(p)

    async def _write(self, conn: asyncpg.Connection, p: _Pending) -> None:
        if p.outcomes:
            await self.outbox.ack(self.owner, p.outcomes, conn=conn)
        if p.deferrals:
            await self.outbox.defer(self.owner, p.deferrals, conn=conn)
        if p.attempts:
            cols = list(zip(*p.attempts))
            await conn.execute(
                *q(
                    "insert_attempts",
                    recipient_ids=list(cols[0]),
                    outcomes=list(cols[1]),
                    codes=list(cols[2]),
                    statuses=list(cols[3]),
                    replies=list(cols[4]),
                    mxs=list(cols[5]),
                    durations=list(cols[6]),
                )
            )
        if p.dsn_failures and self.dsn_builder is not None:
            dsns: list[NewMessage] = self.dsn_builder(p.dsn_failures)
            if dsns:
                await self.outbox.enqueue(dsns, conn=conn)
        if p.feedback:
            feedback = self._classified(p.feedback)
            # Events, hard-bounce suppression and reputation counters, in the same transaction.
            await apply_delivery_feedback(conn, feedback, suppress_scope=self.suppress_scope, classifier=self.classifier)
            await self._automate(conn, feedback, p.campaigns)

    def _classified(self, results: list[DeliveryResult]) -> list[DeliveryResult]:
        """Classify failures once here, so feedback and automation see the same category."""
        clf = self.classifier or default_classifier()
        out = []
        for r in results:
            if r.outcome != "delivered" and (r.category is None or r.permanent is None):
                c = clf.classify(r.code, r.status, r.reply)
                r = replace(r, category=r.category or c.category,
                            permanent=c.permanent if r.permanent is None else r.permanent)
            out.append(r)
        return out

    async def _automate(self, conn: asyncpg.Connection, results: list[DeliveryResult], campaigns: list[str]) -> None:
        """Automation rules on this flush's replies; per-campaign counters for the bounce-rate hold."""
        hook = self.automation() if self.automation is not None else None
        if hook is None:
            return
        shaping, on_decision = hook
        signals: list[Signal] = []
        by_campaign: list[tuple[Signal, str]] = []
        finals: Counter[str] = Counter()
        hards: Counter[str] = Counter()
        for r, campaign in zip(results, campaigns):
            if not r.counted:
                continue
            if r.outcome != "delivered":
                s = Signal(r.provider, r.source, r.reply, r.category)
                signals.append(s)
                if campaign:
                    by_campaign.append((s, campaign))
            if campaign and r.outcome in ("delivered", "bounced"):
                finals[campaign] += 1
                if r.outcome == "bounced" and r.category in HARD_CATEGORIES:
                    hards[campaign] += 1
        await record_campaigns(conn, finals, hards)
        made = await evaluate_results(conn, shaping, signals) if signals else []
        if by_campaign:
            made += await evaluate_campaign_signals(conn, shaping, by_campaign)
        for d in made:
            on_decision(d)  # this worker obeys at once; others within [default.health] refresh

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
