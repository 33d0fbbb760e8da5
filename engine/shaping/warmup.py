"""Warm-up ramps: a new IP or sending domain earns its volume one healthy day at a time.

Why: mailbox providers judge a cold IP or domain by its first weeks; a burst
from nowhere gets throttled or junked. A ramp (``[warmup.<name>]`` in the
shaping file) is a schedule of daily caps. Its state lives in Postgres
(``warmup_state``: step, day, today's count and outcomes), so every worker on
every host shares one cap. When a day ends, the ramp advances one step only if
that day was healthy (enough volume, delivered ratio and complaint rate within
bounds) and otherwise holds. Traffic beyond today's cap is not dropped nor
bounced: it goes back to the queue untried (or spills to another pool when
``spill_pool`` is set). A day's cap is also spread over ``spread_over`` (a
token bucket of rate ``cap / spread_over``), so it does not all go at midnight.

The day comes from an injectable clock (``clock() -> datetime``, UTC), so
tests can live through a week in a second.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import structlog

from engine.db.pool import acquire
from engine.db.queries import q
from engine.errors import DatabaseUnavailable
from engine.shaping.limits import Shaping
from engine.shaping.rules import WarmupBlock

log = structlog.get_logger(__name__)

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class Unit:
    """One ramp applied to one subject (a source name or sending domain, optionally per provider)."""

    name: str
    subject: str
    provider: str | None
    block: WarmupBlock

    @property
    def key(self) -> str:
        return f"{self.name}:{self.subject}" + (f":{self.provider}" if self.provider else "")


def units_for(shaping: Shaping, source: str, sending_domain: str, provider: str | None) -> list[Unit]:
    """The ramps that apply to a message leaving ``source`` from ``sending_domain`` to ``provider``."""
    out = []
    for name, w in shaping.file.warmup.items():
        if w.providers and provider not in w.providers:
            continue
        per_provider = provider if w.providers else None
        if source in w.sources:
            out.append(Unit(name, source, per_provider, w))
        if sending_domain and sending_domain in w.sending_domains:
            out.append(Unit(name, sending_domain, per_provider, w))
    return out


@dataclass
class _Local:
    units: int = 0
    day: dt.date | None = None
    cap: int = 0
    step: int = 0
    exhausted_day: dt.date | None = None
    delivered: int = 0
    failed: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one reservation round trip at a time


@dataclass
class Verdict:
    ok: bool
    wait: float = 0.0  # seconds until trying again makes sense
    reason: str = ""
    rate: float = 0.0  # today's spread rate (tokens/s) for the unit's bucket


class WarmupCounters:
    """Reserves today's cap in small batches from ``warmup_state``; see the module docstring."""

    def __init__(self, pool: asyncpg.Pool, clock: Clock = utc_now, batch: int = 5) -> None:
        self.pool = pool
        self.clock = clock
        self.batch = batch
        self._local: dict[str, _Local] = {}

    def today(self) -> dt.date:
        return self.clock().astimezone(dt.UTC).date()

    def seconds_to_tomorrow(self) -> float:
        now = self.clock().astimezone(dt.UTC)
        tomorrow = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
        return (tomorrow - now).total_seconds()

    def spread_rate(self, unit: Unit) -> float:
        loc = self._local.get(unit.key)
        cap = loc.cap if loc and loc.cap else unit.block.schedule[0]
        return cap / max(1.0, unit.block.spread_over)

    async def ensure(self, unit: Unit) -> Verdict:
        """Have one unit of today's cap reserved locally (not spent)."""
        loc = self._local.setdefault(unit.key, _Local())
        today = self.today()
        if loc.day != today:
            loc.units = 0
            loc.day = today
        if loc.units > 0:
            return Verdict(True, rate=self.spread_rate(unit))
        async with loc.lock:
            if loc.units > 0 and loc.day == today:
                return Verdict(True, rate=self.spread_rate(unit))
            if loc.exhausted_day == today:
                return Verdict(False, self.seconds_to_tomorrow(), f"warm-up {unit.key}: today's cap {loc.cap} reached")
            try:
                row = await self._take(unit, today)
            except DatabaseUnavailable as exc:
                return Verdict(False, 1.0, f"warm-up state unavailable: {exc}")
            loc.units, loc.step, loc.cap = int(row["granted"]), int(row["step"]), int(row["cap"])
        if loc.units == 0:
            loc.exhausted_day = today
            return Verdict(False, self.seconds_to_tomorrow(), f"warm-up {unit.key}: today's cap {loc.cap} reached")
        return Verdict(True, rate=self.spread_rate(unit))

    async def _take(self, unit: Unit, today: dt.date) -> asyncpg.Record:
        b = unit.block
        async with acquire(self.pool) as conn:
            for _ in range(2):
                row = await conn.fetchrow(*q("warmup_take", key=unit.key, today=today, want=self.batch,
                                             schedule=b.schedule))
                if row is not None:
                    return row
                rolled = await conn.fetchrow(*q(
                    "warmup_roll", key=unit.key, today=today, schedule=b.schedule, subject=unit.subject,
                    min_volume=b.min_daily_volume, min_delivered_ratio=b.min_delivered_ratio,
                    max_complaint_rate=b.max_complaint_rate,
                ))
                if rolled is not None:
                    log.info("warmup_day_rolled", key=unit.key, step=rolled["step"], health=rolled["last_health"])
        raise DatabaseUnavailable(f"warm-up state for {unit.key} could not be read")

    def available(self, unit: Unit) -> bool:
        loc = self._local.get(unit.key)
        return loc is not None and loc.units > 0 and loc.day == self.today()

    def spend(self, unit: Unit) -> None:
        self._local[unit.key].units -= 1

    def record(self, unit: Unit, delivered: int, failed: int) -> None:
        loc = self._local.setdefault(unit.key, _Local())
        loc.delivered += delivered
        loc.failed += failed

    async def flush(self) -> None:
        """Write today's outcome counts (one statement for every ramp)."""
        keys = [k for k, v in self._local.items() if v.delivered or v.failed]
        if not keys:
            return
        counts = {k: (self._local[k].delivered, self._local[k].failed) for k in keys}
        for k in keys:
            self._local[k].delivered = self._local[k].failed = 0
        try:
            async with acquire(self.pool) as conn:
                await conn.execute(*q("warmup_record", today=self.today(), keys=keys,
                                      delivered=[counts[k][0] for k in keys], failed=[counts[k][1] for k in keys]))
        except DatabaseUnavailable:
            for k in keys:  # keep them for the next flush
                self._local[k].delivered += counts[k][0]
                self._local[k].failed += counts[k][1]

    def state(self) -> dict[str, dict[str, object]]:
        return {k: {"step": v.step, "cap": v.cap, "local_units": v.units} for k, v in self._local.items()}

