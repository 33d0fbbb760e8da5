"""The reply reader: SMTP replies parsed in arrival order, so several commands can be in flight.

aiosmtplib (5.x) has no PIPELINING support and its protocol object discards a
reply that arrives while a previous one waits to be read. So for the length of
one transaction a :class:`ReplyReader` takes over the same transport
(``transport.set_protocol``, public asyncio API; see
:meth:`engine.deliver.smtp.connection.Connection.borrowed`) and queues every
reply it parses. That lets MAIL and all RCPTs go out in one write when the
server offers PIPELINING (RFC 2920).
"""

from __future__ import annotations

import asyncio
from collections import deque

from engine.deliver.smtp.reply import Reply

_MAX_REPLY_BYTES = 64 * 1024


class ConnectionLost(Exception):
    """The server closed the connection (or it broke) while a transaction was using it."""


class BadReply(Exception):
    """The server sent something that is not an SMTP reply; the session cannot be trusted."""


class ReplyReader(asyncio.Protocol):
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
                self._fail(BadReply(f"malformed reply line {line[:80]!r}"))
                return
            self._lines.append(line)
            if line[3:4] != b"-":
                text = "\n".join(ln[4:].decode("utf-8", "replace").strip() for ln in self._lines)
                self._replies.append(Reply(int(self._lines[0][:3]), text))
                self._lines = []
        if len(self._buf) + sum(map(len, self._lines)) > _MAX_REPLY_BYTES:
            self._fail(BadReply("reply too long"))
        self._wake()

    def eof_received(self) -> bool:
        self._fail(ConnectionLost("server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionLost(f"connection lost ({exc})" if exc else "connection closed"))
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
            raise ConnectionLost("connection already closed")
        self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            await self._writable.wait()
        if self.closed:
            raise ConnectionLost("connection closed while sending")

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


__all__ = ["BadReply", "ConnectionLost", "ReplyReader"]
