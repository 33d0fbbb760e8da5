"""SMTP submission relay: aiosmtpd servers running inside the engine's own event loop.

One :class:`RelayHandler` per listener holds the policy (aiosmtpd hooks):
``handle_MAIL``/``handle_RCPT`` decide who may relay and what addresses are
acceptable, ``handle_DATA`` hands the message to :class:`engine.accept.Acceptor`
and answers ``250`` only once Postgres has committed it. AUTH PLAIN/LOGIN are
handler methods (``auth_PLAIN``/``auth_LOGIN``) so the API-key lookup is awaited,
never blocking the loop.

The server underneath (protocol fixes, command limits, the listener handle and its
graceful stop) is :mod:`engine.submit.server`, shared with the bounce/FBL listener.
The relay is never open: a client that has not authenticated and is not in the
listener's trusted networks gets ``530`` at MAIL, whatever the listener's other
settings. A listener's trusted networks are its own ``trusted_networks``; a
``trusted = true`` listener without one inherits ``[smtp] trusted_networks``, an
untrusted one trusts no address at all.

The message is stored exactly as the client meant it: aiosmtpd's
``original_content`` is the DATA payload after removing dot-stuffing, with the
CRLF line endings as transmitted; no header is added here (a Received header, if
any, is added at send time).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import math
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session

from engine.accept import Acceptor
from engine.addresses import AddressError, is_address_literal, split_address
from engine.apikeys import ApiKey, ApiKeys, hash_key
from engine.config import Settings, SmtpListener
from engine.errors import DatabaseUnavailable, ValidationFailed
from engine.submit.server import (
    MAX_AUTH_FAILURES,
    NULL_SENDER,
    ListenerHandler,
    ListenerSession,
    ListenerSMTP,
    SmtpListenerHandle,
    format_peer,
    format_reply,
    start_listener,
)
from engine.submit.tls import ensure_self_signed, server_context
from engine.submit.trace import add_trace, protocol

log = structlog.get_logger(__name__)

class RelaySession(ListenerSession):
    """The listener session plus the relay's AUTH state: failures so far, the key it proved."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.auth_failures = 0
        self.key_digest: bytes | None = None  # hash of the proven key, re-checked at each MAIL

    def drop_auth(self) -> None:
        """Forget the proven key (it was revoked): the client must AUTH again."""
        self.authenticated = False
        self.auth_data = None
        self.key_digest = None

    @property
    def api_key(self) -> ApiKey | None:
        return self.auth_data if self.authenticated and isinstance(self.auth_data, ApiKey) else None


class RelaySMTP(ListenerSMTP):
    """The listener protocol with the relay's session (AUTH failure counter, proven key)."""

    session_class = RelaySession


