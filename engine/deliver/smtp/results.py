"""What one transaction carries in and hands back: the message, and a reply per recipient.

Transport failures (refused, timeout, dropped connection, TLS required but
unavailable, 421 on connect) become temporary results for every recipient
with a reply text that says what happened and where
(``"connection refused by 127.0.0.2:2525"``); ``code`` is then None.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from engine.deliver.smtp.reply import Kind, Reply, kind_of

Phase = Literal["connect", "greeting", "ehlo", "starttls", "rset", "mail", "rcpt", "data", "dot", "local"]


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """What one transaction carries: the envelope for one destination and the final bytes.

    ``seven_bit`` makes the 7-bit form of the message (converted, then signed) for a receiver
    without 8BITMIME, or when the bytes have NUL or over-long lines; it returns None when the
    message cannot be converted. Without it such a message is refused locally (5.6.3).
    """

    mail_from: str
    rcpt_tos: Sequence[str]
    data: bytes
    seven_bit: Callable[[], bytes | None] | None = None


@dataclass(frozen=True, slots=True)
class RecipientReply:
    """What one transaction decided for one recipient.

    The SMTP client's raw answer, named apart from the outcome stage's
    ``DeliveryResult``, the final result (delivered / deferred / bounced)
    the outcome writer later decides from it.
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
    def from_reply(cls, recipient: str, reply: Reply, phase: Phase, host: str | None) -> RecipientReply:
        return cls(recipient, kind_of(reply.code), reply.code, reply.enhanced_status, str(reply), phase, host)


@dataclass(slots=True)
class TransactionResult:
    """Per-recipient results of one message to one destination, plus the end-of-data reply."""

    results: list[RecipientReply]
    data_reply: Reply | None = None
    host: str | None = None
    tls: bool = False
    reused: bool = False
    duration: float = 0.0

    @property
    def delivered(self) -> list[str]:
        return [r.recipient for r in self.results if r.kind == "delivered"]

    def for_recipient(self, recipient: str) -> RecipientReply:
        for r in self.results:
            if r.recipient == recipient:
                return r
        raise KeyError(recipient)

    @classmethod
    def for_all(
        cls,
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
        results = [RecipientReply(r, kind, code, enhanced, text, phase, None) for r in message.rcpt_tos]
        return cls(results=results, duration=time.monotonic() - started)


__all__ = ["OutboundMessage", "Phase", "RecipientReply", "TransactionResult"]
