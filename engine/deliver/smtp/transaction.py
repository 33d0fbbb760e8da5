"""One transaction on a borrowed connection: RSET if needed, MAIL, RCPT..., DATA, the body.

MAIL and all RCPTs go out in one write when the server offers PIPELINING
(RFC 2920), one by one otherwise; DATA is only sent once at least one RCPT was
accepted. Every recipient ends with exactly one
:class:`~engine.deliver.smtp.results.RecipientReply`: the reply that decided
it, or, when the session broke, a temporary result whose text names the step
and the host (``"timed out after 300s waiting for the reply to RCPT TO from
mx[192.0.2.1]:25"``).

Hot path: one :class:`Transaction` object per message and one await per
command reply; nothing here is repeated per recipient except building its
RCPT line and reading its reply.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping

import structlog

from engine.compose.sevenbit import body_class
from engine.deliver.smtp.connection import Connection
from engine.deliver.smtp.reader import BadReply, ConnectionLost, ReplyReader
from engine.deliver.smtp.reply import Reply
from engine.deliver.smtp.results import OutboundMessage, Phase, RecipientReply, TransactionResult
from engine.deliver.smtp.settings import SmtpClientSettings
from engine.linebreaks import crlf

log = structlog.get_logger(__name__)

_BAD_ADDRESS = re.compile(r"[\x00-\x20\x7f<>]")

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


# -- the envelope and the body on the wire ---------------------------------------


def check_envelope(message: OutboundMessage) -> str | None:
    """A reason the envelope cannot be sent at all (a local, permanent problem), or None.

    Checked before a connection is borrowed, so a bad envelope never costs a session.
    """
    if not message.rcpt_tos:
        return "message has no recipients"
    for addr in [message.mail_from, *message.rcpt_tos]:
        if not isinstance(addr, str) or _BAD_ADDRESS.search(addr):
            return f"invalid envelope address {addr!r}"
    for addr in message.rcpt_tos:
        if "@" not in addr:
            return f"invalid envelope address {addr!r}"
    return None


def body_for(message: OutboundMessage, extensions: Mapping[str, str]) -> tuple[bytes, bool] | None:
    """The bytes to send to a server with these extensions, and whether they need ``BODY=8BITMIME``.

    8-bit data goes as it is only to a server that offers 8BITMIME; NUL and lines over 998
    octets go to nobody (RFC 5321 4.5.3.1.6, RFC 6152). Otherwise the message's 7-bit form
    is sent (RFC 6152 section 3: convert or bounce); None when there is none (bounce, 5.6.3).
    """
    data = message.data
    kind = body_class(data)  # bare CR/LF only make lines shorter once sent as CRLF: 7bit stays 7bit
    if kind != "7bit":
        kind = body_class(crlf(data))
    if kind == "7bit":
        return data, False
    if kind == "8bit" and "8bitmime" in extensions:
        return data, True
    converted = message.seven_bit() if message.seven_bit is not None else None
    if converted is None or body_class(crlf(converted)) != "7bit":
        return None
    return converted, False


def envelope_commands(
    message: OutboundMessage, extensions: Mapping[str, str], eight_bit: bool | None = None, size: int | None = None,
) -> tuple[bytes, list[bytes], str | None]:
    """MAIL and RCPT lines with the ESMTP options this server offers (SIZE, 8BITMIME, SMTPUTF8).

    ``eight_bit`` says whether to declare ``BODY=8BITMIME`` (None: when the server offers it
    and the data is not ASCII). The third item is a reason the envelope cannot go to this
    server (a UTF-8 address without SMTPUTF8), or None. ``size`` is the length of the bytes
    to be sent, when they are not ``message.data`` (a converted message).
    """
    options: list[bytes] = []
    addresses = [message.mail_from, *message.rcpt_tos]
    utf8 = not all(a.isascii() for a in addresses)
    if utf8:
        if "smtputf8" not in extensions:
            return b"", [], "SMTPUTF8 is required but not offered"
        options.append(b"SMTPUTF8")
    if "size" in extensions:
        options.append(b"SIZE=%d" % (len(message.data) if size is None else size))
    if eight_bit is None:
        eight_bit = "8bitmime" in extensions and not message.data.isascii()
    if eight_bit:
        options.append(b"BODY=8BITMIME")
    enc = "utf-8" if utf8 else "ascii"
    tail = (b" " + b" ".join(options)) if options else b""
    mail = b"MAIL FROM:<" + message.mail_from.encode(enc) + b">" + tail + b"\r\n"
    rcpts = [b"RCPT TO:<" + r.encode(enc) + b">\r\n" for r in message.rcpt_tos]
    return mail, rcpts, None


def dot_stuffed(data: bytes) -> bytes:
    """The body as sent after DATA: CRLF line ends, leading dots doubled, ended by CRLF.CRLF.

    Copies the body only when it must change (bare CR/LF, a leading dot, no final CRLF).
    """
    data = crlf(data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    # Every LF ends a line here (CRLF only), so "a dot after LF" is "a line starting with a dot";
    # replace() returns the same object when there is none.
    return data.replace(b"\n.", b"\n..") + b".\r\n"


# -- the exchange ----------------------------------------------------------------


class StaleConnection(Exception):
    """A reused connection was found dead before any reply; the pool retries once on a fresh one.

    ``fallback`` is the result to report if the retry cannot happen.
    """

    def __init__(self, fallback: TransactionResult) -> None:
        super().__init__("stale pooled connection")
        self.fallback = fallback


class Transaction:
    """One message on one connection; :meth:`run` never raises for what the server did.

    It keeps the step in progress (``phase``) and its timeout so that a
    timeout or a dropped connection is reported as the step it interrupted.
    """

    __slots__ = (
        "conn",
        "message",
        "settings",
        "reused",
        "started",
        "acquired",
        "label",
        "rcpts",
        "results",
        "data_reply",
        "replied",
        "phase",
        "timeout",
        "data",
    )

    def __init__(
        self,
        conn: Connection,
        message: OutboundMessage,
        settings: SmtpClientSettings,
        *,
        reused: bool,
        started: float,
    ) -> None:
        """``started`` is when the caller asked to send (the result's duration includes waiting for the pool)."""
        self.conn = conn
        self.message = message
        self.settings = settings
        self.reused = reused
        self.started = started
        self.acquired = time.monotonic()
        self.label = conn.label
        self.rcpts = list(message.rcpt_tos)
        self.results: dict[int, RecipientReply] = {}
        self.data_reply: Reply | None = None
        self.replied = False  # any reply at all: a reused session that answered was not stale
        self.phase: Phase = "mail"
        self.timeout = settings.mail_from_timeout
        self.data = message.data

    async def run(self) -> TransactionResult:
        """Run the exchange; raises :class:`StaleConnection` only for a reused session dead on arrival."""
        conn = self.conn
        conn.deliveries += 1
        try:
            with conn.borrowed() as rd:
                if conn.needs_rset:
                    await self._rset(rd)
                body = body_for(self.message, conn.extensions)
                if body is None:
                    offers = "offers" if "8bitmime" in conn.extensions else "does not offer"
                    return self._refused_locally(
                        "message has 8-bit data, NUL or lines over 998 octets, which cannot be converted to 7-bit "
                        f"(the receiver {offers} 8BITMIME)", "5.6.3",
                    )
                self.data = body[0]
                mail_cmd, rcpt_cmds, problem = envelope_commands(self.message, conn.extensions, body[1], len(self.data))
                if problem is not None:
                    return self._refused_locally(problem)
                conn.needs_rset = True  # until the transaction ends with an end-of-data reply
                mail_reply, rcpt_replies = await self._envelope(rd, mail_cmd, rcpt_cmds)
                accepted = self._recipients_for_data(mail_reply, rcpt_replies)
                if not accepted:
                    return self._finish()
                return await self._data(rd, accepted)
        except (TimeoutError, ConnectionLost, BadReply) as exc:
            return self._interrupted(exc)

    # -- steps, in order ----------------------------------------------------------

    async def _rset(self, rd: ReplyReader) -> None:
        """End the previous, unfinished transaction; a refused RSET means the session is out of step."""
        self.phase, self.timeout = "rset", self.settings.rset_timeout
        rd.write(b"RSET\r\n")
        reply = await rd.read(self.timeout)
        self.replied = True
        if not reply.ok:
            self.conn.broken = True
            raise ConnectionLost(f"RSET answered {reply}")
        self.conn.needs_rset = False

    def _refused_locally(self, problem: str, status: str = "5.6.7") -> TransactionResult:
        """The message cannot go to this server at all: permanent for everyone, nothing sent."""
        label = self.label
        for i, r in enumerate(self.rcpts):
            self.results[i] = RecipientReply(r, "permanent", None, status, f"{problem} ({label})", "local", label)
        return self._finish()

    async def _envelope(
        self, rd: ReplyReader, mail_cmd: bytes, rcpt_cmds: list[bytes]
    ) -> tuple[Reply, list[Reply]]:
        """MAIL and RCPTs: one write when pipelining, else RCPTs only after MAIL was accepted."""
        s = self.settings
        self.phase, self.timeout = "mail", s.mail_from_timeout
        if self.conn.pipelining:
            rd.write(mail_cmd + b"".join(rcpt_cmds))
            mail_reply = await rd.read(self.timeout)
            self.replied = True
            timeout = s.rcpt_to_timeout
            self.phase, self.timeout = "rcpt", timeout
            return mail_reply, [await rd.read(timeout) for _ in rcpt_cmds]
        rd.write(mail_cmd)
        mail_reply = await rd.read(self.timeout)
        self.replied = True
        rcpt_replies: list[Reply] = []
        if mail_reply.ok:
            timeout = s.rcpt_to_timeout
            self.phase, self.timeout = "rcpt", timeout
            for cmd in rcpt_cmds:
                rd.write(cmd)
                rcpt_replies.append(await rd.read(timeout))
        return mail_reply, rcpt_replies

    def _recipients_for_data(self, mail_reply: Reply, rcpt_replies: list[Reply]) -> list[int]:
        """Record MAIL and RCPT refusals; the indexes of the recipients DATA is for (none: stop here)."""
        conn, label, rcpts, results = self.conn, self.label, self.rcpts, self.results
        if mail_reply.code == 421 or any(r.code == 421 for r in rcpt_replies):
            conn.broken = True  # the server is closing this session
        if not mail_reply.ok:
            for i, r in enumerate(rcpts):
                results[i] = RecipientReply.from_reply(r, mail_reply, "mail", label)
            return []
        accepted: list[int] = []
        for i, (r, reply) in enumerate(zip(rcpts, rcpt_replies, strict=True)):
            if reply.code in (250, 251):
                accepted.append(i)
            else:
                results[i] = RecipientReply.from_reply(r, reply, "rcpt", label)
        if accepted and conn.broken:
            text = f"session with {label} closed before DATA"
            for i in accepted:
                results[i] = RecipientReply(rcpts[i], "temporary", None, None, text, "rcpt", label)
            return []
        return accepted

    async def _data(self, rd: ReplyReader, accepted: list[int]) -> TransactionResult:
        """DATA, the dot-stuffed body, and the end-of-data reply that decides every accepted recipient."""
        s, conn, label, rcpts, results = self.settings, self.conn, self.label, self.rcpts, self.results
        self.phase, self.timeout = "data", s.data_timeout
        rd.write(b"DATA\r\n")
        reply = await rd.read(self.timeout)
        if reply.code != 354:
            conn.broken = conn.broken or reply.code == 421
            for i in accepted:
                results[i] = RecipientReply.from_reply(rcpts[i], reply, "data", label)
            return self._finish()
        self.phase, self.timeout = "dot", s.data_block_timeout
        rd.write(dot_stuffed(self.data))
        await rd.drain(self.timeout)
        self.timeout = s.data_dot_timeout
        data_reply = self.data_reply = await rd.read(self.timeout)
        conn.needs_rset = False
        conn.broken = conn.broken or data_reply.code == 421
        for i in accepted:
            results[i] = RecipientReply.from_reply(rcpts[i], data_reply, "dot", label)
        return self._finish()

    # -- endings --------------------------------------------------------------------

    def _interrupted(self, exc: TimeoutError | ConnectionLost | BadReply) -> TransactionResult:
        """The session broke mid-step: close it; every undecided recipient is temporary."""
        conn, label = self.conn, self.label
        conn.broken = True
        conn.smtp.close()
        step = _PHASE_WORDS[self.phase]
        if isinstance(exc, TimeoutError):
            text = f"timed out after {self.timeout:g}s waiting for the reply to {step} from {label}"
        elif isinstance(exc, BadReply):
            text = f"bad reply from {label} to {step}: {exc}"
        else:
            text = f"connection to {label} lost during {step}"
        for i, r in enumerate(self.rcpts):
            if i not in self.results:
                self.results[i] = RecipientReply(r, "temporary", None, None, text, self.phase, label)
        stale = isinstance(exc, ConnectionLost) and self.reused and not self.replied
        result = self._finish(quiet=stale)
        if stale:
            raise StaleConnection(result) from exc
        return result

    def _finish(self, *, quiet: bool = False) -> TransactionResult:
        """The result in recipient order, logged as one ``smtp.transaction`` line unless ``quiet``."""
        conn, results, data_reply = self.conn, self.results, self.data_reply
        res = TransactionResult(
            results=[results[i] for i in range(len(self.rcpts))],
            data_reply=data_reply,
            host=self.label,
            tls=conn.tls,
            reused=self.reused,
            duration=time.monotonic() - self.started,
        )
        if quiet:
            return res
        codes = {r.code for r in res.results}
        log.info(
            "smtp.transaction",
            site=conn.key[0],
            host=self.label,
            code=data_reply.code
            if data_reply
            else (codes.pop() if len(codes) == 1 else sorted(map(str, codes))),
            duration_ms=round(res.duration * 1000, 1),
            wait_ms=round((self.acquired - self.started) * 1000, 1),
            recipients=len(self.rcpts),
            delivered=len(res.delivered),
            tls=conn.tls,
            reused=self.reused,
        )
        return res


__all__ = [
    "StaleConnection",
    "Transaction",
    "body_for",
    "check_envelope",
    "dot_stuffed",
    "envelope_commands",
]