@dataclass
class RelayHandler(ListenerHandler):
    """Policy and commit for one listener; aiosmtpd calls the ``handle_*`` and ``auth_*`` methods.

    ``handle_EHLO`` and the shutdown state come from :class:`ListenerHandler`.
    """

    settings: Settings
    listener: SmtpListener
    acceptor: Acceptor
    apikeys: ApiKeys

    def __post_init__(self) -> None:
        nets = self.listener.trusted_networks
        if nets is None:
            # Only a trusted listener inherits [smtp] trusted_networks; an untrusted one
            # (a public submission port) trusts nobody by address unless it says so itself.
            nets = self.settings.smtp.trusted_networks if self.listener.trusted else []
        self._networks = [ipaddress.ip_network(n, strict=False) for n in nets]

    # -- who may relay -------------------------------------------------------------------

    def peer_trusted(self, session: Session) -> bool:
        """Is the client's address inside the listener's trusted networks (see ``__post_init__``)?"""
        peer = session.peer
        if not isinstance(peer, tuple) or not peer:
            return False  # not a TCP peer (unix socket, unknown): never trusted by address
        try:
            ip = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._networks)

    def may_relay(self, session: Session) -> bool:
        """Authenticated with a send-scoped key, or connecting from a trusted network.

        There is no switch to widen this: an unauthenticated client outside the trusted
        networks is refused on every listener (never an open relay).
        """
        return bool(session.authenticated) or self.peer_trusted(session)

    @staticmethod
    def _address_problem(address: str, smtputf8: bool) -> str | None:
        try:
            address.encode("utf-8")
        except UnicodeEncodeError:
            return "553 5.1.3 Address is not valid UTF-8"
        if not address.isascii() and not smtputf8:
            return "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter on MAIL FROM"
        try:
            split_address(address)
        except AddressError as exc:
            return format_reply("553 5.1.3", f"Bad address: {exc}")
        return None

    # -- aiosmtpd hooks ------------------------------------------------------------------

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self.closing:
            return "421 4.3.2 Service shutting down, try again later"
        if isinstance(session, RelaySession) and session.authenticated and session.key_digest is not None:
            refusal = await self._recheck_key(session)
            if refusal:
                return refusal
        if not self.may_relay(session):
            return "530 5.7.0 Authentication required"
        if address != NULL_SENDER:
            problem = self._address_problem(address, envelope.smtp_utf8)
            if problem:
                return problem
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def _recheck_key(self, session: RelaySession) -> str | None:
        """Is the key this session proved still valid? A refusal reply when not.

        Called at every MAIL FROM, through the ApiKeys cache (``[api] key_cache_ttl``),
        so revoking a key also stops sessions that authenticated before the revocation.
        A revoked or expired key, or one whose allowlist no longer takes the client's address,
        ends the session's authentication: the answer is the same ``530``
        as for a client that never authenticated (RFC 4954 section 6); this transaction is
        refused even from a trusted network, since the client chose to send as that key.
        """
        assert session.key_digest is not None
        try:
            key = await self.apikeys.verify_digest(session.key_digest)
        except Exception as exc:
            log.warning("smtp_auth_unavailable", reason=f"{type(exc).__name__}: {exc}", listener=self.listener.name)
            return "454 4.7.0 Temporary authentication failure, try again later"
        if key is not None and key.allows("send"):
            if key.permits(_peer_ip(session)):
                return None
            log.info("smtp_auth_not_allowed", api_key=key.name, listener=self.listener.name, peer=format_peer(session))
            session.drop_auth()
            return "530 5.7.0 Authentication required (the API key is no longer allowed from this address)"
        log.info("smtp_auth_revoked", listener=self.listener.name, peer=format_peer(session))
        session.drop_auth()
        return "530 5.7.0 Authentication required (the API key is no longer valid)"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if not self.may_relay(session):
            return "530 5.7.0 Authentication required"
        limit = self.settings.smtp.max_recipients
        if len(envelope.rcpt_tos) >= limit:
            return f"452 4.5.3 Too many recipients (at most {limit} per message)"
        problem = self._address_problem(address, envelope.smtp_utf8)
        if problem:
            return problem
        if not self.settings.routing.allow_address_literals and is_address_literal(address.rpartition("@")[2]):
            # 553: "mailbox name not allowed" (RFC 5321 4.2.3) - the address is well-formed but
            # refused by policy, hence 5.7.1 "delivery not authorized" (RFC 3463) and not 5.1.3 (syntax).
            return "553 5.7.1 Address literals are not accepted as recipients; use a domain name"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Commit, then answer. Nothing is stored before the final dot has been read."""
        if self.closing:
            return "421 4.3.2 Service shutting down, try again later"
        data = envelope.original_content
        assert isinstance(data, bytes)
        mail_from = "" if envelope.mail_from == NULL_SENDER else (envelope.mail_from or "")
        key = session.api_key if isinstance(session, RelaySession) else None
        try:
            msg = self.acceptor.build_smtp_message(mail_from, envelope.rcpt_tos, data, key.id if key else None)
            peer = session.peer[0] if isinstance(session.peer, tuple) and session.peer else None
            assert msg.raw is not None
            msg.raw = add_trace(
                msg.raw, helo=session.host_name, peer_ip=str(peer) if peer else None, hostname=self.settings.server.hostname,
                proto=protocol(session.ssl is not None, key is not None), queue_id=str(msg.id), now=datetime.now(UTC),
            )
        except AddressError as exc:
            return format_reply("553 5.1.3", f"Bad address: {exc}")
        except ValidationFailed as exc:
            code = "554 5.3.5" if exc.field == "stream" else "554 5.6.0"
            return format_reply(code, f"Message rejected: {exc.message}")
        # The commit runs as its own task: a client hanging up mid-commit must not cancel a
        # transaction half-way, and shutdown waits for these tasks.
        try:
            rows = await self.shielded(self.acceptor.commit([msg]))
        except DatabaseUnavailable as exc:
            log.warning("smtp_commit_failed", reason=str(exc), listener=self.listener.name, peer=format_peer(session))
            return "451 4.3.0 Database unavailable, message not queued; try again later"
        except asyncio.CancelledError:
            log.warning("smtp_client_gone_during_commit", message_id=str(msg.id), listener=self.listener.name)
            raise
        except Exception:
            log.exception("smtp_commit_error", listener=self.listener.name, peer=format_peer(session))
            return "451 4.3.0 Local error in processing, message not queued; try again later"
        log.info(
            "smtp_message_accepted",
            message_id=str(msg.id),
            recipients=len(rows[0]),
            size=len(data),
            listener=self.listener.name,
            api_key=key.name if key else None,
            peer=format_peer(session),
        )
        return f"250 2.0.0 Ok: queued as {msg.id}"

    async def handle_exception(self, error: Exception) -> str:
        """Any other failure in a hook: a temporary error, never a traceback on the wire."""
        log.error("smtp_session_error", error=f"{type(error).__name__}: {error}", listener=self.listener.name)
        return "451 4.3.0 Local error in processing; try again later"

    # -- AUTH (aiosmtpd awaits handler methods named auth_<MECH>) --------------------------

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)  # aiosmtpd already answered 501
        else:
            decoded = await _b64(server, args[1])
            if decoded is None:
                return AuthResult(success=False, handled=True)
            blob = decoded
        assert isinstance(blob, bytes)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await server.push("501 5.5.2 Cannot split AUTH PLAIN response into authzid, authcid and password")
            return AuthResult(success=False, handled=True)
        return await self._authenticate(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await server.challenge_auth(SMTP.AuthLoginUsernameChallenge)
            if login is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            decoded = await _b64(server, args[1])
            if decoded is None:
                return AuthResult(success=False, handled=True)
            login = decoded
        password = await server.challenge_auth(SMTP.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        assert isinstance(login, bytes) and isinstance(password, bytes)
        return await self._authenticate(server, login, password)

    async def _authenticate(self, server: SMTP, login: bytes, password: bytes) -> AuthResult:
        """Username is the key's name or ``api``; the password is the API key (scope ``send``).

        A client address over ``[api] auth_failures_per_minute`` is refused before the lookup
        (``454 4.7.0``, see :mod:`engine.authlimit`); a valid key used from outside its IP
        allowlist is refused (``535 5.7.8``) and counted as a failure.
        """
        session = server.session
        assert isinstance(session, RelaySession)
        ip = _peer_ip(session)
        failures = self.apikeys.failures
        wait = failures.retry_after(ip)
        if wait > 0:  # too many failures from this address: refused before the key is looked up
            failures.refused("smtp")
            return await self._auth_failed(
                server, session, f"Too many failed authentications from your address, try again in {math.ceil(wait)} s",
                code="454 4.7.0",
            )
        try:
            username, secret = login.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            failures.failed(ip, "smtp")
            return await self._auth_failed(server, session, "Authentication credentials invalid")
        try:
            key = await self.apikeys.verify(secret)
        except Exception as exc:  # database down or broken: not the client's fault, do not count it
            log.warning("smtp_auth_unavailable", reason=f"{type(exc).__name__}: {exc}", listener=self.listener.name)
            return AuthResult(success=False, handled=False, message="454 4.7.0 Temporary authentication failure")
        if key is None or username not in (key.name, "api"):
            failures.failed(ip, "smtp")
            return await self._auth_failed(server, session, "Authentication credentials invalid")
        if not key.permits(ip):
            failures.failed(ip, "smtp")
            log.info("smtp_auth_not_allowed", api_key=key.name, listener=self.listener.name, peer=format_peer(session))
            return await self._auth_failed(
                server, session, "Authentication refused: this API key may not be used from your address (IP allowlist)"
            )
        if not key.allows("send"):
            return await self._auth_failed(server, session, "Authentication credentials invalid: key lacks the send scope")
        log.info("smtp_auth_ok", api_key=key.name, listener=self.listener.name, peer=format_peer(session))
        session.key_digest = hash_key(secret)
        return AuthResult(success=True, auth_data=key)

    async def _auth_failed(self, server: SMTP, session: RelaySession, reason: str, code: str = "535 5.7.8") -> AuthResult:
        """Refuse this AUTH with ``code``; the connection's third refusal hangs up (``421``)."""
        session.auth_failures += 1
        log.info("smtp_auth_failed", failures=session.auth_failures, listener=self.listener.name, peer=format_peer(session))
        if session.auth_failures >= MAX_AUTH_FAILURES:
            await server.push("421 4.7.0 Too many failed authentication attempts, closing connection")
            if isinstance(server, RelaySMTP):
                server.close_connection()
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=f"{code} {reason}")


