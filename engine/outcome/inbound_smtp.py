"""The bounce/FBL listener's SMTP protocol: what one unauthenticated client may cost the event loop.

Anyone on the internet may connect to the inbound listener, so its per-connection work
must not grow with how the client cuts its bytes into lines. aiosmtpd reads ``DATA`` one
line at a time, a few microseconds of Python each: 2 million short lines (6 MB of
``=\\r\\n``) cost seconds of event-loop time, and three such messages at once stalled
``/healthz`` for 4.4 s. :class:`InboundSMTP` therefore

* reads ``DATA`` by blocks like every listener (:mod:`engine.submit.data`: the cost follows
  the bytes, not the lines), with ``max_lines`` set: a message over ``max_message_size`` or
  ``max_lines`` gets ``552 5.3.4`` and one with a line over 1001 octets ``500 5.5.2``, after
  reading it to its end (RFC 5321 4.2.5) while keeping none of it past the size limit;
* hangs up (``421``) on a client after :data:`MAX_ERRORS` error replies (blank lines,
  unknown commands, refused recipients...), each of which would otherwise cost a reply;
* caps commands per connection at :data:`INBOUND_COMMAND_LIMITS` (a bounce sender sends
  a handful of messages, not a million).

Parsing the accepted message is the handler's business (:mod:`engine.outcome.inbound`
runs it in a bounded process pool, off the loop and off its GIL).
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

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

class InboundSMTP(ListenerSMTP):
    """The listener protocol with a line bound, an error budget and tighter command ceilings."""

    def __init__(self, handler: ListenerHandler, **kwargs: Any) -> None:
        kwargs["command_call_limit"] = INBOUND_COMMAND_LIMITS
        super().__init__(handler, **kwargs)
        self._errors = 0
        self.max_lines = getattr(handler, "max_lines", DEFAULT_MAX_LINES)

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
