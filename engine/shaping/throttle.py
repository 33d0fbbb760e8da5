"""Limits that hold across worker processes and hosts: token buckets and connection slots in Postgres.

Why Postgres: every worker on every host already shares it, its clock is one
clock for all of them, and a row lock makes a take atomic. Why leases: one
round trip per message would cap throughput at the database's latency, so a
worker takes a few tokens at a time (``rate x token_horizon``, 200 ms of
traffic by default) and spends them locally. Tokens it could not spend soon
expire unused (never saved for a later burst), so the measured rate over a
window never exceeds ``rate x window + burst`` whatever the number of workers.

Connection caps: every open connection is backed by a lease row
``(key, slot)`` with ``slot < limit``, so the number of connections to a
(site, source), or to a whole provider, can never exceed its limit across
processes. Leases are renewed while used and expire when their worker dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import asyncpg
import structlog

from engine.db.pool import acquire
from engine.db.queries import q
from engine.errors import DatabaseUnavailable

log = structlog.get_logger(__name__)

BURST_SECONDS = 1.0  # a bucket holds one second of traffic (at least one token)
_RETRY_AFTER_ERROR = 0.5


def burst_for(rate: float) -> float:
    return max(1.0, rate * BURST_SECONDS)


@dataclass
class _Local:
    tokens: int = 0
    expires: float = 0.0
    retry_at: float = 0.0
    fetching: asyncio.Future[None] | None = None


class TokenBuckets:
    """Shared token buckets, leased in small batches; see the module docstring."""

    def __init__(self, pool: asyncpg.Pool, horizon: float = 0.2, clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.horizon = horizon
        self.hold = max(0.5, 2 * horizon)
        self.clock = clock
        self._local: dict[str, _Local] = {}
        self.round_trips = 0

    def _want(self, rate: float) -> int:
        return max(1, min(100, math.ceil(rate * self.horizon)))

    async def _fetch(self, key: str, rate: float, loc: _Local) -> None:
        if loc.fetching is not None:
            await asyncio.shield(loc.fetching)
            return
        loc.fetching = asyncio.get_running_loop().create_future()
        try:
            try:
                async with acquire(self.pool) as conn:
                    row = await conn.fetchrow(
                        *q("throttle_take", key=key, want=self._want(rate), rate=rate, burst=burst_for(rate))
                    )
                self.round_trips += 1
            except DatabaseUnavailable as exc:
                # No token without the shared store: a cap must hold even when Postgres is away.
                log.warning("throttle_unavailable", key=key, error=str(exc))
                loc.retry_at = self.clock() + _RETRY_AFTER_ERROR
                return
            assert row is not None  # an upsert with RETURNING always returns its row
            now = self.clock()
            loc.tokens = int(row["granted"])
            loc.expires = now + self.hold
            if loc.tokens == 0:
                # Come back when a whole lease is there, not for every single token: fewer round trips.
                need = min(self._want(rate), burst_for(rate))
                loc.retry_at = now + max(0.005, (need - row["tokens"]) / max(row["rate"], 1e-9))
        finally:
            loc.fetching.set_result(None)
            loc.fetching = None

    async def ensure(self, key: str, rate: float) -> float:
        """Make one token of ``key`` available locally (not spent); 0 when there is, else seconds to wait."""
        loc = self._local.get(key)
        if loc is None:
            loc = self._local[key] = _Local()
        now = self.clock()
        if loc.tokens > 0 and loc.expires > now:
            return 0.0
        if loc.retry_at > now:
            return loc.retry_at - now
        await self._fetch(key, rate, loc)
        now = self.clock()
        if loc.tokens > 0 and loc.expires > now:
            return 0.0
        return max(0.005, loc.retry_at - now)

    def spend(self, key: str) -> None:
        loc = self._local[key]
        loc.tokens -= 1

    async def ensure_all(self, needs: Sequence[tuple[str, float]]) -> float:
        """A token of every bucket in ``needs`` available locally: 0, else seconds to wait."""
        for key, rate in needs:
            wait = await self.ensure(key, rate)
            if wait > 0:
                return wait
        return 0.0

    def ready(self, needs: Sequence[tuple[str, float]]) -> bool:
        """Synchronous re-check right before spending: another task may have spent the last token."""
        now = self.clock()
        return all((loc := self._local.get(key)) is not None and loc.tokens > 0 and loc.expires > now
                   for key, _ in needs)

    async def take_all(self, needs: Sequence[tuple[str, float]]) -> float:
        """One token from every bucket in ``needs`` or none: 0 on success, else seconds to wait."""
        wait = await self.ensure_all(needs)
        if wait > 0:
            return wait
        if not self.ready(needs):
            return 0.005
        for key, _ in needs:
            self.spend(key)
        return 0.0


# --------------------------------------------------------------------------- connection slots

PathId = tuple[str, str | None]  # the SMTP pool's key: (site, source address)


@dataclass
class _Path:
    keys: list[tuple[str, int]] = field(default_factory=list)  # (lease key, limit) for this path
    held: list[list[tuple[str, int]]] = field(default_factory=list)  # per slot: [(key, slot), ...]
    busy: int = 0
    share: int = 1 << 30  # fair share of this worker when others wait for the same keys
    retry_at: float = 0.0
    waiting: bool = False  # a job of this path is waiting for its first slot
    acquiring: asyncio.Lock = field(default_factory=asyncio.Lock)


class ConnectionSlots:
    """Connection leases of one worker, per SMTP pool key; see the module docstring."""

    def __init__(
        self, pool: asyncpg.Pool, owner: str, ttl: float = 15.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.pool = pool
        self.owner = owner
        self.ttl = ttl
        self.clock = clock
        self.paths: dict[PathId, _Path] = {}

    def held(self, path: PathId) -> int:
        p = self.paths.get(path)
        return len(p.held) if p else 0

    def usable(self, path: PathId) -> int:
        """Connections this worker may have open on ``path``: its slots, down to its fair share."""
        p = self.paths.get(path)
        return max(1, min(len(p.held), p.share)) if p else 1

    async def ensure(
        self, path: PathId, keys: list[tuple[str, int]], want_more: bool,
        before_acquire: Callable[[], Awaitable[float]] | None = None,
    ) -> float:
        """Hold at least one slot for ``path`` (and one more when all are busy); 0 or seconds to wait.

        ``before_acquire`` (a ``max_connection_rate`` token) is asked before each new lease.
        """
        p = self.paths.setdefault(path, _Path())
        p.keys = keys
        if p.held and not (want_more and p.busy >= len(p.held) and len(p.held) < p.share):
            return 0.0
        if self.clock() < p.retry_at:
            return 0.0 if p.held else p.retry_at - self.clock()
        async with p.acquiring:
            if p.held and p.busy < len(p.held):
                return 0.0
            if before_acquire is not None:
                wait = await before_acquire()
                if wait > 0:
                    p.retry_at = self.clock() + wait
                    return 0.0 if p.held else wait
            got = await self._acquire(keys, starving=not p.held)
        if got is not None:
            p.held.append(got)
            p.waiting = False
            return 0.0
        p.retry_at = self.clock() + 0.1
        p.waiting = not p.held
        return 0.0 if p.held else 0.1

    async def _acquire(self, keys: list[tuple[str, int]], starving: bool = False) -> list[tuple[str, int]] | None:
        """One slot under every key, all in one transaction, or none (then say we wait, when we have none)."""
        missing = ""
        try:
            async with acquire(self.pool) as conn:
                try:
                    async with conn.transaction():
                        got = []
                        for key, limit in keys:
                            slot = await conn.fetchval(
                                *q("connection_lease_acquire", key=key, owner=self.owner, limit=limit, ttl=self.ttl)
                            )
                            if slot is None:
                                missing = key
                                raise _NoSlot
                            got.append((key, slot))
                        return got
                except _NoSlot:
                    if starving:
                        await conn.execute(*q("connection_wait", key=missing, owner=self.owner, seconds=3.0))
                    return None
        except DatabaseUnavailable as exc:
            log.warning("connection_lease_unavailable", error=str(exc))
            return None

    def begin(self, path: PathId) -> None:
        self.paths[path].busy += 1

    def end(self, path: PathId) -> None:
        self.paths[path].busy -= 1

    async def maintain(
        self, open_counts: Callable[[PathId], int], trim_idle: Callable[[PathId, int], int] | None = None
    ) -> None:
        """Give back slots no connection uses; renew the rest (and drop those a reload put over a limit).

        When a path waits for a slot under a key another path holds (two sites of one
        provider, in this worker), or other workers wait (our fair share shrank), idle
        connections of the holders are closed; their slots are given back on the next
        pass, once the sessions are really gone, so a cap is never exceeded meanwhile.
        """
        release: list[tuple[str, int]] = []
        renew: list[tuple[str, int, int]] = []
        await self._update_shares()
        if trim_idle is not None:
            wanted = {k for p in self.paths.values() if p.waiting and not p.held for k, _ in p.keys}
            for path, p in self.paths.items():
                if not p.held or p.busy >= len(p.held):
                    continue  # nothing idle to give up
                if any(k in wanted for k, _ in p.keys):
                    trim_idle(path, p.busy)  # a path of ours waits on the same key: free all idle
                elif len(p.held) > p.share:
                    trim_idle(path, max(p.busy, p.share))  # other workers wait: down to our share
        for path, p in self.paths.items():
            opened = open_counts(path)
            keep = max(opened, min(p.busy, p.share))
            while len(p.held) > keep:
                release.extend(p.held.pop())
            limits = dict(p.keys)
            for slot in p.held:
                renew.extend((k, s, limits.get(k, s + 1)) for k, s in slot)
        try:
            async with acquire(self.pool) as conn:
                if release:
                    await conn.execute(*q("connection_lease_release", owner=self.owner,
                                          keys=[k for k, _ in release], slots=[s for _, s in release]))
                if renew:
                    rows = await conn.fetch(*q("connection_lease_renew", owner=self.owner, ttl=self.ttl,
                                               keys=[r[0] for r in renew], slots=[r[1] for r in renew],
                                               limits=[r[2] for r in renew]))
                    alive = {(r["key"], r["slot"]) for r in rows}
                    lost: list[tuple[str, int]] = []
                    for p in self.paths.values():
                        kept = [slot for slot in p.held if all(ks in alive for ks in slot)]
                        for slot in p.held:
                            if slot not in kept:
                                lost.extend(slot)  # renewed parts and the refused part alike
                        p.held = kept
                    if lost:
                        await conn.execute(*q("connection_lease_release", owner=self.owner,
                                              keys=[k for k, _ in lost], slots=[s for _, s in lost]))
        except DatabaseUnavailable as exc:
            log.warning("connection_lease_maintenance_failed", error=str(exc))
        for path in [path for path, p in self.paths.items() if not p.held and not p.busy]:
            del self.paths[path]

    async def _update_shares(self) -> None:
        """Fair share per path: ceil(limit / workers holding or wanting), for the tightest key."""
        keys = sorted({k for p in self.paths.values() if p.held for k, _ in p.keys})
        if not keys:
            return
        try:
            async with acquire(self.pool) as conn:
                rows = await conn.fetch(*q("connection_sharers", keys=keys))
        except DatabaseUnavailable:
            return
        sharers = {r["key"]: r["sharers"] for r in rows}
        for p in self.paths.values():
            p.share = min((max(1, math.ceil(limit / max(1, sharers.get(k, 1)))) for k, limit in p.keys),
                          default=1 << 30)

    async def release_all(self) -> None:
        with contextlib.suppress(DatabaseUnavailable):
            async with acquire(self.pool) as conn:
                await conn.execute(*q("connection_lease_release_owner", owner=self.owner))
        self.paths.clear()


class _NoSlot(Exception):
    pass
