"""Outbound SMTP: one transaction per message per destination, over pooled, reused connections.

Why a pool: opening a TCP connection, reading the banner, EHLO and STARTTLS
cost several round trips and a TLS handshake; providers also judge senders by
how many connections they open. So connections are keyed by
``(site, source address)``, reused for up to ``max_deliveries_per_connection``
transactions, capped at ``connection_limit`` per key, closed after
``idle_timeout`` seconds unused, and dropped as soon as they break.

Who does what: aiosmtplib opens and secures the session (banner, EHLO/HELO,
STARTTLS, QUIT). aiosmtplib (5.x) has no PIPELINING support and its protocol
object discards a reply that arrives while a previous one waits to be read, so
the transaction itself (RSET, MAIL, RCPT..., DATA, body) is driven by a small
reply reader (:class:`_ReplyReader`) that temporarily takes over the same
transport (``transport.set_protocol``, public asyncio API) and parses replies
in arrival order. That lets MAIL and all RCPTs go out in one write when the
server offers PIPELINING (RFC 2920), while DATA is only sent once at least one
RCPT was accepted.

This module only says *delivered / temporary / permanent* from the reply code
class, keeping the exact code, enhanced status and text; what a reply means
(bounce category, throttling) is the classifier's job. Transport failures
(refused, timeout, dropped connection, TLS required but unavailable, 421 on
connect) become temporary results for every recipient with a reply text that
says what happened and where (``"connection refused by 127.0.0.2:2525"``).
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiosmtplib
import structlog
from pydantic import BaseModel, ConfigDict, Field

from engine.deliver.hop import Hop
from engine.errors import EngineError

log = structlog.get_logger(__name__)

TlsPolicy = Literal["opportunistic", "required", "disabled"]
Kind = Literal["delivered", "temporary", "permanent"]
Phase = Literal["connect", "greeting", "ehlo", "starttls", "rset", "mail", "rcpt", "data", "dot", "local"]


# -- settings -----------------------------------------------------------------


class SmtpClientSettings(BaseModel):
    """Client tunables (to move into engine/config.py as ``[delivery.smtp]``).

    Names follow KumoMTA's egress path vocabulary (``banner_timeout``,
    ``mail_from_timeout``, ``data_dot_timeout``, ``enable_tls`` ...). Timeout
    defaults follow Postfix's, which are RFC 5321 section 4.5.3.2 values
    except a 30 s connect timeout: a host that does not answer the SYN
    within 30 s is better skipped for the next MX than waited on.
    ``opportunistic`` TLS does not verify certificates (KumoMTA's
    ``OpportunisticInsecure``, standard MTA practice); ``required`` does.
    """

    model_config = ConfigDict(extra="forbid")

    connect_timeout: float = Field(default=30.0, gt=0, description="TCP connect, seconds")
    banner_timeout: float = Field(default=300.0, gt=0, description="wait for the 220 banner")
    ehlo_timeout: float = Field(default=300.0, gt=0)
    starttls_timeout: float = Field(default=300.0, gt=0, description="STARTTLS reply plus handshake")
    rset_timeout: float = Field(default=20.0, gt=0)
    mail_from_timeout: float = Field(default=300.0, gt=0)
    rcpt_to_timeout: float = Field(default=300.0, gt=0)
    data_timeout: float = Field(default=120.0, gt=0, description="reply to DATA (354)")
    data_block_timeout: float = Field(default=180.0, gt=0, description="writing the body")
    data_dot_timeout: float = Field(default=600.0, gt=0, description="reply after end of data")
    quit_timeout: float = Field(default=5.0, gt=0, description="polite QUIT before closing")
    enable_tls: TlsPolicy = Field(
        default="opportunistic", description="default STARTTLS policy per destination"
    )
    ca_file: Path | None = Field(default=None, description="extra CAs trusted when TLS is 'required'")
    max_deliveries_per_connection: int = Field(default=100, ge=1)
    connection_limit: int = Field(default=10, ge=1, description="open connections per (site, source)")
    idle_timeout: float = Field(default=60.0, gt=0, description="close a pooled connection unused this long")
    ehlo_name: str | None = Field(default=None, description="default EHLO name; the host's FQDN when unset")


# -- values -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """What one transaction carries: the envelope for one destination and the final bytes."""

    mail_from: str
    rcpt_tos: Sequence[str]
    data: bytes


_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


def parse_enhanced_status(text: str) -> str | None:
    """The RFC 3463 enhanced status code at the start of a reply text, e.g. ``"5.1.1"``."""
    match = _ENHANCED.match(text.lstrip())
    return ".".join(match.groups()) if match else None


def kind_of(code: int | None) -> Kind:
    """delivered / temporary / permanent from the reply code class; anything odd is temporary."""
    if code is not None and 200 <= code < 300:
        return "delivered"
    if code is not None and 500 <= code < 600:
        return "permanent"
    return "temporary"


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply; multi-line texts are joined with newlines, codes stripped from the lines."""

    code: int
    text: str

    @property
    def enhanced_status(self) -> str | None:
        return parse_enhanced_status(self.text)

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """The outcome for one recipient of one attempt.

    ``code`` is None when no server reply decided it (a transport failure);
    ``reply`` is then a sentence naming what failed and where. ``phase`` says
    at which step the outcome was decided (``rcpt`` for a rejected recipient,
    ``dot`` for the end-of-data reply, ``connect`` for a refused connection...).
    """

    recipient: str
    kind: Kind
    code: int | None
    enhanced_status: str | None
    reply: str
    phase: Phase
    host: str | None = None

    @classmethod
    def from_reply(cls, recipient: str, reply: Reply, phase: Phase, host: str | None) -> DeliveryResult:
        return cls(recipient, kind_of(reply.code), reply.code, reply.enhanced_status, str(reply), phase, host)


