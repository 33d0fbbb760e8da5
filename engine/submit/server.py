"""The SMTP server base both of the engine's listeners stand on.

The submission relay (:mod:`engine.submit.smtp`) and the bounce/FBL listener
(:mod:`engine.outcome.inbound`) differ in policy only: who may send, which
recipients are taken, what ``DATA`` does. Everything below the policy is the
same, and lives here so the two cannot drift apart:

* :class:`ListenerSMTP`, aiosmtpd's protocol with per-connection command limits,
  enhanced status codes on its stock replies, a fast path for plain addresses,
  and a registry of live connections so shutdown can close them;
* :class:`ListenerHandler`, the state every handler carries (``closing``, in-flight
  commits, live connections) and the EHLO hook that advertises PIPELINING;
* :func:`start_listener` and :class:`SmtpListenerHandle`: a server on the running
  loop (no aiosmtpd ``Controller``: it runs its own loop in a thread, and the
  listeners share the engine's pool, caches and shutdown), and its graceful stop;
* :func:`format_reply` and :func:`format_peer` for replies and log fields.

SMTP intake speed matters, so the base adds no per-connection or per-command work
to aiosmtpd's own: the limits dict is module-level, the protocol factory is built
once per listener, and the session class is a class attribute.
"""

from __future__ import annotations

import asyncio
import collections
import re
import socket
import ssl
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from aiosmtpd.smtp import CALL_LIMIT_DEFAULT, MISSING, SMTP, Envelope, Session, _AuthMechAttr, login_always_fail, syntax

from engine.errors import EngineError
from engine.submit.data import Outcome, read_payload

log = structlog.get_logger(__name__)

T = TypeVar("T")

NULL_SENDER = "<>"
"""How aiosmtpd hands us ``MAIL FROM:<>``; kept as-is in the envelope (aiosmtpd treats
an empty ``mail_from`` as 'no MAIL yet') and stored as ``''``."""

MAX_AUTH_FAILURES = 3
"""Failed AUTH attempts on one connection before we hang up (slows down key guessing).
The relay enforces it; it is here because the ``AUTH`` ceiling below derives from it."""

# Per-command ceilings for one connection (aiosmtpd answers 421 and hangs up past them).
# Transaction commands stay effectively unbounded so a client may send many messages
# over one connection; chatter that does no work is capped.
COMMAND_CALL_LIMITS: dict[str, int] = {
    "*": 1_000_000,
    "EHLO": 20,
    "HELO": 20,
    "STARTTLS": 3,
    "AUTH": MAX_AUTH_FAILURES + 2,
    "NOOP": 100,
    "VRFY": 10,
    "EXPN": 10,
    "HELP": 10,
}

# aiosmtpd's stock replies that lack RFC 3463 enhanced status codes, rewritten on the way out.
_STOCK_REPLIES: dict[bytes, bytes] = {
    b"552 Error: message size exceeds fixed maximum message size": (
        b"552 5.3.4 Message size exceeds fixed maximum message size"
    ),
    b"552 Error: Too much mail data": b"552 5.3.4 Message size exceeds fixed maximum message size",
    b"500 Line too long (see RFC5321 4.5.3.1.6)": b"500 5.5.2 Line too long (limit 1000 octets, RFC 5321 4.5.3.1.6)",
    b"500 Command line too long": b"500 5.5.2 Command line too long",
}

_REFUSALS: dict[Outcome, str] = {
    Outcome.TOO_LONG: "500 Line too long (see RFC5321 4.5.3.1.6)",
    Outcome.TOO_MUCH: "552 Error: Too much mail data",
    Outcome.TOO_MANY_LINES: "552 5.3.4 Message has too many lines (at most {max_lines})",
}
"""The reply to a payload refused after reading it (the stock texts get enhanced codes in ``push``)."""

REPLY_MAX = 400
"""Longest text :func:`format_reply` echoes back (a reply quoting client input stays one short line)."""


class ListenerError(EngineError):
    """An SMTP listener could not be started (address in use, permission denied...)."""


