"""Real SMTP receivers on loopback that play mailbox providers, with injected faults.

Delivery code is tested against real aiosmtpd servers over real sockets, never
against a patched client. Each :class:`Receiver` listens on its own 127.0.0.x
address (all of 127.0.0.0/8 is loopback on Linux) and behaves as its
:class:`Behaviour` says: accept everything, answer ``421`` on connect,
greylist, reject some users, drop the connection at end of DATA, answer
slowly at a phase, offer STARTTLS (or a broken STARTTLS), or answer a phase
with a custom reply.

Each receiver runs its own event loop in a thread (like aiosmtpd's
``Controller``, minus the probe connection that would pollute session
counts), so it works from async tests on any loop and from sync code alike.
Everything it sees is recorded for assertions: the accepted messages
(:class:`ReceivedMessage`: envelope, bytes, TLS, session id, peer), session
counts and the maximum number of concurrent sessions, transactions per
session, and the command verbs in order.

Use the fixture factories (``from tests.receivers import smtp_receiver, tls_ca``
in a test module, or list ``"tests.receivers"`` in conftest's ``pytest_plugins``)::

    rx = smtp_receiver(Behaviour(reject_users={"nobody@example.test"}))
    result = await pool.send([rx.hop()], message)
    assert rx.messages[0].rcpt_tos == ("a@example.test",)

``tls_ca`` is a session-wide trustme CA whose certificate covers ``mx.test``,
``*.mx.test``, ``localhost`` and 127.0.0.1-127.0.0.30; ``refusing_endpoint()``
gives an ``(address, port)`` where connections are refused.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import SMTP, Envelope, Session

#: Phases a behaviour can slow down or answer with a custom reply.
PHASES = ("greeting", "ehlo", "mail", "rcpt", "data")

_addresses = itertools.cycle(range(2, 31))
_address_lock = threading.Lock()


def next_loopback_address() -> str:
    """A 127.0.0.x address (x in 2..30, cycling) so each receiver looks like its own host."""
    with _address_lock:
        return f"127.0.0.{next(_addresses)}"


@dataclass
class Behaviour:
    """What a receiver does. The defaults accept every message (with PIPELINING, no STARTTLS)."""

    #: Sent instead of the 220 greeting, then the connection is closed (e.g. ``"421 4.3.2 busy"``).
    connect_reply: str | None = None
    #: First attempt for each (sender, recipient) pair gets ``greylist_reply``; later ones pass.
    greylist: bool = False
    greylist_reply: str = "451 4.7.1 Greylisted, please try again later"
    #: Recipients (lower-cased full addresses) answered with ``reject_reply`` at RCPT.
    reject_users: frozenset[str] | set[str] = frozenset()
    reject_reply: str = "550 5.1.1 The email account that you tried to reach does not exist"
    #: How many end-of-DATA moments end with the connection dropped instead of a reply.
    drop_data: int = 0
    #: Seconds to wait before answering at a phase (``greeting``, ``ehlo``, ``mail``, ``rcpt``, ``data``).
    delay: dict[str, float] = field(default_factory=dict)
    #: Custom reply for a phase (``ehlo``, ``mail``, ``rcpt``, ``data``),
    #: e.g. ``{"rcpt": "452 4.5.3 Too many recipients"}``.
    replies: dict[str, str] = field(default_factory=dict)
    #: Offer STARTTLS with a certificate from the ``tls_ca`` fixture.
    starttls: bool = False
    #: Offer STARTTLS but make every handshake fail (server only speaks TLS 1.0).
    tls_broken: bool = False
    #: Advertise PIPELINING in the EHLO reply (aiosmtpd handles pipelined input anyway).
    pipelining: bool = True
    #: Advertise 8BITMIME (aiosmtpd's default); False: a 7-bit-only receiver (RFC 6152).
    eightbitmime: bool = True
    #: (max recipients, per seconds): beyond that many accepted RCPTs in a sliding window, RCPT gets
    #: ``rate_limit_reply`` (a provider's rate limit). None: no limit.
    rate_limit: tuple[int, float] | None = None
    rate_limit_reply: str = (
        "421 4.7.28 [127.0.0.1] Our system has detected an unusual rate of unsolicited mail originating "
        "from your IP address. To protect our users from spam, mail sent from your IP address has been "
        "temporarily rate limited."
    )


@dataclass(frozen=True)
class ReceivedMessage:
    """One message the receiver accepted (answered 250 at end of DATA)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    tls: bool
    session_id: int
    peer: tuple[str, int]
    ehlo_name: str | None
    mail_options: tuple[str, ...]