@dataclass(slots=True)
class TransactionResult:
    """Per-recipient results of one message to one destination, plus the end-of-data reply."""

    results: list[DeliveryResult]
    data_reply: Reply | None = None
    host: str | None = None
    tls: bool = False
    reused: bool = False
    duration: float = 0.0

    @property
    def delivered(self) -> list[str]:
        return [r.recipient for r in self.results if r.kind == "delivered"]

    def for_recipient(self, recipient: str) -> DeliveryResult:
        for r in self.results:
            if r.recipient == recipient:
                return r
        raise KeyError(recipient)


class SmtpSetupError(EngineError):
    """A connection to a hop could not be made ready for a transaction (always temporary)."""

    def __init__(
        self, text: str, phase: Phase, *, code: int | None = None, tls_handshake: bool = False
    ) -> None:
        super().__init__(text)
        self.text = text
        self.phase = phase
        self.code = code
        self.tls_handshake = tls_handshake


class _AllHopsFailed(Exception):
    def __init__(self, failures: list[SmtpSetupError]) -> None:
        super().__init__("; ".join(f.text for f in failures))
        self.failures = failures


class _ConnectionLost(Exception):
    """The server closed the connection (or it broke) while a transaction was using it."""


class _BadReply(Exception):
    """The server sent something that is not an SMTP reply; the session cannot be trusted."""


class _StaleConnection(Exception):
    """A reused connection was found dead before any reply; retry once on a fresh one."""

    def __init__(self, fallback: TransactionResult) -> None:
        super().__init__("stale pooled connection")
        self.fallback = fallback


# -- reply reader ---------------------------------------------------------------

_MAX_REPLY_BYTES = 64 * 1024


