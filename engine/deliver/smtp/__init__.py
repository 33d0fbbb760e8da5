"""Outbound SMTP: one transaction per message per destination, over pooled, reused connections.

The package's face is :class:`ConnectionPool` (``send()`` one message, get a
:class:`TransactionResult` with one :class:`RecipientReply` per recipient)
and the values it takes and gives. Inside, one job per module:

- ``settings``: :class:`SmtpClientSettings`, the ``[delivery.smtp]`` tunables;
- ``reply``: :class:`Reply`, enhanced status codes, delivered/temporary/permanent;
- ``results``: :class:`OutboundMessage` in, :class:`RecipientReply` and :class:`TransactionResult` out;
- ``reader``: the protocol that parses replies in arrival order (PIPELINING);
- ``connection``: one pooled session and how a transaction borrows its transport;
- ``connect``: opening a session (TCP from a source address, banner, EHLO, STARTTLS), walking the MX hops;
- ``transaction``: RSET, MAIL, RCPT..., DATA and the body, for one message;
- ``pool``: reuse, limits and idle timeouts per ``(site, source address)``.

This client only says *delivered / temporary / permanent*; what a reply means
is the classifier's job. The hops it walks are :class:`engine.deliver.hop.Hop`,
the same values routing produces.
"""

from __future__ import annotations

from engine.deliver.smtp.connect import SmtpSetupError
from engine.deliver.smtp.pool import ConnectionPool
from engine.deliver.smtp.reply import Kind, Reply, kind_of, parse_enhanced_status
from engine.deliver.smtp.results import OutboundMessage, Phase, RecipientReply, TransactionResult
from engine.deliver.smtp.settings import SmtpClientSettings, TlsPolicy

__all__ = [
    "ConnectionPool",
    "Kind",
    "OutboundMessage",
    "Phase",
    "RecipientReply",
    "Reply",
    "SmtpClientSettings",
    "SmtpSetupError",
    "TlsPolicy",
    "TransactionResult",
    "kind_of",
    "parse_enhanced_status",
]
