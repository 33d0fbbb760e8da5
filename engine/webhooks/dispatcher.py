"""The webhook dispatcher: fan out the event stream, send signed requests, retry, dead-letter.

One :class:`Dispatcher` per process (inside ``engine run``, or alone as ``engine webhooks
run``); any number share the work through Postgres. It runs:

- a **fan-out** loop that turns new events into deliveries (one statement per pass; only
  one dispatcher at a time does it, the others skip the locked cursor);
- one :class:`LaneWorker` per (enabled endpoint, lane): it claims that endpoint's due
  deliveries of its lane, sends them with ``concurrency`` requests in flight over its own
  keep-alive connections, and records the round's results in one statement. The
  transactional lane has its own worker and connections: a marketing backlog never
  delays a password-reset event, and a slow endpoint delays only itself;
- maintenance: expired leases back to pending, old delivered rows pruned, endpoints reloaded.

The dispatcher has its own small database pool and never touches delivery's; whatever the
backlog, memory holds at most one round per lane. Times that decide retries come from an
injectable :class:`Clock` (tests move it forward); header timestamps are real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import os
import random
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import aiohttp
import asyncpg
import orjson
import structlog

from engine import metrics
from engine.config import Settings
from engine.db.listen import listen_until
from engine.db.pool import acquire
from engine.errors import DatabaseUnavailable
from engine.events.public import event_id
from engine.events.store import public_events_by_id
from engine.outbox import NOTIFY_CHANNEL
from engine.webhooks import signing
from engine.webhooks.deliveries import LANES, WAKE_CHANNEL, Claimed, Deliveries, Result
from engine.webhooks.endpoints import Endpoint, Endpoints, SigningKeys
from engine.webhooks.resolver import resolver
from engine.webhooks.safety import literal_refused

log = structlog.get_logger(__name__)

REFRESH_SECONDS = 2.0
MAINTENANCE_SECONDS = 10.0
MAX_ROUND = 2000
ROUNDS_IN_FLIGHT = 2
"""Rounds a lane worker runs at once (see :meth:`LaneWorker.run`)."""


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """A ``Retry-After`` header (delta seconds or an HTTP date) in seconds; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one HTTP request came to (for every delivery in it)."""

    ok: bool
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None
    gone: bool = False


class LaneWorker:
    """Sends one endpoint's deliveries of one lane; stops when its endpoint goes away or is disabled."""

    def __init__(self, dispatcher: Dispatcher, endpoint: Endpoint, keys: SigningKeys, lane: str) -> None:
        self.d = dispatcher
        self.endpoint = endpoint
        self.keys = keys
        self.lane = lane
        self.wake = asyncio.Event()
        self.stop = asyncio.Event()
        self.failures = 0  # consecutive failed requests (the breaker)
        self.gone_reason: str | None = None  # the endpoint answered 410: disable it before recording the round
        self.task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._gate = asyncio.Semaphore(dispatcher.settings.webhooks.concurrency)  # requests in flight, all rounds

    def update(self, endpoint: Endpoint, keys: SigningKeys) -> None:
        self.endpoint, self.keys = endpoint, keys

    @property
    def cfg(self) -> Any:
        return self.d.settings.webhooks

    def _session_for(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.cfg.concurrency, resolver=resolver(self.cfg.allow_private_targets),
                keepalive_timeout=30, ttl_dns_cache=60,
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
                json_serialize=lambda o: orjson.dumps(o).decode(), skip_auto_headers=("User-Agent",),
                headers={"user-agent": "engine-webhooks/1"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def run(self) -> None:
        """:data:`ROUNDS_IN_FLIGHT` round loops: while one waits on Postgres (claim, payloads, results),
        another claims what the fan-out just made and sends it, so a new event does not wait for the
        round before it to end. Order per recipient holds: a claim takes only a recipient's oldest
        unfinished delivery, so two rounds never hold the same recipient."""
        try:
            await asyncio.gather(*(self._loop(n) for n in range(ROUNDS_IN_FLIGHT)))
        finally:
            await self.close()

    async def _loop(self, n: int) -> None:
        while not (self.stop.is_set() or self.d.stopping.is_set()):
            probing = self.failures >= self.cfg.breaker_failures
            worked = False
            if n == 0 or not probing:  # a failing endpoint is probed by one request at a time
                try:
                    worked = await self.round()
                except DatabaseUnavailable as exc:
                    log.warning("webhooks_database_unavailable", error=str(exc))
                except Exception:
                    log.exception("webhooks_round_failed", endpoint=str(self.endpoint.id), lane=self.lane)
            if worked:
                continue
            self.wake.clear()
            pause = self.d.poll_interval
            if self.failures >= self.cfg.breaker_failures:
                pause = max(pause, min(30.0, 0.5 * 2 ** min(self.failures - self.cfg.breaker_failures, 6)))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=pause)

    async def round(self) -> bool:
        """Claim, send, record. False when there was nothing due (the caller waits)."""
        ep, cfg, d = self.endpoint, self.cfg, self.d
        probing = self.failures >= cfg.breaker_failures
        # Two waves of `concurrency` requests per round: enough to keep the connections busy, and a
        # round short enough to bound the lease below.
        limit = 1 if probing else min(MAX_ROUND, 2 * cfg.concurrency * ep.batch_max)
        # A round sends its requests in waves of `concurrency`, each wave up to `timeout`: the lease
        # outlives the longest round, so no other dispatcher takes over deliveries still in flight.
        waves = -(-limit // (ep.batch_max * cfg.concurrency))
        lease = max(cfg.lease, ep.batch_wait + waves * cfg.timeout + 10)
        claimed = await d.deliveries.claim(ep.id, self.lane, d.owner, d.clock.now(), limit, lease)
        if not claimed:
            return False
        try:
            if ep.batch_max > 1 and not probing:
                claimed = await self._fill(claimed, lease)
            results = await self._send(claimed)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(d.deliveries.release(d.owner, [c.id for c in claimed]))
            raise
        if self.gone_reason is not None:
            # Disabled before the round is recorded, so no reload of the endpoints can start a worker
            # that sends the same delivery again before the endpoint is off.
            await d.endpoints.disable(ep.id, self.gone_reason)
            log.warning("webhook_endpoint_disabled", endpoint=str(ep.id), reason=self.gone_reason)
        await d.deliveries.complete(d.owner, d.clock.now(), results)
        return True

    async def _fill(self, claimed: list[Claimed], lease: float) -> list[Claimed]:
        """Batching: a batch goes when it is full or when its oldest event has waited ``max_wait``.

        With less than one batch claimed, wait for more. With full batches in hand they go now,
        and a young partial tail is handed back for the next round rather than holding them up
        (a busy stream rarely claims an exact multiple: waiting for one delayed every batch).
        """
        ep, d = self.endpoint, self.d
        while len(claimed) < ep.batch_max and not self.d.stopping.is_set():
            oldest = min(c.event_at for c in claimed)
            left = ep.batch_wait - (d.clock.now() - oldest).total_seconds()
            if left <= 0:
                break
            self.wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=min(left, d.poll_interval))
            more = await d.deliveries.claim(ep.id, self.lane, d.owner, d.clock.now(), ep.batch_max - len(claimed), lease)
            claimed += more
        tail = len(claimed) % ep.batch_max
        if len(claimed) > ep.batch_max and tail:
            # Claims hold at most one event per recipient, so handing the newest back keeps order.
            rest = claimed[-tail:]
            if (d.clock.now() - min(c.event_at for c in rest)).total_seconds() < ep.batch_wait:
                await d.deliveries.release(d.owner, [c.id for c in rest])
                claimed = claimed[:-tail]
        return claimed

    async def _send(self, claimed: list[Claimed]) -> list[Result]:
        ep = self.endpoint
        async with acquire(self.d.pool) as conn:
            events = await public_events_by_id(conn, [c.event_id for c in claimed])
        results: list[Result] = []
        sendable: list[Claimed] = []
        for c in claimed:
            if c.event_id in events:
                sendable.append(c)
            else:  # the event row is gone (retention): nothing to send, ever
                results.append(Result(c.id, "failed", error="the event no longer exists", counted=False))
        size = ep.batch_max
        chunks = [sendable[i:i + size] for i in range(0, len(sendable), size)]
        async def one(chunk: list[Claimed]) -> list[Result]:
            async with self._gate:
                if self.gone_reason is not None:  # a 410 arrived meanwhile (this round or the other): not sent
                    return [Result(c.id, "pending", self.d.clock.now(), counted=False) for c in chunk]
                outcome = await self._post(chunk, events)
            return self._results(chunk, outcome)

        for part in await asyncio.gather(*(one(ch) for ch in chunks)):
            results.extend(part)
        return results

    async def _post(self, chunk: Sequence[Claimed], events: dict[int, dict[str, Any]]) -> Outcome:
        ep = self.endpoint
        if not self.cfg.allow_private_targets:
            refused = literal_refused(ep.url)
            if refused:
                return Outcome(False, error=refused)
        if ep.batch_max > 1:
            body = orjson.dumps([events[c.event_id] for c in chunk])
            # One id per batch, derived from its events: a retry of the same batch repeats it.
            # Receivers of batches deduplicate on each event's own "id".
            digest = hashlib.sha256(",".join(str(c.event_id) for c in chunk).encode()).hexdigest()[:24]
            msg_id = f"batch_{digest}"
        else:
            body = orjson.dumps(events[chunk[0].event_id])
            msg_id = event_id(chunk[0].event_id)
        headers = signing.headers(self.keys.keys, msg_id, int(time.time()), body)
        try:
            async with self._session_for().post(ep.url, data=body, headers=headers, allow_redirects=False) as resp:
                await resp.content.read(4096)  # drain a little so the connection can be reused
                status = resp.status
                retry_after = resp.headers.get("retry-after")
        except TimeoutError:
            return Outcome(False, error=f"timed out after {self.cfg.timeout:g}s")
        except (aiohttp.ClientError, OSError) as exc:
            return Outcome(False, error=f"{type(exc).__name__}: {exc}"[:500])
        if 200 <= status < 300:
            return Outcome(True, status)
        if status == 410:
            return Outcome(False, status, "410 Gone: the receiver asked us to stop", gone=True)
        after = retry_after_seconds(retry_after, datetime.now(UTC)) if status in (429, 503) else None
        what = "redirect (not followed)" if 300 <= status < 400 else f"HTTP {status}"
        return Outcome(False, status, what, retry_after=after)

    def _results(self, chunk: Sequence[Claimed], out: Outcome) -> list[Result]:
        cfg, now = self.cfg, self.d.clock.now()
        m = metrics.get()
        metrics.inc(m.webhook_requests, outcome="ok" if out.ok else "gone" if out.gone else "failed")
        if out.ok:
            metrics.inc(m.webhook_events, len(chunk))
            if self.failures >= cfg.breaker_failures:
                self.d.recovered(self.endpoint.id)
            self.failures = 0
            return [Result(c.id, "delivered", status=out.status) for c in chunk]
        self.failures += 1
        if out.gone:
            self.gone_reason = f"410 Gone at {now.isoformat()}"
            self.stop.set()
            # Not the receiver's fault per event: the deliveries wait (untried) for a re-enable.
            return [Result(c.id, "pending", now, out.status, out.error, counted=False) for c in chunk]
        results = []
        schedule = cfg.retry_schedule
        for c in chunk:
            n = c.attempts + 1  # attempts made, this one included
            if n > len(schedule):
                results.append(Result(c.id, "failed", None, out.status, out.error))
                continue
            delay = schedule[n - 1] * (1 + random.uniform(-cfg.jitter, cfg.jitter))
            if out.retry_after is not None:
                delay = min(out.retry_after, cfg.max_retry_after)
            results.append(Result(c.id, "pending", now + timedelta(seconds=delay), out.status, out.error))
        if self.failures == cfg.breaker_failures:
            log.warning("webhook_endpoint_failing", endpoint=str(self.endpoint.id), lane=self.lane, error=out.error)
        return results


class Dispatcher:
    def __init__(
        self, settings: Settings, pool: asyncpg.Pool, *, clock: Clock | None = None, owner: str | None = None,
        dsn: str | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.dsn = dsn  # for the LISTEN connection (see _listen_loop)
        self.clock: Clock = clock or SystemClock()
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:webhooks:{uuid.uuid4().hex[:6]}"
        self.deliveries = Deliveries(pool, settings.webhooks.transactional_streams)
        self.endpoints = Endpoints(pool, settings)
        self.poll_interval = settings.webhooks.poll_interval
        self.stopping = asyncio.Event()
        self._refresh = asyncio.Event()
        self._news = asyncio.Event()  # mail was enqueued (NOTIFY engine_outbox): new events to fan out
        self._workers: dict[tuple[uuid.UUID, str], LaneWorker] = {}
        self._side: set[asyncio.Task[Any]] = set()

    def request_stop(self) -> None:
        self.stopping.set()

    def wake(self) -> None:
        """New deliveries may be due (a replay, a re-enable): look now instead of at the next poll."""
        self._refresh.set()
        for w in self._workers.values():
            w.wake.set()

    async def run(self) -> None:
        loops = [
            asyncio.create_task(self._fan_out_loop(), name="webhooks-fanout"),
            asyncio.create_task(self._endpoints_loop(), name="webhooks-endpoints"),
            asyncio.create_task(self._maintenance_loop(), name="webhooks-maintenance"),
            asyncio.create_task(self._listen_loop(), name="webhooks-listen"),
        ]
        try:
            await self.stopping.wait()
        finally:
            for w in self._workers.values():
                w.stop.set()
                w.wake.set()
            tasks = [w.task for w in self._workers.values() if w.task is not None]
            grace = self.settings.webhooks.timeout + 1
            if tasks:
                await asyncio.wait(tasks, timeout=grace)
            for t in [*loops, *tasks, *self._side]:
                t.cancel()
            await asyncio.gather(*loops, *tasks, *self._side, return_exceptions=True)
            self._workers.clear()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._side.add(task)
        task.add_done_callback(self._side.discard)

    def recovered(self, endpoint_id: uuid.UUID) -> None:
        log.info("webhook_endpoint_recovered", endpoint=str(endpoint_id))
        self._spawn(self.deliveries.recovered(endpoint_id, self.clock.now()))

    async def _fan_out_loop(self) -> None:
        cfg = self.settings.webhooks
        while not self.stopping.is_set():
            full = False
            try:
                res = await self.deliveries.fan_out(self.clock.now(), cfg.fanout_batch)
                full = res.events >= cfg.fanout_batch
                for key in res.lanes:
                    w = self._workers.get(key)
                    if w is not None:
                        w.wake.set()
                    else:
                        self._refresh.set()
            except DatabaseUnavailable as exc:
                log.warning("webhooks_database_unavailable", error=str(exc))
            except Exception:
                log.exception("webhooks_fanout_failed")
            if not full and not self.stopping.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._news.wait(), timeout=self.poll_interval)
            self._news.clear()

    async def _listen_loop(self) -> None:
        """LISTEN for wake-ups from other processes; polling covers any gap.

        ``engine_webhooks``: an API call or a CLI replay changed endpoints or due deliveries.
        ``engine_outbox``: an accept committed, so its ``email.accepted`` events can be fanned out now.

        On a connection of its own (like the delivery workers' listener), reopened after a drop;
        without a ``dsn`` (a dispatcher built on a bare pool, as in tests) only polling wakes it.
        """
        if self.dsn is not None:
            await listen_until(self.dsn, {WAKE_CHANNEL: self._notified, NOTIFY_CHANNEL: self._enqueued}, self.stopping)

    def _notified(self, *_: Any) -> None:
        self.wake()

    def _enqueued(self, *_: Any) -> None:
        """An accept committed (the outbox's NOTIFY arrives at commit): its events are visible now."""
        self._news.set()

    async def _endpoints_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                await self.sync_endpoints()
            except DatabaseUnavailable as exc:
                log.warning("webhooks_database_unavailable", error=str(exc))
            except Exception:
                log.exception("webhooks_endpoints_failed")
            self._refresh.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._refresh.wait(), timeout=REFRESH_SECONDS)

    async def sync_endpoints(self) -> None:
        """Start a lane worker per enabled endpoint and lane; stop those of removed or disabled ones."""
        active = {ep.id: (ep, keys) for ep, keys in await self.endpoints.active()}
        for key, w in list(self._workers.items()):
            current = active.get(key[0])
            if current is None or w.task is None or w.task.done():
                w.stop.set()
                w.wake.set()
                del self._workers[key]
            else:
                w.update(*current)
        for ep, keys in active.values():
            for lane in LANES:
                if (ep.id, lane) not in self._workers:
                    w = LaneWorker(self, ep, keys, lane)
                    w.task = asyncio.create_task(w.run(), name=f"webhooks-{ep.id}-{lane}")
                    self._workers[(ep.id, lane)] = w

    async def _maintenance_loop(self) -> None:
        cfg = self.settings.webhooks
        while not self.stopping.is_set():
            try:
                now = self.clock.now()
                if await self.deliveries.reclaim(now):
                    self.wake()
                await self.deliveries.prune(now, cfg.keep_delivered)
            except DatabaseUnavailable as exc:
                log.warning("webhooks_database_unavailable", error=str(exc))
            except Exception:
                log.exception("webhooks_maintenance_failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=min(MAINTENANCE_SECONDS, cfg.lease / 2))