class _ReplyReader(asyncio.Protocol):
    """Parses SMTP replies in arrival order so several commands can be in flight.

    It stands in for aiosmtplib's protocol on the same transport for the
    length of one transaction. Losing the connection is forwarded to the
    original protocol, so the aiosmtplib session learns it is closed.
    """

    def __init__(self, inner: asyncio.BaseProtocol, transport: asyncio.Transport) -> None:
        self._inner = inner
        self.transport = transport
        self._buf = bytearray()
        self._lines: list[bytes] = []
        self._replies: deque[Reply] = deque()
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed = False

    # asyncio.Protocol
    def data_received(self, data: bytes) -> None:
        self._buf += data
        while (end := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[: end + 1]).rstrip(b"\r\n")
            del self._buf[: end + 1]
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                self._fail(_BadReply(f"malformed reply line {line[:80]!r}"))
                return
            self._lines.append(line)
            if line[3:4] != b"-":
                text = "\n".join(ln[4:].decode("utf-8", "replace").strip() for ln in self._lines)
                self._replies.append(Reply(int(self._lines[0][:3]), text))
                self._lines = []
        if len(self._buf) + sum(map(len, self._lines)) > _MAX_REPLY_BYTES:
            self._fail(_BadReply("reply too long"))
        self._wake()

    def eof_received(self) -> bool:
        self._fail(_ConnectionLost("server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(_ConnectionLost(f"connection lost ({exc})" if exc else "connection closed"))
        self._writable.set()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # used by the transaction
    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def leftover(self) -> bool:
        """Bytes or replies nobody asked for: the session is out of step."""
        return bool(self._buf or self._lines or self._replies)

    def write(self, data: bytes) -> None:
        if self.closed or self.transport.is_closing():
            raise _ConnectionLost("connection already closed")
        self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            await self._writable.wait()
        if self.closed:
            raise _ConnectionLost("connection closed while sending")

    async def read(self, timeout: float) -> Reply:
        async with asyncio.timeout(timeout):
            while not self._replies:
                if self._error is not None:
                    raise self._error
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        return self._replies.popleft()


# -- connections ----------------------------------------------------------------


@dataclass(eq=False)
class _Connection:
    """One open SMTP session in the pool."""

    smtp: aiosmtplib.SMTP
    hop: Hop
    key: tuple[str, str | None]
    tls: bool
    tls_verified: bool
    pipelining: bool
    extensions: dict[str, str]
    deliveries: int = 0
    needs_rset: bool = False
    broken: bool = False
    idle_handle: asyncio.TimerHandle | None = None

    @property
    def label(self) -> str:
        return self.hop.label

    @property
    def alive(self) -> bool:
        return not self.broken and self.smtp.is_connected

    def fits(self, policy: TlsPolicy) -> bool:
        return policy != "required" or (self.tls and self.tls_verified)

    @contextmanager
    def borrowed(self) -> Iterator[_ReplyReader]:
        """Hand the transport to a reply reader for one transaction, then give it back."""
        transport = self.smtp.transport
        inner = self.smtp.protocol
        if transport is None or inner is None or transport.is_closing():
            raise _ConnectionLost("connection already closed")
        reader = _ReplyReader(inner, transport)  # type: ignore[arg-type]
        transport.set_protocol(reader)
        try:
            yield reader
        finally:
            if reader.closed or transport.is_closing():
                self.broken = True
            else:
                transport.set_protocol(inner)
                if reader.leftover:
                    self.broken = True
            if self.broken:
                self.smtp.close()


class _Site:
    """Pool state for one (site, source) key."""

    __slots__ = ("idle", "open", "waiters", "limit", "max_deliveries")

    def __init__(self, limit: int = 10, max_deliveries: int = 100) -> None:
        self.idle: list[_Connection] = []
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


# -- the pool -------------------------------------------------------------------

_CRLF_FIX = re.compile(rb"\r\n|\r|\n")
_DOT_LINE = re.compile(rb"(?m)^\.")
_BAD_ADDRESS = re.compile(r"[\x00-\x20\x7f<>]")


def _dot_stuffed(data: bytes) -> bytes:
    """The body as sent after DATA: CRLF line ends, leading dots doubled, ended by CRLF.CRLF."""
    if b"\r" in data or b"\n" in data:
        data = _CRLF_FIX.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b".") or b"\n." in data:
        data = _DOT_LINE.sub(b"..", data)
    return data + b".\r\n"


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
        self._verified_ctx = tls_context or self._make_verified_context()
        self._opportunistic_ctx = ssl.create_default_context()
        self._opportunistic_ctx.check_hostname = False
        self._opportunistic_ctx.verify_mode = ssl.CERT_NONE
        self._sites: dict[tuple[str, str | None], _Site] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._default_ehlo = self.settings.ehlo_name

    def _make_verified_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if self.settings.ca_file is not None:
            ctx.load_verify_locations(cafile=str(self.settings.ca_file))
        return ctx

    async def __aenter__(self) -> ConnectionPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def trim_idle(self, key: tuple[str, str | None], keep: int) -> int:
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

    def open_for(self, key: tuple[str, str | None]) -> int:
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
        problem = _check_envelope(message)
        if problem is not None:
            return _all(message, None, problem, "local", kind="permanent", started=started)
        if not hop_list:
            return _all(message, None, "no MX host to deliver to", "local", started=started)
        key = (site or ",".join(f"{h.address}:{h.port}" for h in hop_list), source)
        pool_site = self._sites.get(key)
        if pool_site is None:
            pool_site = self._sites[key] = _Site(self.settings.connection_limit, self.settings.max_deliveries_per_connection)
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
            except _AllHopsFailed as failed:
                last = failed.failures[-1]
                text = "; ".join(f.text for f in failed.failures)
                result = _all(
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
                result = await self._transact(conn, message, reused, started)
            except _StaleConnection as stale:
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
        self, key: tuple[str, str | None], hops: list[Hop], source: str | None, helo: str, policy: TlsPolicy
    ) -> tuple[_Connection, bool]:
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
            conn = await self._connect_any(key, hops, source, helo, policy)
        except BaseException:
            site.open -= 1
            site.wake_one()
            raise
        return conn, False

    def _release(self, conn: _Connection) -> None:
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

    def _expire(self, conn: _Connection) -> None:
        site = self._sites.get(conn.key)
        if site is not None and conn in site.idle:
            site.idle.remove(conn)
            conn.idle_handle = None
            self._retire(conn)

    def _drop(self, conn: _Connection) -> None:
        conn.smtp.close()
        site = self._sites[conn.key]
        site.open -= 1
        site.wake_one()

    def _retire(self, conn: _Connection) -> None:
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

    # -- opening a session ----------------------------------------------------

    async def _connect_any(
        self, key: tuple[str, str | None], hops: list[Hop], source: str | None, helo: str, policy: TlsPolicy
    ) -> _Connection:
        failures: list[SmtpSetupError] = []
        for hop in hops:
            try:
                return await self._open(key, hop, source, helo, policy)
            except SmtpSetupError as exc:
                if exc.tls_handshake and policy == "opportunistic":
                    log.warning("smtp.starttls_failed_retry_plain", host=hop.label, reason=exc.text)
                    try:
                        return await self._open(key, hop, source, helo, "disabled")
                    except SmtpSetupError as again:
                        exc = again
                log.info(
                    "smtp.connect_failed",
                    host=hop.label,
                    phase=exc.phase,
                    code=exc.code,
                    reason=exc.text,
                )
                failures.append(exc)
        raise _AllHopsFailed(failures)

    async def _open(
        self, key: tuple[str, str | None], hop: Hop, source: str | None, helo: str, policy: TlsPolicy
    ) -> _Connection:
        s = self.settings
        where = f"{hop.address}:{hop.port}"
        label = hop.label
        sock = await self._tcp_connect(hop, source)
        smtp = aiosmtplib.SMTP(
            hostname=hop.mx_host, sock=sock, local_hostname=helo, timeout=s.banner_timeout, start_tls=False
        )
        try:
            try:
                await smtp.connect(timeout=s.banner_timeout)
            except aiosmtplib.SMTPConnectResponseError as exc:
                raise SmtpSetupError(
                    f"{exc.code} {exc.message} (banner from {label})", "greeting", code=exc.code
                ) from exc
            except aiosmtplib.SMTPTimeoutError as exc:
                raise SmtpSetupError(
                    f"timed out after {s.banner_timeout:g}s waiting for the banner of {label}", "greeting"
                ) from exc
            except (aiosmtplib.SMTPException, OSError) as exc:
                raise SmtpSetupError(f"connection closed by {where} before the banner", "greeting") from exc
            await self._hello(smtp, helo, label)
            tls = tls_verified = False
            if policy != "disabled" and smtp.supports_extension("starttls"):
                ctx = self._verified_ctx if policy == "required" else self._opportunistic_ctx
                try:
                    await smtp.starttls(server_hostname=hop.mx_host, tls_context=ctx, timeout=s.starttls_timeout)
                except aiosmtplib.SMTPResponseException as exc:
                    if policy == "required" or exc.code == 421:
                        raise SmtpSetupError(
                            f"{exc.code} {exc.message} (STARTTLS refused by {label})",
                            "starttls",
                            code=exc.code,
                        ) from exc
                    log.info("smtp.starttls_refused", host=label, code=exc.code)
                except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
                    raise SmtpSetupError(
                        f"TLS handshake with {label} failed: {exc}", "starttls", tls_handshake=True
                    ) from exc
                else:
                    tls, tls_verified = True, policy == "required"
                    await self._hello(smtp, helo, label)
            elif policy == "required":
                raise SmtpSetupError(f"TLS required but {label} does not offer STARTTLS", "starttls")
        except BaseException:
            smtp.close()
            raise
        return _Connection(
            smtp=smtp,
            hop=hop,
            key=key,
            tls=tls,
            tls_verified=tls_verified,
            pipelining=smtp.supports_extension("pipelining"),
            extensions=dict(smtp.esmtp_extensions),
        )

    async def _tcp_connect(self, hop: Hop, source: str | None) -> socket.socket:
        where = f"{hop.address}:{hop.port}"
        family = socket.AF_INET6 if ":" in hop.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            if source:
                try:
                    sock.bind((source, 0))
                except OSError as exc:
                    raise SmtpSetupError(
                        f"cannot bind source address {source}: {exc.strerror or exc}", "connect"
                    ) from exc
            try:
                async with asyncio.timeout(self.settings.connect_timeout):
                    await asyncio.get_running_loop().sock_connect(sock, (hop.address, hop.port))
            except ConnectionRefusedError as exc:
                raise SmtpSetupError(f"connection refused by {where}", "connect") from exc
            except TimeoutError as exc:
                raise SmtpSetupError(
                    f"connection to {where} timed out after {self.settings.connect_timeout:g}s", "connect"
                ) from exc
            except OSError as exc:
                raise SmtpSetupError(f"cannot connect to {where}: {exc.strerror or exc}", "connect") from exc
        except BaseException:
            sock.close()
            raise
        return sock

    async def _hello(self, smtp: aiosmtplib.SMTP, helo: str, label: str) -> None:
        timeout = self.settings.ehlo_timeout
        try:
            try:
                await smtp.ehlo(hostname=helo, timeout=timeout)
            except aiosmtplib.SMTPHeloError as exc:
                if exc.code < 500 or not smtp.is_connected:
                    raise
                await smtp.helo(hostname=helo, timeout=timeout)
        except aiosmtplib.SMTPResponseException as exc:
            raise SmtpSetupError(
                f"{exc.code} {exc.message} (EHLO reply from {label})", "ehlo", code=exc.code
            ) from exc
        except aiosmtplib.SMTPTimeoutError as exc:
            raise SmtpSetupError(
                f"timed out after {timeout:g}s waiting for the EHLO reply of {label}", "ehlo"
            ) from exc
        except ValueError as exc:  # an EHLO name aiosmtplib refuses to send
            raise SmtpSetupError(f"invalid EHLO name {helo!r}: {exc}", "ehlo") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise SmtpSetupError(f"connection to {label} lost during EHLO", "ehlo") from exc

    # -- the transaction --------------------------------------------------------

    async def _transact(
        self, conn: _Connection, message: OutboundMessage, reused: bool, started: float
    ) -> TransactionResult:
        s = self.settings
        acquired = time.monotonic()
        label = conn.label
        rcpts = list(message.rcpt_tos)
        results: dict[int, DeliveryResult] = {}
        data_reply: Reply | None = None
        accepted: list[int] = []
        replied = False
        phase: Phase = "mail"
        timeout = s.mail_from_timeout

        def finish(*, quiet: bool = False) -> TransactionResult:
            res = TransactionResult(
                results=[results[i] for i in range(len(rcpts))],
                data_reply=data_reply,
                host=label,
                tls=conn.tls,
                reused=reused,
                duration=time.monotonic() - started,
            )
            if quiet:
                return res
            codes = {r.code for r in res.results}
            log.info(
                "smtp.transaction",
                site=conn.key[0],
                host=label,
                code=data_reply.code
                if data_reply
                else (codes.pop() if len(codes) == 1 else sorted(map(str, codes))),
                duration_ms=round(res.duration * 1000, 1),
                wait_ms=round((acquired - started) * 1000, 1),
                recipients=len(rcpts),
                delivered=len(res.delivered),
                tls=conn.tls,
                reused=reused,
            )
            return res

        conn.deliveries += 1
        try:
            with conn.borrowed() as rd:
                if conn.needs_rset:
                    phase, timeout = "rset", s.rset_timeout
                    rd.write(b"RSET\r\n")
                    reply = await rd.read(timeout)
                    replied = True
                    if not reply.ok:
                        conn.broken = True
                        raise _ConnectionLost(f"RSET answered {reply}")
                    conn.needs_rset = False
                mail_cmd, rcpt_cmds, problem = _envelope_commands(message, conn)
                if problem is not None:
                    for i, r in enumerate(rcpts):
                        results[i] = DeliveryResult(
                            r, "permanent", None, "5.6.7", f"{problem} ({label})", "local", label
                        )
                    return finish()
                conn.needs_rset = True  # until the transaction ends with an end-of-data reply
                phase, timeout = "mail", s.mail_from_timeout
                if conn.pipelining:
                    rd.write(mail_cmd + b"".join(rcpt_cmds))
                    mail_reply = await rd.read(timeout)
                    replied = True
                    phase, timeout = "rcpt", s.rcpt_to_timeout
                    rcpt_replies = [await rd.read(timeout) for _ in rcpt_cmds]
                else:
                    rd.write(mail_cmd)
                    mail_reply = await rd.read(timeout)
                    replied = True
                    rcpt_replies = []
                    if mail_reply.ok:
                        phase, timeout = "rcpt", s.rcpt_to_timeout
                        for cmd in rcpt_cmds:
                            rd.write(cmd)
                            rcpt_replies.append(await rd.read(timeout))
                if mail_reply.code == 421 or any(r.code == 421 for r in rcpt_replies):
                    conn.broken = True  # the server is closing this session
                if not mail_reply.ok:
                    for i, r in enumerate(rcpts):
                        results[i] = DeliveryResult.from_reply(r, mail_reply, "mail", label)
                    return finish()
                for i, (r, reply) in enumerate(zip(rcpts, rcpt_replies, strict=True)):
                    if reply.code in (250, 251):
                        accepted.append(i)
                    else:
                        results[i] = DeliveryResult.from_reply(r, reply, "rcpt", label)
                if not accepted or conn.broken:
                    for i in accepted:
                        results[i] = DeliveryResult(
                            rcpts[i],
                            "temporary",
                            None,
                            None,
                            f"session with {label} closed before DATA",
                            "rcpt",
                            label,
                        )
                    return finish()
                phase, timeout = "data", s.data_timeout
                rd.write(b"DATA\r\n")
                reply = await rd.read(timeout)
                if reply.code != 354:
                    conn.broken = conn.broken or reply.code == 421
                    for i in accepted:
                        results[i] = DeliveryResult.from_reply(rcpts[i], reply, "data", label)
                    return finish()
                phase, timeout = "dot", s.data_block_timeout
                rd.write(_dot_stuffed(message.data))
                await rd.drain(timeout)
                timeout = s.data_dot_timeout
                data_reply = await rd.read(timeout)
                conn.needs_rset = False
                conn.broken = conn.broken or data_reply.code == 421
                for i in accepted:
                    results[i] = DeliveryResult.from_reply(rcpts[i], data_reply, "dot", label)
                return finish()
        except (TimeoutError, _ConnectionLost, _BadReply) as exc:
            conn.broken = True
            conn.smtp.close()
            step = _PHASE_WORDS[phase]
            if isinstance(exc, TimeoutError):
                text = f"timed out after {timeout:g}s waiting for the reply to {step} from {label}"
            elif isinstance(exc, _BadReply):
                text = f"bad reply from {label} to {step}: {exc}"
            else:
                text = f"connection to {label} lost during {step}"
            for i, r in enumerate(rcpts):
                if i not in results:
                    results[i] = DeliveryResult(r, "temporary", None, None, text, phase, label)
            stale = isinstance(exc, _ConnectionLost) and reused and not replied
            result = finish(quiet=stale)
            if stale:
                raise _StaleConnection(result) from exc
            return result


_PHASE_WORDS: dict[str, str] = {
    "rset": "RSET",
    "mail": "MAIL FROM",
    "rcpt": "RCPT TO",
    "data": "DATA",
    "dot": "end of data",
    "connect": "connect",
    "greeting": "the banner",
    "ehlo": "EHLO",
    "starttls": "STARTTLS",
    "local": "local checks",
}


def _check_envelope(message: OutboundMessage) -> str | None:
    """A reason the envelope cannot be sent at all (a local, permanent problem), or None."""
    if not message.rcpt_tos:
        return "message has no recipients"
    for addr in [message.mail_from, *message.rcpt_tos]:
        if not isinstance(addr, str) or _BAD_ADDRESS.search(addr):
            return f"invalid envelope address {addr!r}"
    for addr in message.rcpt_tos:
        if "@" not in addr:
            return f"invalid envelope address {addr!r}"
    return None


def _envelope_commands(message: OutboundMessage, conn: _Connection) -> tuple[bytes, list[bytes], str | None]:
    """MAIL and RCPT lines with the ESMTP options this server offers (SIZE, 8BITMIME, SMTPUTF8)."""
    options: list[bytes] = []
    addresses = [message.mail_from, *message.rcpt_tos]
    utf8 = not all(a.isascii() for a in addresses)
    if utf8:
        if "smtputf8" not in conn.extensions:
            return b"", [], "SMTPUTF8 is required but not offered"
        options.append(b"SMTPUTF8")
    if "size" in conn.extensions:
        options.append(b"SIZE=%d" % len(message.data))
    if "8bitmime" in conn.extensions and not message.data.isascii():
        options.append(b"BODY=8BITMIME")
    enc = "utf-8" if utf8 else "ascii"
    tail = (b" " + b" ".join(options)) if options else b""
    mail = b"MAIL FROM:<" + message.mail_from.encode(enc) + b">" + tail + b"\r\n"
    rcpts = [b"RCPT TO:<" + r.encode(enc) + b">\r\n" for r in message.rcpt_tos]
    return mail, rcpts, None


def _all(
    message: OutboundMessage,
    code: int | None,
    text: str,
    phase: Phase,
    *,
    kind: Kind = "temporary",
    started: float,
    enhanced: str | None = None,
) -> TransactionResult:
    """The same outcome for every recipient: a transport failure or a local problem."""
    results = [DeliveryResult(r, kind, code, enhanced, text, phase, None) for r in message.rcpt_tos]
    return TransactionResult(results=results, duration=time.monotonic() - started)


__all__ = [
    "ConnectionPool",
    "DeliveryResult",
    "Hop",
    "OutboundMessage",
    "Reply",
    "SmtpClientSettings",
    "SmtpSetupError",
    "TlsPolicy",
    "TransactionResult",
    "kind_of",
    "parse_enhanced_status",
]
