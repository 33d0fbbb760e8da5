"""One log record per delivery attempt, per recipient: what a mail operator greps for.

Modelled on KumoMTA's log records: ``type`` is ``Delivery``, ``TransientFailure`` or ``Bounce``
(how the receiver answered; the outcome stage later decides deferred vs expired), with the
message and recipient ids, the provider and egress source, the MX that answered, the reply's
code, enhanced status and text, and how long the attempt took. With ``[logging] format =
"json"`` each is one JSON line. The recipient and sender addresses are in the record too, but
the logging setup writes them as ``***@domain`` unless ``[logging] log_addresses = true``.
"""

from __future__ import annotations

import structlog

from engine.outcome.writer import Attempt

log = structlog.get_logger("engine.delivery")

RECORD_TYPES = {"delivered": "Delivery", "temporary": "TransientFailure", "permanent": "Bounce"}


def log_attempt(a: Attempt, *, pool: str = "", tls: bool | None = None) -> None:
    """Write the record of one recipient's attempt (``delivery_attempt`` at info level)."""
    domain = a.address.rpartition("@")[2].lower()
    log.info(
        "delivery_attempt",
        type=RECORD_TYPES.get(a.kind, a.kind),
        message_id=str(a.message_id),
        recipient_id=a.recipient_id,
        attempt=a.attempts_before + 1,
        tried=a.counted,
        domain=domain,
        provider=a.provider or domain,
        source=a.egress or None,
        pool=pool or None,
        stream=a.stream,
        mx=a.mx,
        tls=tls,
        code=a.code,
        status=a.status,
        reply=a.reply,
        duration_ms=a.duration_ms,
        recipient=a.address,
        sender=a.mail_from,
        reception=a.source,
    )
