"""One open SMTP session as the pool keeps it, and how a transaction borrows its transport.

aiosmtplib opens and secures the session (banner, EHLO/HELO, STARTTLS, QUIT);
for each transaction the transport is lent to a
:class:`~engine.deliver.smtp.reader.ReplyReader` and given back afterwards,
unless the session broke or fell out of step, in which case it is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import aiosmtplib

from engine.deliver.hop import Hop
from engine.deliver.smtp.reader import ConnectionLost, ReplyReader
from engine.deliver.smtp.settings import TlsPolicy

PoolKey = tuple[str, str | None]
"""``(site, source address)``: connections are pooled and capped per key."""


@dataclass(eq=False)
class Connection:
    """One open SMTP session in the pool."""

    smtp: aiosmtplib.SMTP
    hop: Hop
    key: PoolKey
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
        """Whether this session may carry mail under ``policy`` (``required`` wants verified TLS)."""
        return policy != "required" or (self.tls and self.tls_verified)

    @contextmanager
    def borrowed(self) -> Iterator[ReplyReader]:
        """Hand the transport to a reply reader for one transaction, then give it back."""
        transport = self.smtp.transport
        inner = self.smtp.protocol
        if transport is None or inner is None or transport.is_closing():
            raise ConnectionLost("connection already closed")
        reader = ReplyReader(inner, transport)  # type: ignore[arg-type]
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


__all__ = ["Connection", "PoolKey"]