def _peer_ip(session: Session) -> str | None:
    """The client's IP address, or None when the peer is not a TCP address."""
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None


async def _b64(server: SMTP, text: str) -> bytes | None:
    """Decode an AUTH initial response (``=`` means empty, RFC 4954); answer 501 when it is not base64."""
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        await server.push("501 5.5.2 Cannot decode base64")
        return None


# -- listeners ---------------------------------------------------------------------------


async def _tls_context(settings: Settings, listener: SmtpListener) -> ssl.SSLContext | None:
    if listener.tls != "starttls":
        return None
    if listener.cert_file is not None and listener.key_file is not None:
        cert, key = listener.cert_file, listener.key_file
    else:  # config validation guarantees self_signed here
        cert, key = await asyncio.to_thread(ensure_self_signed, settings.home / "tls", settings.server.hostname)
    return await asyncio.to_thread(server_context, cert, key)


async def _start_one(
    settings: Settings, listener: SmtpListener, acceptor: Acceptor, apikeys: ApiKeys, sock: socket.socket | None
) -> SmtpListenerHandle:
    smtp = settings.smtp
    tls_context = await _tls_context(settings, listener)
    handle = await start_listener(
        listener.name,
        RelayHandler(settings, listener, acceptor, apikeys),
        listener.listen,
        label=f"SMTP listener {listener.name!r}",
        hostname=settings.server.hostname,
        ident="ESMTP ready",
        data_size_limit=smtp.max_message_size or None,
        timeout=smtp.data_timeout,
        shutdown_timeout=settings.server.shutdown_timeout,
        tls_context=tls_context,
        auth_require_tls=not listener.trusted,  # AUTH itself is required in handle_MAIL, unless trusted
        protocol=RelaySMTP,
        max_sessions=smtp.max_sessions,
        sock=sock,
    )
    log.info(
        "smtp_listener_started",
        listener=listener.name,
        address="%s:%d" % handle.address,
        tls=listener.tls,
        trusted=listener.trusted,
    )
    return handle


async def start_smtp_listeners(
    settings: Settings, acceptor: Acceptor, apikeys: ApiKeys, sockets: Mapping[str, socket.socket] | None = None
) -> list[SmtpListenerHandle]:
    """Start one server per ``[[smtp.listeners]]`` entry on the running loop.

    ``sockets``: listening sockets bound by the supervisor, by ``smtp:<listener name>``
    (an intake child, see :mod:`engine.intake`); a listener without one binds its own.

    All or nothing: if one listener cannot start, those already started are closed
    and the error is raised, so the engine never runs with half its listeners.
    """
    if not settings.smtp.enabled:
        return []
    handles: list[SmtpListenerHandle] = []
    try:
        for listener in settings.smtp.listeners:
            sock = (sockets or {}).get(f"smtp:{listener.name}")
            handles.append(await _start_one(settings, listener, acceptor, apikeys, sock))
    except BaseException:
        await close_smtp_listeners(handles)
        raise
    return handles


async def close_smtp_listeners(handles: Sequence[SmtpListenerHandle]) -> None:
    """Close several listeners concurrently (their shutdown timeouts overlap instead of adding up)."""
    if handles:
        await asyncio.gather(*(h.close() for h in handles))
