"""Admission: may this worker start a transaction to this (destination, source) now?

The scheduler asks :meth:`Gate.admit` right before each SMTP transaction. A
yes means every limit that applies holds a unit for it: today's warm-up cap,
a connection slot, and one token of each rate (per (site, source), per
provider or destination overall, the warm-up's spread). A no carries how long
to wait, so the scheduler parks only that destination (no head-of-line
blocking) and claims skip it meanwhile; a long wait (a warm-up cap reached
for today) tells the scheduler to give the job back to the queue untried.

The shaping file can be swapped at any time (:meth:`Gate.reload`); the next
admission uses the new limits. The gate keeps the sha256 of the bytes it
applied (:attr:`Gate.digest`): the worker publishes it in ``workers`` so
``engine reload`` can confirm which workers run the file it validated. Open connections are never dropped by a
reload: a lowered connection limit is reached as connections retire.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from engine import metrics
from engine.shaping.automation import Decisions, evaluate_health
from engine.shaping.limits import EffectiveLimits, Shaping
from engine.shaping.rules import ShapingError, ShapingSettings, parse_shaping
from engine.shaping.throttle import ConnectionSlots, PathId, TokenBuckets
from engine.shaping.warmup import Clock, Unit, WarmupCounters, units_for, utc_now

log = structlog.get_logger(__name__)


@dataclass
class Admission:
    ok: bool
    wait: float = 0.0
    reason: str = ""
    postpone: bool = False  # the wait is long: hand the job back to the queue
    path: PathId = ("", None)
    units: list[Unit] = field(default_factory=list)
    connection_limit: int | None = None
    max_deliveries_per_connection: int | None = None
    spill_pool: str | None = None  # a warm-up cap was reached and names a pool to send from instead


def read_shaping(path: str | Path) -> tuple[Shaping, str]:
    """Validate a shaping file and return it with the sha256 of exactly the bytes validated.

    One read for both, so the digest a worker publishes (and ``engine reload`` compares)
    always describes the limits in force, even if the file changes meanwhile.
    Raises :class:`ShapingError` listing every problem.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ShapingError(str(p), ["file does not exist"]) from None
    except OSError as exc:
        raise ShapingError(str(p), [f"cannot read: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ShapingError(str(p), [f"not UTF-8 text: {exc.reason} at byte {exc.start}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ShapingError(str(p), [f"not valid TOML: {exc}"]) from None
    return Shaping(parse_shaping(data, str(p)), str(p)), hashlib.sha256(raw).hexdigest()


class Gate:
    """Shaping for one worker process: limits from the file, live state in Postgres."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        owner: str,
        shaping: Shaping,
        config: ShapingSettings | None = None,
        *,
        default_connection_limit: int = 10,
        path: Path | None = None,
        clock: Clock = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
        digest: str | None = None,
    ) -> None:
        self.config = config or ShapingSettings()
        self.shaping = shaping
        self.path = path
        # What is in force: sha256 of the applied file (None when not read by read_shaping), since when,
        # and why the last reload was refused (None after a success).
        self.digest = digest
        self.applied_at = clock()
        self.reload_error: str | None = None
        self._clock = clock
        self.default_connection_limit = default_connection_limit
        self.buckets = TokenBuckets(pool, self.config.token_horizon, monotonic)
        self.slots = ConnectionSlots(pool, owner, self.config.connection_lease_ttl, monotonic)
        self.warmup = WarmupCounters(pool, clock)
        self.pool = pool
        self.decisions = Decisions(pool, shaping.file.default.health.refresh)
        self.reloads = 0
        self._health_at = 0.0
        self._first_health: asyncio.Future[None] | None = None

    # -- limits ---------------------------------------------------------------------------

    def limits(self, domain: str, site: str, mx_hosts: tuple[str, ...], source: str) -> EffectiveLimits:
        """The file's limits under the automation decisions in force (reduced rates, capped connections)."""
        return self.decisions.apply(self.shaping.limits(domain, site, mx_hosts, source)).limits

    def reload(self) -> bool:
        """Re-read the shaping file; an invalid file is refused (logged) and the old one stays."""
        if self.path is None:
            return False
        try:
            new, digest = read_shaping(self.path)
        except ShapingError as exc:
            log.error("shaping_reload_refused", file=str(self.path), problems=exc.problems)
            self.reload_error = "; ".join(exc.problems) or str(exc)
            return False
        self.shaping = new
        self.digest, self.applied_at, self.reload_error = digest, self._clock(), None
        self.decisions.refresh = new.file.default.health.refresh
        self.reloads += 1
        log.info("shaping_reloaded", file=str(self.path), providers=len(new.file.provider), digest=digest)
        return True

    # -- admission ------------------------------------------------------------------------

    async def admit(
        self, lim: EffectiveLimits, path: PathId, sending_domain: str, stream: str = "", campaign: str = ""
    ) -> Admission:
        if self._first_health is None:  # a fresh worker knows the pauses in force before it sends anything
            self._first_health = asyncio.ensure_future(self._safe_health())
        await asyncio.shield(self._first_health)
        await self.decisions.maybe_refresh()
        verdict = self.decisions.apply(lim, stream, campaign, self.shaping.file.default.health.bulk_streams)
        if verdict.blocked:
            # Suspended provider, paused bulk, held campaign: hand the rows back untried (like a warm-up cap).
            return Admission(False, max(verdict.wait, 0.05), verdict.blocked, postpone=True)
        units = units_for(self.shaping, lim.source, sending_domain, lim.provider)
        spread: list[tuple[str, float]] = []
        for unit in units:
            v = await self.warmup.ensure(unit)
            if not v.ok:
                return Admission(
                    False, v.wait, v.reason, postpone=v.wait > self.config.max_hold, spill_pool=unit.block.spill_pool
                )
            spread.append((f"warm:{unit.key}", v.rate))
        keys = [(lim.conn_key, lim.connection_limit or self.default_connection_limit)]
        if lim.provider_connection_limit:
            keys.append((lim.group_conn_key, lim.provider_connection_limit))
        before = None
        if lim.max_connection_rate is not None:
            rate = lim.max_connection_rate.per_second
            key = lim.conn_rate_key

            async def before() -> float:
                return await self.buckets.take_all([(key, rate)])

        wait = await self.slots.ensure(path, keys, want_more=True, before_acquire=before)
        if wait > 0:
            metrics.inc(metrics.get().throttle_waits, provider=metrics.provider_label(lim.provider or ""))
            return Admission(False, wait, "connection limit reached")
        needs = list(spread)
        if lim.max_message_rate is not None:
            needs.append((lim.rate_key, lim.max_message_rate.per_second))
        if lim.provider_max_message_rate is not None:
            needs.append((lim.group_rate_key, lim.provider_max_message_rate.per_second))
        if needs:
            wait = await self.buckets.ensure_all(needs)
            if wait > 0:
                metrics.inc(metrics.get().throttle_waits, provider=metrics.provider_label(lim.provider or ""))
                return Admission(False, wait, "message rate", postpone=wait > self.config.max_hold)
        # Everything above awaited: check and spend without yielding, so two tasks never spend one unit.
        if not self.buckets.ready(needs) or not all(self.warmup.available(u) for u in units):
            return Admission(False, 0.005, "raced for the last unit")
        for key, _ in needs:
            self.buckets.spend(key)
        for unit in units:
            self.warmup.spend(unit)
        self.slots.begin(path)
        return Admission(
            True, path=path, units=units, connection_limit=self.slots.usable(path),
            max_deliveries_per_connection=lim.max_deliveries_per_connection,
        )

    def done(self, adm: Admission, delivered: int, failed: int) -> None:
        """The transaction ended: free its busy mark, count its outcome for the warm-up's health."""
        self.slots.end(adm.path)
        for unit in adm.units:
            self.warmup.record(unit, delivered, failed)

    # -- background -----------------------------------------------------------------------

    async def maintain(
        self,
        stop: asyncio.Event,
        open_counts: Callable[[PathId], int],
        every: float = 2.0,
        trim_idle: Callable[[PathId, int], int] | None = None,
    ) -> None:
        """Renew or give back connection leases and write warm-up outcome counts, until ``stop``."""
        while not stop.is_set():
            every_now = min(every, self.shaping.file.default.health.evaluate_every)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every_now)
            try:
                await self.slots.maintain(open_counts, trim_idle)
                await self.warmup.flush()
                await self.check_health()
            except Exception:  # never let the maintenance loop die: leases would run out
                log.exception("shaping_maintenance_failed")

    async def check_health(self, force: bool = False) -> None:
        """Complaint-rate and campaign bounce-rate pauses, every ``[default.health] evaluate_every``."""
        cfg = self.shaping.file.default.health
        if not force and time.monotonic() - self._health_at < cfg.evaluate_every:
            return
        self._health_at = time.monotonic()
        for d in await evaluate_health(self.pool, cfg):
            self.decisions.add(d)

    async def _safe_health(self) -> None:
        try:
            await self.check_health(force=True)
        except Exception:  # the periodic check retries; admission must not fail on it
            log.exception("automation_health_check_failed")

    async def close(self) -> None:
        await self.warmup.flush()
        await self.slots.release_all()


def describe(adm: Admission) -> dict[str, Any]:
    return {"ok": adm.ok, "wait": round(adm.wait, 3), "reason": adm.reason, "postpone": adm.postpone}