class Receiver:
    """One SMTP receiver in its own thread and event loop; see the module docstring."""

    def __init__(
        self,
        behaviour: Behaviour | None = None,
        *,
        address: str | None = None,
        port: int = 0,
        server_tls: ssl.SSLContext | None = None,
        hostname: str = "mx.test",
    ) -> None:
        self.behaviour = behaviour or Behaviour()
        self.address = address or next_loopback_address()
        self.port = port
        self.hostname = hostname
        self._server_tls = server_tls
        self._lock = threading.Lock()
        self.messages: list[ReceivedMessage] = []
        self.sessions = 0
        self.active = 0
        self.max_concurrent = 0
        self.transactions: dict[int, int] = {}
        self.commands: list[tuple[int, str]] = []
        self.peers: list[tuple[str, int]] = []
        self.dropped = 0
        #: MAIL commands that arrived with more commands already buffered behind them (PIPELINING).
        self.pipelined_mail = 0
        self._greylisted: set[tuple[str, str]] = set()
        self._accepted_at: list[float] = []  # RCPT accept times, for Behaviour.rate_limit
        #: RCPTs answered with the rate-limit reply.
        self.rate_limited = 0
        self._drops_left = self.behaviour.drop_data
        self._session_ids = itertools.count(1)
        self._protocols: set[_ReceiverSMTP] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None

    # -- lifecycle --------------------------------------------------------

    def start(self) -> Receiver:
        """Bind and serve in a background thread; raises if the address cannot be bound."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(self._factory, host=self.address, port=self.port)
                )
            except BaseException as exc:  # reported to start() below
                failure.append(exc)
                ready.set()
                loop.close()
                return
            self.port = self._server.sockets[0].getsockname()[1]
            loop.call_soon(ready.set)
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"smtp-rx-{self.address}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError(f"receiver on {self.address} did not start within 10 s")
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close the listener and every open session, then end the thread (bounded: 10 s)."""
        if self._loop is None or self._thread is None:
            return
        loop = self._loop
        if not loop.is_closed():
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            try:
                fut.result(10)
            finally:
                loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._thread = None
        self._loop = None

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for proto in list(self._protocols):
            if proto.transport is not None:
                proto.transport.abort()  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests use ---------------------------------------------------

    def hop(self, host: str | None = None) -> tuple[str, str, int]:
        """This receiver as an MX hop ``(host, address, port)``."""
        return (host or self.hostname, self.address, self.port)

    def kick(self) -> None:
        """Abort every open session from the server side (a provider dropping idle connections)."""
        assert self._loop is not None

        def abort_all() -> None:
            for proto in list(self._protocols):
                if proto.transport is not None:
                    proto.transport.abort()  # type: ignore[attr-defined]

        self._loop.call_soon_threadsafe(abort_all)
        self.wait_until(lambda rx: rx.active == 0)

    def verbs(self, session_id: int | None = None) -> list[str]:
        """The command verbs received, in order (optionally for one session)."""
        with self._lock:
            return [v for s, v in self.commands if session_id is None or s == session_id]

    def wait_until(self, predicate: Callable[[Receiver], bool], timeout: float = 5.0) -> bool:
        """Poll until ``predicate(self)`` holds (bounded); the server side runs in another thread."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.01)
        return predicate(self)

    async def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait (bounded) until no session is open, e.g. after the client pool closed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.active == 0:
                return True
            await asyncio.sleep(0.01)
        return self.active == 0

    # -- server side --------------------------------------------------------

    def _factory(self) -> _ReceiverSMTP:
        tls = self._server_tls if (self.behaviour.starttls or self.behaviour.tls_broken) else None
        return _ReceiverSMTP(
            _Handler(self),
            receiver=self,
            hostname=self.hostname,
            tls_context=tls,
            timeout=60,
            enable_SMTPUTF8=True,
        )

    def _session_opened(self, proto: _ReceiverSMTP) -> int:
        with self._lock:
            self._protocols.add(proto)
            self.sessions += 1
            self.active += 1
            self.max_concurrent = max(self.max_concurrent, self.active)
            sid = next(self._session_ids)
            self.transactions[sid] = 0
            return sid

    def _session_closed(self, proto: _ReceiverSMTP) -> None:
        with self._lock:
            if proto in self._protocols:
                self._protocols.discard(proto)
                self.active -= 1

    def _record_command(self, sid: int, verb: str) -> None:
        with self._lock:
            self.commands.append((sid, verb))


class _ReceiverSMTP(SMTP):
    """aiosmtpd's SMTP with session accounting and greeting-time behaviours."""

    def __init__(self, handler: Any, *, receiver: Receiver, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.receiver = receiver
        self.session_id = 0
        self.tls_active = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        upgrading = self.transport is not None  # second call: the STARTTLS upgrade
        super().connection_made(transport)
        if upgrading:
            self.tls_active = True
            return
        self.session_id = self.receiver._session_opened(self)
        peer = transport.get_extra_info("peername")
        with self.receiver._lock:
            self.receiver.peers.append((peer[0], peer[1]))

    def connection_lost(self, error: Exception | None) -> None:
        self.receiver._session_closed(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        behaviour = self.receiver.behaviour
        delay = behaviour.delay.get("greeting")
        if delay:
            await asyncio.sleep(delay)
        if behaviour.connect_reply is not None:
            await self.push(behaviour.connect_reply)
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    async def smtp_MAIL(self, arg: str | None) -> None:
        self.receiver._record_command(self.session_id, "MAIL")
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self.receiver._record_command(self.session_id, "RCPT")
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        self.receiver._record_command(self.session_id, "DATA")
        await super().smtp_DATA(arg)

    async def smtp_RSET(self, arg: str) -> None:
        self.receiver._record_command(self.session_id, "RSET")
        await super().smtp_RSET(arg)

    async def smtp_QUIT(self, arg: str) -> None:
        self.receiver._record_command(self.session_id, "QUIT")
        await super().smtp_QUIT(arg)

    async def smtp_STARTTLS(self, arg: str) -> None:
        self.receiver._record_command(self.session_id, "STARTTLS")
        await super().smtp_STARTTLS(arg)


class _Handler:
    """aiosmtpd hooks: policy at MAIL/RCPT, the decision at end of DATA."""

    def __init__(self, receiver: Receiver) -> None:
        self.rx = receiver
        self.b = receiver.behaviour

    async def _pause(self, phase: str) -> None:
        delay = self.b.delay.get(phase)
        if delay:
            await asyncio.sleep(delay)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        await self._pause("ehlo")
        session.host_name = hostname
        if "ehlo" in self.b.replies:
            return [self.b.replies["ehlo"]]
        if self.b.pipelining:
            responses.insert(-1, "250-PIPELINING")
        if not self.b.eightbitmime:
            responses = [r for r in responses if r[4:].upper() != "8BITMIME"]
            responses[-1] = "250 " + responses[-1][4:]  # the last line has no hyphen, whichever it is now
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        # A pipelining client has written its RCPTs in the same burst as MAIL:
        # they already sit in the server's read buffer (aiosmtpd's StreamReader).
        if getattr(getattr(server, "_reader", None), "_buffer", b""):
            with self.rx._lock:
                self.rx.pipelined_mail += 1
        await self._pause("mail")
        if "mail" in self.b.replies:
            return self.b.replies["mail"]
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        await self._pause("rcpt")
        if "rcpt" in self.b.replies:
            return self.b.replies["rcpt"]
        if address.lower() in {u.lower() for u in self.b.reject_users}:
            return self.b.reject_reply
        if self.b.greylist:
            key = ((envelope.mail_from or "").lower(), address.lower())
            with self.rx._lock:
                first = key not in self.rx._greylisted
                self.rx._greylisted.add(key)
            if first:
                return self.b.greylist_reply
        if self.b.rate_limit is not None:
            most, per = self.b.rate_limit
            now = time.monotonic()
            with self.rx._lock:
                self.rx._accepted_at = [t for t in self.rx._accepted_at if t > now - per]
                if len(self.rx._accepted_at) >= most:
                    self.rx.rate_limited += 1
                    return self.b.rate_limit_reply
                self.rx._accepted_at.append(now)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await self._pause("data")
        assert isinstance(server, _ReceiverSMTP)
        with self.rx._lock:
            drop = self.rx._drops_left > 0
            if drop:
                self.rx._drops_left -= 1
                self.rx.dropped += 1
        if drop:
            assert server.transport is not None
            server.transport.abort()  # type: ignore[attr-defined]
            await asyncio.sleep(3600)  # connection_lost cancels this handler task
        if "data" in self.b.replies:
            return self.b.replies["data"]
        content = envelope.original_content or b""
        with self.rx._lock:
            self.rx.transactions[server.session_id] = self.rx.transactions.get(server.session_id, 0) + 1
            self.rx.messages.append(
                ReceivedMessage(
                    mail_from=envelope.mail_from or "",
                    rcpt_tos=tuple(envelope.rcpt_tos),
                    data=bytes(content),
                    tls=server.tls_active,
                    session_id=server.session_id,
                    peer=tuple(session.peer[:2]) if session.peer else ("", 0),  # type: ignore[arg-type]
                    ehlo_name=session.host_name,
                    mail_options=tuple(envelope.mail_options),
                )
            )
            n = len(self.rx.messages)
        return f"250 2.0.0 OK queued as rx{n}"


# -- fixtures ---------------------------------------------------------------

TLS_IDENTITIES = ("mx.test", "*.mx.test", "localhost", *(f"127.0.0.{i}" for i in range(1, 31)))


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """A throwaway CA; ``tls_ca.configure_trust(ctx)`` makes a client trust the receivers."""
    return trustme.CA()


def server_tls_context(ca: trustme.CA, *, broken: bool = False) -> ssl.SSLContext:
    """A server context with a certificate for :data:`TLS_IDENTITIES`; ``broken`` speaks only TLS 1.0."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*TLS_IDENTITIES).configure_cert(ctx)
    if broken:
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1
    return ctx


@pytest.fixture
def smtp_receiver(tls_ca: trustme.CA) -> Iterator[Callable[..., Receiver]]:
    """Factory: ``smtp_receiver(Behaviour(...), address=None, port=0) -> Receiver`` (started)."""
    started: list[Receiver] = []

    def make(behaviour: Behaviour | None = None, *, address: str | None = None, port: int = 0) -> Receiver:
        behaviour = behaviour or Behaviour()
        tls = None
        if behaviour.starttls or behaviour.tls_broken:
            tls = server_tls_context(tls_ca, broken=behaviour.tls_broken)
        rx = Receiver(behaviour, address=address, port=port, server_tls=tls).start()
        started.append(rx)
        return rx

    yield make
    for rx in started:
        rx.stop()


@pytest.fixture
def refusing_endpoint() -> Iterator[Callable[[], tuple[str, int]]]:
    """Factory of ``(address, port)`` pairs that refuse connections (bound, never listening)."""
    held: list[socket.socket] = []

    def make() -> tuple[str, int]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = next_loopback_address()
        sock.bind((address, 0))
        held.append(sock)
        return address, sock.getsockname()[1]

    yield make
    for sock in held:
        sock.close()
