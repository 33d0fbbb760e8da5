"""The bounce/FBL listener's SMTP protocol: what one unauthenticated client may cost the event loop.

Anyone on the internet may connect to the inbound listener, so its per-connection work
must not grow with how the client cuts its bytes into lines. aiosmtpd reads ``DATA`` one
line at a time, a few microseconds of Python each: 2 million short lines (6 MB of
``=\\r\\n``) cost seconds of event-loop time, and three such messages at once stalled
``/healthz`` for 4.4 s. :class:`InboundSMTP` therefore

* reads ``DATA`` by blocks: finding the end, counting lines, finding an over-long line and
  undoing dot-stuffing are C scans over the block (``bytes.find``/``count``/``replace``
  and one anchored regex), so the cost follows the bytes, not the lines;
* refuses a message over ``max_message_size`` or ``max_lines`` with ``552 5.3.4`` and one
  with a line over 1001 octets with ``500 5.5.2``, after reading it to its end (RFC 5321
  4.2.5) while keeping none of it;
* hangs up (``421``) on a client after :data:`MAX_ERRORS` error replies (blank lines,
  unknown commands, refused recipients...), each of which would otherwise cost a reply;
* caps commands per connection at :data:`INBOUND_COMMAND_LIMITS` (a bounce sender sends
  a handful of messages, not a million).

Parsing the accepted message is the handler's business (:mod:`engine.outcome.inbound`
runs it in a bounded process pool, off the loop and off its GIL).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import structlog
from aiosmtpd.smtp import MISSING, syntax

from engine.submit.server import COMMAND_CALL_LIMITS, ListenerHandler, ListenerSMTP

log = structlog.get_logger(__name__)

MAX_ERRORS = 20
"""Error replies one connection may draw before it is closed with ``421``."""

INBOUND_COMMAND_LIMITS: dict[str, int] = {**COMMAND_CALL_LIMITS, "*": 10_000}
"""The relay's per-command ceilings, with transaction commands bounded too (10,000 a connection)."""

DEFAULT_MAX_LINES = 200_000
"""Lines in one message unless the handler says (``[feedback.inbound] max_lines``)."""

MAX_LINE = 1001
"""Octets in a line including its CRLF: aiosmtpd's bound (RFC 5321 4.5.3.1.6 says 1000; one more is tolerated)."""

_READ = 4 * 1024 * 1024
"""Bytes asked of the stream reader at once: more than it ever buffers (its transport pauses
past a few kB, after one receive of at most 256 kB), so each read drains it."""

_END = b"\r\n.\r\n"
_LONG_LINE = re.compile(rb"(?m)^[^\n]{%d}" % MAX_LINE)
"""A line start followed by 1001 octets without LF: with its LF, over :data:`MAX_LINE`.
Anchored at line starts, so the scan is linear in the input."""


class DataTooBig(Exception):
    """Why a message was refused after reading it; ``reply`` is the SMTP answer."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


async def read_data(reader: asyncio.StreamReader, *, max_bytes: int | None, max_lines: int) -> bytes:
    """The message after ``354``, dot-stuffing undone, up to the ``<CRLF>.<CRLF>`` that ends it.

    Raises :class:`DataTooBig` (after reading to the end, keeping nothing) when the message has
    more than ``max_bytes`` octets or ``max_lines`` lines or a line over :data:`MAX_LINE` octets;
    ``asyncio.IncompleteReadError`` when the client hangs up first. Bytes the client sent after
    the end (pipelined commands) are handed back to ``reader``.
    """
    data = bytearray(b"\r\n")  # a CRLF in front: a message that is just "." ends at offset 0
    scanned = 0  # offsets below this hold no end marker (bar one cut by a block edge)
    line_start = 2  # where the line being read began
    lines = -1  # the CRLF in front is not a line
    refusal: str | None = None
    while True:
        block = await reader.read(_READ)
        if not block:
            raise asyncio.IncompleteReadError(bytes(data[-4:]), None)
        data += block
        end = data.find(_END, max(0, scanned - 4))
        stop = len(data) if end < 0 else end + 2  # the message's octets end here (its last CRLF included)
        if refusal is None:
            lines += data.count(b"\n", scanned, stop)
            if _LONG_LINE.search(data, line_start, stop):
                refusal = "500 5.5.2 Line too long (limit 1000 octets, RFC 5321 4.5.3.1.6)"
            elif max_bytes and stop - 2 > max_bytes:
                refusal = "552 5.3.4 Message size exceeds fixed maximum message size"
            elif lines > max_lines:
                refusal = f"552 5.3.4 Message has too many lines (at most {max_lines})"
            line_start = data.rfind(b"\n", 0, stop) + 1
        if end >= 0:
            rest = bytes(data[end + len(_END) :])
            if rest and not reader.at_eof():
                reader.feed_data(rest)  # read() drained the buffer: the rest goes back in order
            if refusal is not None:
                raise DataTooBig(refusal)
            return bytes(data[: end + 2]).replace(b"\r\n.", b"\r\n")[2:]
        if refusal is not None:  # keep only what an end marker cut by the next block edge needs
            del data[: len(data) - 4]
            line_start = 0
        scanned = len(data)


class InboundSMTP(ListenerSMTP):
    """The listener protocol with block-wise ``DATA``, an error budget and tighter command ceilings."""

    def __init__(self, handler: ListenerHandler, **kwargs: Any) -> None:
        kwargs["command_call_limit"] = INBOUND_COMMAND_LIMITS
        super().__init__(handler, **kwargs)
        self._errors = 0
        self.max_lines: int = getattr(handler, "max_lines", DEFAULT_MAX_LINES)

    async def push(self, status: str | bytes) -> None:
        """Send a reply, counting errors; past the budget, say ``421`` and end the session.

        Ending it means raising ``CancelledError`` (aiosmtpd's "connection gone" path): merely
        closing the transport would leave aiosmtpd answering every line still buffered, up to
        a whole receive of blank lines, without yielding to the loop.
        """
        if self.transport is None or self.transport.is_closing():
            raise asyncio.CancelledError  # hung up on (by us or the client): nobody to answer
        if status[:1] in ("5", b"5"):
            self._errors += 1
            if self._errors > MAX_ERRORS:
                log.info("inbound_too_many_errors", peer=self.session.peer if self.session else None)
                await super().push("421 4.7.0 Too many errors, closing connection")
                self.close_connection()
                raise asyncio.CancelledError
        await super().push(status)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's ``DATA`` (same checks and replies), reading the message by blocks."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            content = await read_data(self._reader, max_bytes=self.data_size_limit, max_lines=self.max_lines)
        except DataTooBig as refused:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(refused.reply)
            return
        except asyncio.IncompleteReadError:
            log.info("inbound_connection_lost_in_data")
            self.close_connection()
            return
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)