def format_reply(code: str, text: str) -> str:
    """One reply line: ``code`` + text made safe to echo (no CR/LF or controls, bounded length).

    Use it whenever the text carries something the client or a parser produced, so a
    crafted address cannot inject a second reply line.
    """
    clean = "".join(c if c.isprintable() else "?" for c in text)
    if len(clean) > REPLY_MAX:
        clean = clean[: REPLY_MAX - 3] + "..."
    return f"{code} {clean}"


def format_peer(session: Session | None) -> str | None:
    """The client as ``host:port`` for log fields (``None`` before a connection exists)."""
    peer = session.peer if session is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return None if peer is None else str(peer)


class ListenerSession(Session):
    """aiosmtpd's session without the deprecation warning it logs on every set of
    ``login_data`` (a legacy field we never read)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._legacy_login: Any = None

    @property
    def login_data(self) -> Any:
        return self._legacy_login

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._legacy_login = value


@dataclass(frozen=True, slots=True)
class ProtocolNames:
    """The attribute names behind aiosmtpd's hook tables, found once per listener and protocol class.

    ``auth``: mechanism -> (attribute, whether it is the protocol's own or the handler's);
    ``hooks``: ``handle_*`` of the handler by command; ``commands``: ``smtp_*`` of the protocol.
    """

    auth: dict[str, tuple[str, bool]]
    hooks: dict[str, str]
    commands: dict[str, str]
    ehlo_hook_ver: str | None

    @classmethod
    def of(cls, proto: SMTP) -> ProtocolNames:
        """Read them off a protocol aiosmtpd's own constructor built."""
        return cls(
            auth={mech: (a.method.__name__, a.is_builtin) for mech, a in proto._auth_methods.items()},
            hooks={name: hook.__name__ for name, hook in proto._handle_hooks.items()},
            commands={name: method.__name__ for name, method in proto._smtp_methods.items()},
            ehlo_hook_ver=proto._ehlo_hook_ver,
        )


