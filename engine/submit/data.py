"""Reading the DATA payload in big chunks instead of line by line.

aiosmtpd reads DATA one ``readuntil(b"\\r\\n")`` at a time and joins the lines: for a 100 KB
message that is some 1,300 awaits and as many small copies, 80% of the listener's CPU at
100 KB (py-spy, issue 14). :func:`read_payload` takes whatever the stream has buffered in one
``read``, finds the end of data with :meth:`bytearray.find`, and undoes dot-stuffing with one
:meth:`bytes.replace`: the cost per byte is a few copies.

The rules are aiosmtpd's, so nothing a client can observe changes:

* the payload ends at a line that is exactly ``.`` followed by CRLF, the line before it
  ending in CRLF too (or the payload is empty): a bare LF or bare CR around the dot does
  not end it (no SMTP smuggling, RFC 5321 4.1.1.4);
* a line longer than ``line_length_limit`` octets with its CRLF (aiosmtpd: 1001) makes the
  reply ``500`` once the payload has been read; more than ``size_limit`` octets of (stuffed)
  payload, ``552``; whichever came first in the stream wins; nothing is kept once either is
  known (memory stays bounded by the size limit);
* one leading dot is removed from every line that starts with one (RFC 5321 4.5.2);
* bytes after the end of data (pipelined commands, or a smuggling attempt in the same
  packet) go back to the stream, to be read as commands.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

from engine.linebreaks import has_long_line

END = b"\r\n.\r\n"
"""The end of data, counting the CRLF that ends the last line (which belongs to the payload)."""

_READ_ALL = 1 << 30
"""``StreamReader.read(n)`` returns ``min(n, buffered)``: with this n it takes the whole buffer."""


class Outcome(enum.Enum):
    OK = enum.auto()
    TOO_LONG = enum.auto()
    TOO_MUCH = enum.auto()
    TOO_MANY_LINES = enum.auto()


@dataclass(frozen=True, slots=True)
class Payload:
    """The unstuffed message (empty unless :attr:`outcome` is OK) and how reading it went."""

    outcome: Outcome
    content: bytes = b""


def unstuff(stuffed: bytes) -> bytes:
    """Remove one leading dot from every line (RFC 5321 4.5.2); the same object when none has one."""
    if stuffed.startswith(b"."):
        stuffed = stuffed[1:]
    return stuffed.replace(b"\r\n.", b"\r\n")  # the same object when there is nothing to replace


async def read_payload(
    reader: asyncio.StreamReader, size_limit: int | None, line_length_limit: int, max_lines: int | None = None
) -> Payload:
    """Read up to and including the end of data; see the module docstring for the rules.

    ``line_length_limit`` counts the CRLF (aiosmtpd's ``line_length_limit``). ``max_lines``
    (the bounce listener's bound on what a parser will be handed) refuses a message within
    the size limit that has more lines: one ``bytes.count``, after the size and line checks.
    Raises :class:`asyncio.IncompleteReadError` if the stream ends first.
    """
    # A virtual CRLF in front: the DATA command line ended with one, so an empty payload
    # (".\r\n" at once) is found by the same search as every other end.
    buf = bytearray(b"\r\n")
    start = 0
    dropped = False   # over the size limit: only the last bytes are kept, to find the end
    outcome = Outcome.OK
    max_line = line_length_limit - 2
    while True:
        chunk = await reader.read(_READ_ALL)
        if not chunk:
            raise asyncio.IncompleteReadError(bytes(buf[2:]), None)
        buf += chunk
        end = buf.find(END, start)
        if end >= 0:
            break
        start = max(0, len(buf) - (len(END) - 1))
        if not dropped and size_limit is not None and len(buf) - 2 - 3 > size_limit:
            outcome = _over_limit(buf, size_limit, max_line)
            dropped = True
        if dropped:  # keep what the end of data could start in, nothing else
            del buf[: start]
            start = 0
    leftover = bytes(buf[end + len(END):])
    if leftover and not reader.at_eof():  # at EOF aiosmtpd cancels the session anyway
        # read() took the whole buffer, so these bytes come before anything still unread.
        reader.feed_data(leftover)
    if dropped:
        return Payload(outcome)
    stuffed = bytes(buf[2 : end + 2])
    if size_limit is not None and len(stuffed) > size_limit:
        return Payload(_over_limit(buf, size_limit, max_line))
    if has_long_line(stuffed, max_line):
        return Payload(Outcome.TOO_LONG)
    if max_lines is not None and stuffed.count(b"\n") > max_lines:
        return Payload(Outcome.TOO_MANY_LINES)
    return Payload(Outcome.OK, unstuff(stuffed))


def _over_limit(buf: bytearray, size_limit: int, max_line: int) -> Outcome:
    """Past the size limit: 500 if an over-long line came within the limit, else 552 (first wins)."""
    head = buf[2 : size_limit + 2]
    return Outcome.TOO_LONG if has_long_line(head, max_line) else Outcome.TOO_MUCH


__all__ = ["END", "Outcome", "Payload", "read_payload", "unstuff"]
