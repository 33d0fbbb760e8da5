"""Failed authentications, limited per client address and counted.

Both doors that take an API key (HTTP ``Authorization: Bearer`` and SMTP ``AUTH``) report each
failure here: an unknown, revoked or expired key, or a key used from outside its allowlist.
A client address with ``[api] auth_failures_per_minute`` failures in the last 60 seconds is
refused before its key is even looked up (HTTP 429 with ``Retry-After``, SMTP ``454 4.7.0``)
until the oldest of them leaves the window, so guessing keys costs a minute per few tries.
A success does not wipe the slate: it would let a guesser interleave.

IPv6 clients are counted per /64 (one host usually holds a whole /64). The state is in this
process's memory (HTTP and SMTP intake run in the engine's main process, so one limiter sees
both); it is bounded: addresses whose failures have all aged out are dropped.

Counters for metrics: :func:`counts` returns ``{(transport, outcome): n}`` since the process
started, ``transport`` ``http``/``smtp``, ``outcome`` ``failed`` (a refused credential) or
``rate_limited`` (refused before the lookup).
"""

from __future__ import annotations

import collections
import ipaddress
import time
from collections.abc import Callable

from engine import metrics

WINDOW = 60.0
MAX_TRACKED = 50_000
"""Addresses tracked at once; past it, those with no failure in the window are forgotten."""

_COUNTS: collections.Counter[tuple[str, str]] = collections.Counter()


def counts() -> dict[tuple[str, str], int]:
    """Failed and rate-limited authentications in this process, by (transport, outcome)."""
    return dict(_COUNTS)


def client_key(ip: str | None) -> str:
    """What failures are counted against: the address, or its /64 for IPv6."""
    if not ip:
        return "unknown"
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


class AuthFailures:
    """A sliding window of failure times per client; ``per_minute`` 0 disables the limit (counting goes on)."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._seen: dict[str, collections.deque[float]] = {}

    def retry_after(self, ip: str | None) -> float:
        """Seconds until ``ip`` may try again; 0 when it may now."""
        if self.per_minute <= 0:
            return 0.0
        times = self._seen.get(client_key(ip))
        if not times:
            return 0.0
        now = self.clock()
        while times and times[0] <= now - WINDOW:
            times.popleft()
        if len(times) < self.per_minute:
            return 0.0
        return max(0.001, times[-self.per_minute] + WINDOW - now)

    def refused(self, transport: str) -> None:
        """Count a request refused because its client is over the limit."""
        _COUNTS[(transport, "rate_limited")] += 1

    def failed(self, ip: str | None, transport: str) -> None:
        """Count one failed authentication from ``ip`` over ``transport`` (``http`` or ``smtp``)."""
        _COUNTS[(transport, "failed")] += 1
        metrics.inc(metrics.get().auth_failures, door=transport)
        if self.per_minute <= 0:
            return
        now = self.clock()
        key = client_key(ip)
        times = self._seen.get(key)
        if times is None:
            if len(self._seen) >= MAX_TRACKED:
                self._forget_old(now)
            times = self._seen[key] = collections.deque(maxlen=self.per_minute)
        times.append(now)

    def _forget_old(self, now: float) -> None:
        stale = [k for k, t in self._seen.items() if not t or t[-1] <= now - WINDOW]
        for k in stale:
            del self._seen[k]
        if len(self._seen) >= MAX_TRACKED:  # a flood from many live addresses: start over rather than grow
            self._seen.clear()
