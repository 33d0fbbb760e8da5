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

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.deliver.smtp.connect import SmtpSetupError
    from engine.deliver.smtp.pool import ConnectionPool
    from engine.deliver.smtp.reply import Kind, Reply, kind_of, parse_enhanced_status
    from engine.deliver.smtp.results import OutboundMessage, Phase, RecipientReply, TransactionResult
    from engine.deliver.smtp.settings import SmtpClientSettings, TlsPolicy

# Loaded on first use (PEP 562): ``engine.config`` imports ``settings`` for ``[delivery.smtp]``,
# and every CLI command would otherwise pay for the whole client (structlog, TLS, the pool).
_HOME = {
    "SmtpSetupError": "connect", "ConnectionPool": "pool",
    "Kind": "reply", "Reply": "reply", "kind_of": "reply", "parse_enhanced_status": "reply",
    "OutboundMessage": "results", "Phase": "results", "RecipientReply": "results", "TransactionResult": "results",
    "SmtpClientSettings": "settings", "TlsPolicy": "settings",
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


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