@dataclass(kw_only=True)
class ListenerHandler:
    """What every listener's handler shares: the state :meth:`SmtpListenerHandle.close`
    drains, and the EHLO hook. Subclasses add the policy (``handle_MAIL``,
    ``handle_RCPT``) and the work (``handle_DATA``)."""

    closing: bool = False
    """Set by ``close()``: new transactions get ``421`` while in-flight ones finish."""
    inflight: set[asyncio.Task[Any]] = field(default_factory=set)
    """Commits under way; shutdown waits for them (bounded) before dropping connections."""
    connections: dict[ListenerSMTP, asyncio.Future[None]] = field(default_factory=dict)
    """Live connections, each with a future done when it is gone; kept by :class:`ListenerSMTP`."""
    max_sessions: int = 0
    """Connections beyond this many get ``421`` and are closed at once (0: no cap)."""
    refused_sessions: int = 0
    protocol_names: dict[type, ProtocolNames] = field(default_factory=dict)
    """What aiosmtpd looks up by introspection, per protocol class: see :class:`ProtocolNames`."""

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        """Add PIPELINING (aiosmtpd reads commands from a buffered stream, so it already copes)
        and record the client's name (the 5-argument hook form leaves that to us)."""
        session.host_name = hostname
        return [*responses[:1], "250-PIPELINING", *responses[1:]]

    def on_closed(self) -> None:
        """Called by :meth:`SmtpListenerHandle.close` last: release what the handler owns (worker processes...)."""

    def shielded(self, work: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Run ``work`` as its own task and return a shield to await.

        A client hanging up mid-commit cancels the hook, not the transaction, and
        shutdown waits for the task (it is in :attr:`inflight` until done).
        """
        task = asyncio.ensure_future(work)
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)
        return asyncio.shield(task)


# local@domain inside angle brackets, with no character that needs RFC 5322 parsing.
_SIMPLE_ANGLE_ADDR = re.compile(r'\s*<([^<>\s"\\(),:;@\[\]]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)>(.*)\Z', re.S)


class ListenerSMTP(SMTP):
    """aiosmtpd's protocol with three small fixes.

    * Command size limits per connection (aiosmtpd keeps them in a class-level dict that
      every new connection clears and every EHLO grows).
    * Our session class (:attr:`session_class`: quiet ``login_data``, and whatever a
      listener adds, such as the relay's AUTH failure counter).
    * Enhanced status codes on the few stock replies that lack them.
    It also reports its lifetime to the handler so shutdown can close live connections.
    """

    session_class: type[ListenerSession] = ListenerSession
    max_lines: int | None = None
    """Lines one message may have (the bounce listener sets it; the relay bounds bytes only)."""

    def __init__(self, handler: ListenerHandler, **kwargs: Any) -> None:
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self._closed_future: asyncio.Future[None] | None = None
        self._refused = False
        names = handler.protocol_names.get(type(self))
        if names is None:  # the first connection of this listener: aiosmtpd's own constructor
            super().__init__(handler, **kwargs)
            handler.protocol_names[type(self)] = ProtocolNames.of(self)
        else:
            self._construct(handler, names, **kwargs)
        self._listener_handler = handler

    def _construct(
        self,
        handler: ListenerHandler,
        names: ProtocolNames,
        *,
        data_size_limit: int | None,
        enable_SMTPUTF8: bool,
        decode_data: bool,
        hostname: str,
        ident: str,
        tls_context: ssl.SSLContext | None,
        timeout: float,
        auth_required: bool,
        auth_require_tls: bool,
        command_call_limit: dict[str, int],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """aiosmtpd's constructor for the arguments :func:`start_listener` passes, minus its introspection.

        ``SMTP.__init__`` scans the protocol and the handler with ``inspect.getmembers``,
        ``dir`` and ``inspect.signature`` on every connection to find its hooks: about
        1 ms of CPU per connection, a third of a core at 600 connections/s. The names
        are the same for every connection of a listener, so they are found once
        (:class:`ProtocolNames`) and only bound here. The attribute set is that of
        aiosmtpd 1.4 (pinned below 1.5); ``tests/test_smtp_server.py`` compares both
        constructors attribute by attribute.
        """
        self.__ident__ = ident
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        self.event_handler = handler
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = enable_SMTPUTF8
        self._decode_data = decode_data
        self.hostname = hostname
        self.tls_context = tls_context
        self.require_starttls = tls_context and False  # as aiosmtpd: falsy either way (None without TLS)
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = auth_require_tls
        self._proxy_timeout = None
        self._auth_callback = login_always_fail
        self._authenticator = None
        self._auth_required = auth_required
        self._auth_methods = {
            mech: _AuthMechAttr(getattr(self if builtin else handler, attr), builtin)
            for mech, (attr, builtin) in names.auth.items()
        }
        self._handle_hooks = {name: getattr(handler, attr) for name, attr in names.hooks.items()}
        self._ehlo_hook_ver = names.ehlo_hook_ver
        self._smtp_methods = {name: getattr(self, attr) for name, attr in names.commands.items()}
        self._enforce_call_limit = True
        self._call_limit_base = command_call_limit
        self._call_limit_default = command_call_limit.get("*", CALL_LIMIT_DEFAULT)

    def _create_session(self) -> Session:
        return self.session_class(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        h = self._listener_handler
        if self._closed_future is None and h.max_sessions and len(h.connections) >= h.max_sessions:
            # Over the cap: one line and goodbye, before aiosmtpd allocates a session or greets.
            self._refused = True
            h.refused_sessions += 1
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(b"421 4.7.0 Too many connections, try again later\r\n")
            transport.close()
            return
        super().connection_made(transport)
        if self._closed_future is None:  # called again after STARTTLS: same connection
            self._closed_future = self.loop.create_future()
            self._listener_handler.connections[self] = self._closed_future

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        try:
            super().connection_lost(error)
        finally:
            fut = self._listener_handler.connections.pop(self, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """Plain ``<local@domain>`` without quotes or comments skips the stdlib header parser
        (12% of the relay's CPU under load); anything else takes aiosmtpd's full path."""
        m = _SIMPLE_ANGLE_ADDR.match(arg)
        if m is None:
            return super()._getaddr(arg)
        addr = m.group(1)
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, m.group(2)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with the payload read in big chunks (:mod:`engine.submit.data`).

        The checks before ``354``, the replies, and the handler hook are aiosmtpd's; only the
        reading differs (same end-of-data, dot-stuffing, line-length and size rules).
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            payload = await read_payload(self._reader, self.data_size_limit, self.line_length_limit, self.max_lines)
        except asyncio.CancelledError:  # the connection went away during DATA
            self._writer.close()
            raise
        except asyncio.IncompleteReadError:  # the client hung up mid-message: nothing to answer
            log.info("connection_lost_in_data", peer=self.session.peer if self.session else None)
            self.close_connection()
            return
        if payload.outcome is not Outcome.OK:
            await self.push(_REFUSALS[payload.outcome].format(max_lines=self.max_lines))
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        self.envelope.content = self.envelope.original_content = payload.content
        status = await self._call_handler_hook("DATA") if "DATA" in self._handle_hooks else MISSING
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def push(self, status: str | bytes) -> None:
        raw = status.encode("utf-8") if isinstance(status, str) else status
        await super().push(_STOCK_REPLIES.get(raw, raw))

    def close_connection(self) -> None:
        if self.transport is not None:
            self.transport.close()


# -- listeners ---------------------------------------------------------------------------


@dataclass
class SmtpListenerHandle:
    """A running listener: its bound address, and ``close()`` for a graceful stop."""

    name: str
    server: asyncio.Server
    handler: ListenerHandler
    shutdown_timeout: float
    address: tuple[str, int] = ("", 0)
    """The bound ``(host, port)``: the real port when the config said 0 (kept after close)."""

    def __post_init__(self) -> None:
        if self.server.sockets:
            sockname = self.server.sockets[0].getsockname()
            self.address = (str(sockname[0]), int(sockname[1]))

    async def close(self) -> None:
        """Stop accepting, let in-flight commits finish (bounded), then drop open connections."""
        self.handler.closing = True
        self.server.close()
        pending = set(self.handler.inflight)
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.shutdown_timeout)
            if late:
                log.warning("smtp_shutdown_commits_unfinished", count=len(late), listener=self.name)
        conns = dict(self.handler.connections)
        for proto in conns:
            proto.close_connection()
        if conns:
            await asyncio.wait(list(conns.values()), timeout=min(5.0, self.shutdown_timeout))
        await self.server.wait_closed()
        self.handler.on_closed()
        log.info("smtp_listener_stopped", listener=self.name)


async def start_listener(
    name: str,
    handler: ListenerHandler,
    listen: tuple[str, int],
    *,
    label: str,
    hostname: str,
    ident: str,
    data_size_limit: int | None,
    timeout: float,
    shutdown_timeout: float,
    tls_context: ssl.SSLContext | None = None,
    auth_require_tls: bool = True,
    protocol: type[ListenerSMTP] = ListenerSMTP,
    max_sessions: int = 0,
    sock: socket.socket | None = None,
) -> SmtpListenerHandle:
    """Serve ``handler`` on ``listen`` (or on ``sock``, already listening) from the running loop.

    ``label`` names the listener in errors.

    AUTH is never required by aiosmtpd itself (a listener that wants it says so in
    ``handle_MAIL``, where it knows more than aiosmtpd does). Raises
    :class:`ListenerError` when the address cannot be bound.
    """
    loop = asyncio.get_running_loop()
    handler.max_sessions = max_sessions

    def factory() -> ListenerSMTP:
        return protocol(
            handler,
            data_size_limit=data_size_limit,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=hostname,
            ident=ident,
            tls_context=tls_context,
            timeout=timeout,
            auth_required=False,
            auth_require_tls=auth_require_tls,
            command_call_limit=COMMAND_CALL_LIMITS,
            loop=loop,
        )

    host, port = listen
    try:
        if sock is not None:
            server = await loop.create_server(factory, sock=sock)
        else:
            server = await loop.create_server(factory, host, port, reuse_address=True)
    except OSError as exc:
        raise ListenerError(f"{label} cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return SmtpListenerHandle(name, server, handler, shutdown_timeout)
