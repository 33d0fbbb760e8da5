"""The delivery loop of one worker process: claim -> per-destination queues -> SMTP -> outcomes.

Why per-destination queues: one slow, down or throttling receiver must never
hold up mail for anyone else. Claimed recipients are grouped into *jobs* (one
message to one recipient domain, or one recipient when the copy is
personalized) and put on their destination's queue; each destination runs at
most ``destination_concurrency`` transactions at a time. A destination that
fails at connection level (refused, 421 banner, timeout) is *suspended*: its
queued jobs are deferred at once without being tried, and claims skip its
rows until the suspension ends. A destination whose queue is full is skipped
by claims too, so memory stays bounded whatever the backlog.

Claims are batched (one statement for up to ``claim_batch`` rows), results are
written in batches by :class:`OutcomeWriter`, and LISTEN/NOTIFY only wakes an
idle worker early: polling is the contract.

Traffic shaping (when ``[shaping] file`` is set): right before a transaction
the worker asks its :class:`~engine.shaping.gate.Gate` for a warm-up
unit, a connection slot and the rate tokens that apply. A no comes with a
wait: only that destination's task waits (and claims skip the destination
meanwhile), so a capped provider never slows an uncapped one; a wait longer
than ``[shaping] max_hold`` hands the rows back to the queue untried. A
changed shaping file is picked up on SIGHUP or a NOTIFY on ``engine_reload``.

Every worker keeps a row in ``workers`` (upserted by the lease heartbeat and
right after a reload attempt, deleted on a clean stop) with the sha256 of the
shaping file it applied, so ``engine reload`` can confirm the reload reached
every live worker and ``engine workers`` can list them (through
:mod:`engine.workers`, which owns that table).

Why one module of ~600 lines: this is the delivery loop's control flow (claim,
queue per destination, admit, send, settle, suspend, drain), every step reading
and changing the same per-destination state. The SMTP client, routing, shaping
and outcome writing it drives each live in their own rooms.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog

from engine.compose.pipeline import Composer, MessageRow
from engine.consent.policy import ConsentPolicy
from engine.db.listen import listen_until
from engine.db.pool import acquire
from engine.db.queries import q
from engine.deliver.attemptlog import log_attempt
from engine.deliver.config import DeliveryConfig
from engine.deliver.pools import EgressPools, Source
from engine.deliver.routing import Route, RouteError, Router
from engine.deliver.smtp import ConnectionPool, OutboundMessage
from engine.deliver.smtp.settings import TlsPolicy
from engine.errors import DatabaseUnavailable, EngineError
from engine.feedback.classify import load_rules
from engine.feedback.verp import Verp
from engine.outbox import NOTIFY_CHANNEL, Outbox
from engine.outcome.bounce_report import DsnBuilder
from engine.outcome.writer import Attempt, Backoff, OutcomeWriter, monotonic_ms
from engine.shaping import rules as shaping_mod
from engine.shaping.gate import Admission, Gate, read_shaping
from engine.templates_db import DbTemplateStore
from engine.workers import WorkerRegistry, WorkerReport

if TYPE_CHECKING:
    from engine.config import Settings

log = structlog.get_logger(__name__)

_CONNECTION_PHASES = frozenset({"connect", "greeting", "ehlo", "starttls"})
RELOAD_CHANNEL = "engine_reload"


@dataclass(slots=True)
class Job:
    message_id: Any
    domain: str
    rows: list[asyncpg.Record]
    msg: MessageRow


@dataclass
class Destination:
    domain: str
    queue: deque[Job] = field(default_factory=deque)
    active: int = 0
    queued_rows: int = 0
    suspended_until: float = 0.0
    suspend_reason: str = ""
    throttled_until: float = 0.0  # shaping: a token or slot is not expected before then
    queue_cap: int = 0  # shaping: rows worth holding for this destination (0 = the configured maximum)

    def suspended(self, now: float) -> bool:
        return self.suspended_until > now


class DeliveryWorker:
    """One worker's scheduler; many may run (on many hosts) against one outbox."""

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        *,
        owner: str | None = None,
        dsn: str | None = None,
        router: Router | None = None,
        smtp: ConnectionPool | None = None,
        composer: Composer | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.settings = settings
        self.cfg: DeliveryConfig = settings.delivery
        self.outbox = Outbox(pool, settings.queue.max_age, consent=ConsentPolicy.from_config(settings.consent))
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.dsn = dsn
        self.router = router or Router(settings.routing)
        self.smtp = smtp or ConnectionPool(self.cfg.smtp)
        self.composer = composer or Composer(settings)
        self._messages: OrderedDict[Any, MessageRow] = OrderedDict()
        self.pools = EgressPools(settings.pools, self.cfg.stream_pools, settings.server.hostname)
        self.writer = OutcomeWriter(
            self.outbox,
            self.owner,
            Backoff(self.cfg.retry_schedule, self.cfg.retry_jitter),
            flush_interval=self.cfg.flush_interval,
            dsn_builder=DsnBuilder(settings, self._messages.get) if self.cfg.dsn else None,
            suppress_scope=settings.feedback.suppress_scope,
            classifier=load_rules(settings.feedback.classifier_rules),
        )
        self.verp = Verp.from_settings(settings)
        self.dests: dict[str, Destination] = {}
        self.inflight = 0
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.delivered = 0
        self.gate = gate if gate is not None else self._make_gate(settings, pool)
        if self.gate is not None:  # automation: flushed results may slow down or pause a provider
            self.writer.automation = self._automation_hook
        # Spill-over picks a source from a named pool, through EgressPools' public API.
        self._spill = EgressPools(
            settings.pools, {f"spill:{p.name}": p.name for p in settings.pools}, settings.server.hostname
        )
        self._unstarted: list[int] = []
        self._held: set[int] = set()
        """Ids of the rows leased to us that we know of (claimed, not yet settled): the heartbeat renews these only."""
        self.writer.on_written = self._held.difference_update
        self._background: set[asyncio.Task[Any]] = set()
        self.started_at = datetime.now(UTC)
        self.registry = WorkerRegistry(pool)
        self._reload_id: str | None = None  # the last `engine reload` handled (its NOTIFY payload's id)
        self._reports: set[asyncio.Task[None]] = set()
        self._gone = False  # our workers row was deleted at shutdown: write it no more
        self._pruned_at = 0.0

    def _make_gate(self, settings: Settings, pool: asyncpg.Pool) -> Gate | None:
        """The shaping gate when ``[shaping] file`` is set; a bad file stops the worker at start."""
        path = shaping_mod.resolve_path(settings)
        if path is None:
            return None
        shaping, digest = read_shaping(path)
        return Gate(
            pool, self.owner, shaping, settings.shaping,
            default_connection_limit=self.cfg.smtp.connection_limit, path=path, digest=digest,
        )

    def _automation_hook(self) -> tuple[Any, Any] | None:
        """(current shaping, callback for new decisions) for the outcome writer's flush."""
        gate = self.gate
        return None if gate is None else (gate.shaping, gate.decisions.add)

    def request_reload(self, reload_id: str | None = None) -> bool:
        """Apply a changed shaping file (SIGHUP, NOTIFY engine_reload); an invalid one is refused.

        The outcome is written to our ``workers`` row at once (not at the next heartbeat),
        so ``engine reload`` sees the confirmation quickly.
        """
        ok = self.gate.reload() if self.gate is not None else False
        self._reload_id = reload_id
        with contextlib.suppress(RuntimeError):  # no running loop: the next heartbeat reports it
            task = asyncio.get_running_loop().create_task(self._report_alive(), name="worker-report")
            self._reports.add(task)
            task.add_done_callback(self._reports.discard)
        return ok

    def _reload_from_notify(self, payload: str) -> None:
        """NOTIFY engine_reload: the payload is ``{"id": ..., "file": ...}`` (a bare path from older senders)."""
        reload_id = None
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            rid = json.loads(payload).get("id")
            reload_id = str(rid) if rid else None
        self.request_reload(reload_id)

    def _heartbeat_period(self) -> float:
        return min(10.0, max(0.2, self.settings.queue.lease_duration / 4))

    async def _report_alive(self) -> None:
        """Upsert our ``workers`` row; never fatal (the table is for operators, leases do not depend on it)."""
        gate = self.gate
        if self._gone:
            return
        try:
            prune = time.monotonic() - self._pruned_at > 600
            await self.registry.report(
                WorkerReport(
                    owner=self.owner, started_at=self.started_at, heartbeat_seconds=self._heartbeat_period(),
                    shaping_source=gate.shaping.source if gate else None,
                    shaping_digest=gate.digest if gate else None,
                    shaping_applied_at=gate.applied_at if gate else None,
                    reload_id=self._reload_id, reload_error=gate.reload_error if gate else None,
                    delivered=self.delivered,
                ),
                prune=prune,
            )
            if prune:
                self._pruned_at = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - a down database is the heartbeat's concern
            log.warning("worker_report_failed", error=str(exc))

    async def _report_gone(self) -> None:
        self._gone = True
        if self._reports:
            await asyncio.wait(set(self._reports), timeout=5)
        try:
            await self.registry.gone(self.owner)
        except Exception as exc:  # noqa: BLE001 - the row goes stale and is pruned later
            log.warning("worker_report_failed", error=str(exc))

    # -- lifecycle ------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        """Claim and deliver until :meth:`request_stop`; then drain within the shutdown timeout."""
        self.writer.start()
        listener = asyncio.create_task(self._listen(), name="notify-listener")
        finished = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(finished), name="lease-heartbeat")
        maintenance = None
        if self.gate is not None:
            maintenance = asyncio.create_task(
                self.gate.maintain(self._stop, self.smtp.open_for, trim_idle=self.smtp.trim_idle), name="shaping-maintenance"
            )
        log.info("delivery_worker_started", owner=self.owner, shaping=self.gate.shaping.source if self.gate else None)
        try:
            await self._claim_loop()
        finally:
            listener.cancel()
            await self._drain()
            finished.set()  # leases were kept alive through the drain; now nothing is held
            with contextlib.suppress(BaseException):
                await heartbeat
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._report_gone(), timeout=10)
            with contextlib.suppress(BaseException):
                await listener
            if maintenance is not None:
                with contextlib.suppress(BaseException):
                    await maintenance
            if self.gate is not None:
                with contextlib.suppress(Exception):
                    await self.gate.close()
            log.info("delivery_worker_stopped", owner=self.owner, delivered=self.delivered)

    async def _drain(self) -> None:
        timeout = self.settings.server.shutdown_timeout
        # Jobs not yet started go back to the queue untouched.
        waiting = [row["id"] for d in self.dests.values() for job in d.queue for row in job.rows]
        for d in self.dests.values():
            d.queue.clear()
        if self._tasks:
            done, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.writer.close(timeout)
        waiting += self._unstarted  # jobs that were waiting for a shaping token when asked to stop
        self._unstarted = []
        if waiting:
            with contextlib.suppress(DatabaseUnavailable):
                n = await self.outbox.release(self.owner, waiting)
                self._held.difference_update(waiting)
                log.info("released_unstarted", count=n)
        await self.smtp.close()

    # -- claiming -------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        cfg = self.cfg
        delay = 0.2
        while not self._stop.is_set():
            free = cfg.max_inflight - self.inflight
            if free < min(cfg.claim_batch, cfg.max_inflight) // 4 + 1:
                await self._sleep(cfg.poll_interval)
                continue
            now = time.monotonic()
            skip = [
                d.domain
                for d in self.dests.values()
                if d.suspended(now)
                or d.queued_rows >= (d.queue_cap or cfg.max_queued_per_destination)
                or d.throttled_until > now
            ]
            try:
                rows = await self.outbox.claim(
                    self.owner, min(free, cfg.claim_batch), self.settings.queue.lease_duration, skip
                )
                self._held.update(r["id"] for r in rows)
                delay = 0.2
            except DatabaseUnavailable as exc:
                log.warning("claim_failed", error=str(exc), retry_in=delay)
                await self._sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            # The rows are ours now (and our heartbeat renews their leases): never drop them on the
            # floor because their messages could not be read; retry until read, or until asked to stop.
            while rows and not await self._loaded({r["message_id"] for r in rows}, delay):
                if self._stop.is_set():
                    self._unstarted.extend(r["id"] for r in rows)  # handed back at shutdown
                    rows = []
                delay = min(delay * 2, 5.0)
            if not rows:
                await self._sleep(cfg.poll_interval)
                continue
            self._dispatch(rows)
            if len(rows) < min(free, cfg.claim_batch):
                # The ready set is drained for now: wait for a hint or the next poll.
                await self._sleep(cfg.poll_interval)
            self._gc_destinations()

    async def _heartbeat(self, finished: asyncio.Event) -> None:
        """Renew the leases of the rows we know we hold, then put back rows whose lease ran out.

        Rows leased to our name that we never heard of (a claim whose reply was lost) are not
        renewed: they run out and are reclaimed like a dead worker's.

        Its own task, so a slow claim or a full worker never lets our leases lapse; any
        worker does the reclaiming, so there is no single point of failure.
        """
        lease = self.settings.queue.lease_duration
        while not finished.is_set():
            try:
                await self.outbox.extend_leases(self.owner, list(self._held), lease)
                n = await self.outbox.reclaim_expired_leases()
                if n:
                    log.info("leases_reclaimed", count=n)
            except DatabaseUnavailable as exc:
                log.warning("lease_heartbeat_failed", error=str(exc))
            if not finished.is_set():  # bounded: a slow database must never delay the next lease renewal
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._report_alive(), timeout=max(1.0, self._heartbeat_period()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(finished.wait(), timeout=self._heartbeat_period())

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        self._wake.clear()

    async def _loaded(self, ids: set[Any], retry_in: float) -> bool:
        """:meth:`_load_messages`, or False after a pause when the database is unavailable."""
        try:
            await self._load_messages(ids)
            return True
        except DatabaseUnavailable as exc:
            log.warning("claimed_messages_unreadable", error=str(exc), retry_in=retry_in)
            await self._sleep(retry_in)
            return False

    async def _load_messages(self, ids: set[Any]) -> None:
        missing = [i for i in ids if i not in self._messages]
        if missing:
            for r in await self.outbox.messages_for_delivery(missing):
                self._messages[r["id"]] = MessageRow.from_stored(
                    r["id"], r["mail_from"], r["stream"], r["raw"], r["content"], r["metadata"] or {}, r["source"]
                )
            # Uploaded templates pinned by these messages must be in the renderer's mirror before rendering.
            store = self.composer.renderer.store
            refs = [m.content.template for i in missing if (m := self._messages.get(i)) and m.content and m.content.template]
            if refs and isinstance(store, DbTemplateStore):
                await store.prepare(refs)
        for i in ids:
            self._messages.move_to_end(i)
        while len(self._messages) > 5000:
            self._messages.popitem(last=False)

    def _dispatch(self, rows: Sequence[asyncpg.Record]) -> None:
        self.inflight += len(rows)
        groups: dict[tuple[Any, str, int | None], list[asyncpg.Record]] = {}
        for r in rows:
            # Personalized copies (tokens, variables) need a transaction each; others share one per domain.
            split = r["id"] if self.composer.personalized(self._messages[r["message_id"]]) else None
            groups.setdefault((r["message_id"], r["domain"], split), []).append(r)
        for key, group in groups.items():
            domain = group[0]["domain"]
            dest = self.dests.get(domain)
            if dest is None:
                dest = self.dests[domain] = Destination(domain)
            job = Job(key[0], domain, group, self._messages[key[0]])
            if dest.suspended(time.monotonic()):
                self.inflight -= len(group)
                self._settle_unsent(dest, job)
                continue
            dest.queue.append(job)
            dest.queued_rows += len(group)
            self._pump(dest)

    def _pump(self, dest: Destination) -> None:
        while dest.queue and dest.active < self.cfg.destination_concurrency:
            job = dest.queue.popleft()
            dest.queued_rows -= len(job.rows)
            dest.active += 1
            task = asyncio.create_task(self._deliver(dest, job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _gc_destinations(self) -> None:
        now = time.monotonic()
        if len(self.dests) > 10_000:
            for domain in [d.domain for d in self.dests.values() if not d.queue and not d.active and not d.suspended(now)]:
                del self.dests[domain]

    # -- delivering -----------------------------------------------------------------------

    async def _deliver(self, dest: Destination, job: Job) -> None:
        started = time.monotonic()
        try:
            await self._attempt(dest, job, started)
        except Exception as exc:  # never lose a job to a bug: defer it with the reason
            log.exception("delivery_crashed", domain=dest.domain, message_id=str(job.message_id))
            self._settle(job, "temporary", None, None, f"internal error: {type(exc).__name__}: {exc}", None, started)
        finally:
            dest.active -= 1
            self.inflight -= len(job.rows)
            self._pump(dest)
            self._wake.set()

    async def _attempt(self, dest: Destination, job: Job, started: float) -> None:
        try:
            route = await self.router.resolve(dest.domain)
        except RouteError as exc:
            kind = "permanent" if exc.permanent else "temporary"
            status = ("5.1.2" if exc.permanent else "4.4.3")
            self._settle(job, kind, None, status, f"{status} {exc.reason}", None, started)
            if not exc.permanent:
                self._suspend(dest, f"DNS: {exc.reason}")
            return
        rcpts = [r["address"] for r in job.rows]
        try:
            data = self.composer.compose(job.msg, job.rows[0]["id"], job.rows[0]["vars"])
        except EngineError as exc:
            self._settle(job, "permanent", None, "5.6.0", f"5.6.0 message could not be composed: {exc}", None, started)
            return
        source = self.pools.pick(job.msg.stream)
        tls = self.cfg.tls_policy.get(dest.domain)
        adm: Admission | None = None
        if self.gate is not None:
            admitted = await self._admit(dest, job, route, source)
            if admitted is None:
                return  # handed back to the queue, or stopping
            adm, source, shaped_tls = admitted
            tls = tls or shaped_tls
        mail_from = job.msg.mail_from
        if self.verp is not None and mail_from:  # the null sender (our DSNs) stays <>
            # One token per transaction; the inbound side finds co-recipients by address within the message.
            mail_from = self.verp.return_path(job.rows[0]["id"])
        provider = ""
        if self.gate is not None:
            provider = self.gate.limits(dest.domain, route.site, route.mx_hosts, source.name).group
        try:
            result = await self.smtp.send(
                route.hops,
                OutboundMessage(mail_from, rcpts, data, functools.partial(
                    self.composer.compose_seven_bit, job.msg, job.rows[0]["id"], job.rows[0]["vars"])),
                source=source.address,
                ehlo_name=source.ehlo,
                tls=tls,
                site=route.site,
                connection_limit=adm.connection_limit if adm else None,
                max_deliveries_per_connection=adm.max_deliveries_per_connection if adm else None,
                provider=provider,
            )
        except BaseException:
            if adm is not None and self.gate is not None:
                self.gate.done(adm, 0, 0)
            raise
        if adm is not None and self.gate is not None:
            ok = sum(1 for r in result.results if r.kind == "delivered")
            self.gate.done(adm, ok, len(result.results) - ok)
        by_rcpt = {r.recipient: r for r in result.results}
        attempts = []
        pool = self.pools.pool_for(job.msg.stream)
        for row in job.rows:
            r = by_rcpt[row["address"]]
            attempt = self._attempt_row(
                job, row, r.kind, r.code, r.enhanced_status, r.reply, result.host, started,
                provider=provider, egress=source.name,
            )
            attempts.append(attempt)
            log_attempt(attempt, pool=pool, tls=result.tls)
        self.writer.add(attempts)
        self.delivered += sum(1 for a in attempts if a.kind == "delivered")
        if all(r.kind == "temporary" and r.phase in _CONNECTION_PHASES for r in result.results):
            self._suspend(dest, result.results[0].reply)

    async def _admit(
        self, dest: Destination, job: Job, route: Route, source: Source
    ) -> tuple[Admission, Source, TlsPolicy | None] | None:
        """Wait (this destination only) until shaping admits the transaction; None: the job was handed back."""
        gate = self.gate
        assert gate is not None
        sending_domain = job.msg.mail_from.rpartition("@")[2].lower()
        deadline = time.monotonic() + gate.config.max_hold
        spilled = False
        while True:
            lim = gate.limits(dest.domain, route.site, route.mx_hosts, source.name)
            rates = [r.per_second for r in (lim.max_message_rate, lim.provider_max_message_rate) if r is not None]
            if rates:
                # Hold about half a max_hold of traffic: enough to keep busy, never enough for leases to run out.
                dest.queue_cap = max(self.cfg.destination_concurrency, int(min(rates) * gate.config.max_hold / 2))
            else:
                dest.queue_cap = 0
            campaign = job.msg.metadata.get("campaign") if isinstance(job.msg.metadata, dict) else None
            adm = await gate.admit(lim, (route.site, source.address), sending_domain, job.msg.stream,
                                   str(campaign) if campaign else "")
            if adm.ok:
                return adm, source, lim.enable_tls
            if adm.spill_pool and not spilled:
                spilled = True
                source = self._spill.pick(f"spill:{adm.spill_pool}")
                continue
            now = time.monotonic()
            if adm.postpone or now + adm.wait > deadline:
                await self._postpone(job, adm.wait, adm.reason)
                return None
            if adm.wait > 0.05:
                dest.throttled_until = max(dest.throttled_until, now + adm.wait)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=adm.wait)
            if self._stop.is_set():
                self._unstarted.extend(row["id"] for row in job.rows)
                return None

    async def _postpone(self, job: Job, wait: float, reason: str) -> None:
        """Hand a throttled job back untried, ready again within ``[shaping] recheck``."""
        assert self.gate is not None
        delay = max(0.05, min(wait, self.gate.config.recheck))
        when = datetime.now(UTC) + timedelta(seconds=delay)
        ids = [row["id"] for row in job.rows]
        try:
            await self.outbox.postpone(self.owner, ids, when)
            self._held.difference_update(ids)
        except DatabaseUnavailable:
            self._unstarted.extend(ids)  # released at shutdown, or their lease runs out
        log.info("delivery_postponed", domain=job.domain, message_id=str(job.message_id), reason=reason,
                 retry_in=round(delay, 3))

    def _attempt_row(
        self, job: Job, row: asyncpg.Record, kind: str, code: int | None, status: str | None, reply: str,
        mx: str | None, started: float, counted: bool = True, provider: str = "", egress: str = "",
    ) -> Attempt:
        return Attempt(
            recipient_id=row["id"],
            address=row["address"],
            attempts_before=row["attempts"],
            expires_at=row["expires_at"],
            kind=kind,
            code=code,
            status=status,
            reply=reply,
            mx=mx,
            duration_ms=monotonic_ms(started),
            message_id=job.message_id,
            mail_from=job.msg.mail_from,
            stream=job.msg.stream,
            source=job.msg.source,
            counted=counted,
            provider=provider,
            egress=egress,
            campaign=str((job.msg.metadata or {}).get("campaign") or "") if isinstance(job.msg.metadata, dict) else "",
        )

    def _settle(
        self, job: Job, kind: str, code: int | None, status: str | None, reply: str, mx: str | None, started: float
    ) -> None:
        attempts = [self._attempt_row(job, row, kind, code, status, reply, mx, started) for row in job.rows]
        self.writer.add(attempts)
        for attempt in attempts:
            log_attempt(attempt)

    def _suspend(self, dest: Destination, reason: str) -> None:
        """Stop trying a destination that refuses connections; defer what waits for it, untried."""
        dest.suspended_until = time.monotonic() + self.cfg.suspend_on_connection_failure
        dest.suspend_reason = reason
        log.info("destination_suspended", domain=dest.domain, reason=reason, seconds=self.cfg.suspend_on_connection_failure)
        if self.gate is not None:  # shared so `engine shaping show` can tell
            task = asyncio.create_task(self._record_suspension(dest.domain, reason))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        while dest.queue:
            job = dest.queue.popleft()
            dest.queued_rows -= len(job.rows)
            self.inflight -= len(job.rows)
            self._settle_unsent(dest, job)

    def _settle_unsent(self, dest: Destination, job: Job) -> None:
        """Defer a job of a suspended destination without counting an attempt."""
        started = time.monotonic()
        reply = f"not tried: destination suspended after: {dest.suspend_reason}"
        self.writer.add(
            [self._attempt_row(job, row, "temporary", None, None, reply, None, started, counted=False) for row in job.rows]
        )

    async def _record_suspension(self, domain: str, reason: str) -> None:
        with contextlib.suppress(DatabaseUnavailable):
            async with acquire(self.outbox.pool) as conn:
                await conn.execute(*q("suspension_record", domain=domain, reason=reason[:500], owner=self.owner,
                                      seconds=self.cfg.suspend_on_connection_failure))

    # -- wake-ups -------------------------------------------------------------------------

    async def _listen(self) -> None:
        """LISTEN for enqueue hints (and shaping reloads); polling covers any gap."""
        if self.dsn is None:
            return
        handlers: dict[str, Callable[..., Any]] = {NOTIFY_CHANNEL: lambda *_: self._wake.set()}
        if self.gate is not None:
            handlers[RELOAD_CHANNEL] = lambda *a: self._reload_from_notify(a[-1])
        await listen_until(self.dsn, handlers, self._stop)
