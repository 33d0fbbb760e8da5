"""The connection pool: SMTP sessions kept open and reused, per ``(site, source address)``.

Why a pool: opening a TCP connection, reading the banner, EHLO and STARTTLS
cost several round trips and a TLS handshake; providers also judge senders by
how many connections they open. So connections are keyed by
``(site, source address)``, reused for up to ``max_deliveries_per_connection``
transactions, capped at ``connection_limit`` per key, closed after
``idle_timeout`` seconds unused, and dropped as soon as they break.

Sessions are opened by :class:`~engine.deliver.smtp.connect.Connector` and
each message runs as one :class:`~engine.deliver.smtp.transaction.Transaction`;
this module only lends, takes back, retires and counts connections.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from collections.abc import Iterable

import aiosmtplib
import structlog

from engine import metrics
from engine.deliver.hop import Hop
from engine.deliver.smtp.connect import AllHopsFailed, Connector
from engine.deliver.smtp.connection import Connection, PoolKey
from engine.deliver.smtp.reply import parse_enhanced_status
from engine.deliver.smtp.results import OutboundMessage, TransactionResult
from engine.deliver.smtp.settings import SmtpClientSettings, TlsPolicy
from engine.deliver.smtp.transaction import StaleConnection, Transaction, check_envelope

log = structlog.get_logger(__name__)


class _Site:
    """Pool state for one (site, source) key."""

    __slots__ = ("idle", "open", "waiters", "limit", "max_deliveries", "label")

    def __init__(self, limit: int = 10, max_deliveries: int = 100) -> None:
        self.label = "other"  # the shaping provider, for the connections-open gauge
        self.idle: list[Connection] = []
        self.open = 0  # connecting + in use + idle + quitting
        self.waiters: deque[asyncio.Future[None]] = deque()
        # The latest caller's limits (shaping may change them per call; see ConnectionPool.send).
        self.limit = limit
        self.max_deliveries = max_deliveries

    def wake_one(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return


class ConnectionPool:
    """Pooled SMTP connections and the transaction that uses them.

    ``send()`` is the one entry point: it borrows (or opens, walking the MX
    hops in order) a connection for ``(site, source)``, runs one transaction
    for the message and returns a :class:`TransactionResult`; it never raises
    for anything the network or the server did. Use as ``async with`` (or
    call :meth:`close`) so idle sessions end with a QUIT.
    """

    def __init__(
        self, settings: SmtpClientSettings | None = None, *, tls_context: ssl.SSLContext | None = None
    ) -> None:
        """``tls_context`` verifies certificates for ``required`` TLS (default: system CAs + ``ca_file``)."""
        self.settings = settings or SmtpClientSettings()
        self._connector = Connector(self.settings, tls_context)
        self._sites: dict[PoolKey, _Site] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._default_ehlo = self.settings.ehlo_name

    async def __aenter__(self) -> ConnectionPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def trim_idle(self, key: PoolKey, keep: int) -> int:
        """QUIT idle connections of ``key`` until at most ``keep`` stay open; returns how many.

        Shaping calls this when another destination of the same provider waits for a
        connection slot: an idle pooled connection must not hold a provider-wide slot
        until its idle timeout while other mail waits.
        """
        site = self._sites.get(key)
        n = 0
        while site is not None and site.idle and site.open - n > keep:
            conn = site.idle.pop()
            if conn.idle_handle is not None:
                conn.idle_handle.cancel()
                conn.idle_handle = None
            self._retire(conn)
            n += 1
        return n

    def open_for(self, key: PoolKey) -> int:
        """Connections counted against the limit of one ``(site, source)`` key."""
        s = self._sites.get(key)
        return s.open if s is not None else 0

    def open_connections(self, site: str | None = None) -> int:
        """Connections counted against the limits (all keys, or one site's)."""
        return sum(s.open for (k, _), s in self._sites.items() if site is None or k == site)

    async def close(self) -> None:
        """QUIT every idle connection and wait for it; in-use ones are closed on release."""
        self._closing = True
        for site in self._sites.values():
            while site.idle:
                self._retire(site.idle.pop())
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- public: one message ------------------------------------------------

    async def send(
        self,
        hops: Iterable[Hop | tuple[str, str, int]],
        message: OutboundMessage,
        *,
        source: str | None = None,
        ehlo_name: str | None = None,
        tls: TlsPolicy | None = None,
        site: str | None = None,
        connection_limit: int | None = None,
        max_deliveries_per_connection: int | None = None,
        provider: str = "",
    ) -> TransactionResult:
        """Deliver ``message`` to the first hop that takes a connection.

        ``hops`` are :class:`~engine.deliver.hop.Hop` values in MX preference
        order (a route's ``hops`` as they are; ``(mx_host, address, port)``
        tuples are accepted too); on a
        transport failure before the session is ready (refused, timeout, 421
        banner, STARTTLS required but missing) the next hop is tried, like an
        MTA walks its MX list. ``source`` binds the local address and is part
        of the pool key with ``site`` (default: the hop list itself).
        ``connection_limit`` and ``max_deliveries_per_connection`` override
        the settings for this key from now on (traffic shaping sets them per
        destination and source; a lower limit is reached as connections retire).
        """
        started = time.monotonic()
        hop_list = [h if isinstance(h, Hop) else Hop(*h) for h in hops]
        policy: TlsPolicy = tls or self.settings.enable_tls
        if policy not in ("opportunistic", "required", "disabled"):
            raise ValueError(f"unknown TLS policy {policy!r}: use opportunistic, required or disabled")
        problem = check_envelope(message)
        if problem is not None:
            return TransactionResult.for_all(message, None, problem, "local", kind="permanent", started=started)
        if not hop_list:
            return TransactionResult.for_all(message, None, "no MX host to deliver to", "local", started=started)
        key = (site or ",".join(f"{h.address}:{h.port}" for h in hop_list), source)
        pool_site = self._sites.get(key)
        if pool_site is None:
            pool_site = self._sites[key] = _Site(self.settings.connection_limit, self.settings.max_deliveries_per_connection)
            pool_site.label = metrics.provider_label(provider)
        new_limit = connection_limit or self.settings.connection_limit
        for _ in range(max(0, new_limit - pool_site.limit)):
            pool_site.wake_one()  # callers waiting for a slot may now open one
        pool_site.limit = new_limit
        pool_site.max_deliveries = max_deliveries_per_connection or self.settings.max_deliveries_per_connection
        if self._default_ehlo is None:
            self._default_ehlo = await asyncio.to_thread(socket.getfqdn)
        helo = ehlo_name or self._default_ehlo
        fallback: TransactionResult | None = None
        for _attempt in range(2):
            try:
                conn, reused = await self._acquire(key, hop_list, source, helo, policy)
            except AllHopsFailed as failed:
                last = failed.failures[-1]
                text = "; ".join(f.text for f in failed.failures)
                result = TransactionResult.for_all(
                    message,
                    last.code,
                    text,
                    last.phase,
                    started=started,
                    enhanced=parse_enhanced_status(last.text.split(" ", 1)[1]) if last.code else None,
                )
                log.info(
                    "smtp.transaction",
                    site=key[0],
                    host=None,
                    code=last.code,
                    reply=text,
                    duration_ms=round(result.duration * 1000, 1),
                    recipients=len(message.rcpt_tos),
                )
                return result
            try:
                result = await Transaction(conn, message, self.settings, reused=reused, started=started).run()
            except StaleConnection as stale:
                fallback = stale.fallback
                self._release(conn)
                log.info("smtp.stale_connection", site=key[0], host=conn.label)
                continue
            except BaseException:
                conn.broken = True
                self._release(conn)
                raise
            self._release(conn)
            return result
        assert fallback is not None
        return fallback

    # -- pool mechanics -------------------------------------------------------

    async def _acquire(
        self, key: PoolKey, hops: list[Hop], source: str | None, helo: str, policy: TlsPolicy
    ) -> tuple[Connection, bool]:
        site = self._sites[key]
        loop = asyncio.get_running_loop()
        while True:
            while site.idle:
                conn = site.idle.pop()
                if conn.idle_handle is not None:
                    conn.idle_handle.cancel()
                    conn.idle_handle = None
                if conn.alive and conn.fits(policy):
                    return conn, True
                if conn.alive:
                    self._retire(conn)
                else:
                    self._drop(conn)
            if site.open < site.limit:
                site.open += 1
                metrics.get().connections.labels(provider=site.label).inc()
                break
            fut: asyncio.Future[None] = loop.create_future()
            site.waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    site.wake_one()  # pass our turn on
                raise
        try:
            conn = await self._connector.connect_any(key, hops, source, helo, policy)
        except BaseException:
            site.open -= 1
            metrics.get().connections.labels(provider=site.label).dec()
            site.wake_one()
            raise
        return conn, False

    def _release(self, conn: Connection) -> None:
        """Give a connection back: idle it, retire it (QUIT) or drop it. Never blocks."""
        site = self._sites[conn.key]
        if not conn.alive:
            self._drop(conn)
        elif self._closing or conn.deliveries >= site.max_deliveries or site.open > site.limit:
            # (over the limit: shaping lowered it, by a reload or to share slots with other workers)
            self._retire(conn)
        else:
            loop = asyncio.get_running_loop()
            conn.idle_handle = loop.call_later(self.settings.idle_timeout, self._expire, conn)
            site.idle.append(conn)
            site.wake_one()

    def _expire(self, conn: Connection) -> None:
        site = self._sites.get(conn.key)
        if site is not None and conn in site.idle:
            site.idle.remove(conn)
            conn.idle_handle = None
            self._retire(conn)

    def _drop(self, conn: Connection) -> None:
        conn.smtp.close()
        site = self._sites[conn.key]
        site.open -= 1
        metrics.get().connections.labels(provider=site.label).dec()
        site.wake_one()

    def _retire(self, conn: Connection) -> None:
        """QUIT in the background; the slot is freed only once the session is gone."""

        async def quit_then_free() -> None:
            try:
                if conn.smtp.is_connected:
                    await conn.smtp.quit(timeout=self.settings.quit_timeout)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                pass
            finally:
                self._drop(conn)

        task = asyncio.get_running_loop().create_task(quit_then_free())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


__all__ = ["ConnectionPool"]
