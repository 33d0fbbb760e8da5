"""RFC 3464 delivery status notifications for relayed mail that finally failed.

Only mail that came in over the SMTP relay with a non-null return path gets a
DSN (REST callers learn outcomes from the API and events). The DSN itself is
sent with the null sender ``<>``, so a failing DSN is never answered with
another one: no loops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid
from typing import TYPE_CHECKING, Any

from engine.accept import envelope_recipient
from engine.compose.pipeline import MessageRow
from engine.ids import uuid7
from engine.outbox import NewMessage
from engine.outcome.writer import Attempt

if TYPE_CHECKING:
    from engine.config import Settings

MAX_HEADERS_QUOTED = 64 * 1024


def _original_headers(raw: bytes | None) -> bytes:
    if not raw:
        return b""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    head = raw if end < 0 else raw[:end]
    return head[:MAX_HEADERS_QUOTED]


class DsnBuilder:
    def __init__(self, settings: Settings, lookup: Callable[[Any], MessageRow | None]) -> None:
        self.settings = settings
        self.lookup = lookup
        self.hostname = settings.server.hostname
        self.stream = settings.smtp.default_stream
        self.priority = settings.stream_priority(self.stream)

    def __call__(self, failures: Sequence[Attempt]) -> list[NewMessage]:
        by_message: dict[Any, list[Attempt]] = {}
        for a in failures:
            if a.source == "smtp" and a.mail_from:
                by_message.setdefault(a.message_id, []).append(a)
        out = []
        for message_id, items in by_message.items():
            msg = self.lookup(message_id)
            raw = self.build(items[0].mail_from, items, msg.raw if msg else None)
            try:
                rcpt = envelope_recipient(items[0].mail_from)
            except ValueError:
                continue  # a return path we cannot mail: nothing to notify
            out.append(
                NewMessage(
                    id=uuid7(),
                    source="smtp",
                    mail_from="",
                    stream=self.stream,
                    priority=self.priority,
                    recipients=[rcpt],
                    raw=raw,
                    metadata={"dsn_for": str(message_id)},
                )
            )
        return out

    def build(self, return_path: str, failures: Sequence[Attempt], original: bytes | None) -> bytes:
        """The DSN's bytes. Every interpolated value is an address we validated or a reply
        stripped of CR/LF, so nothing from outside can add a header or a MIME part."""
        now = format_datetime(datetime.now(UTC))
        boundary = f"=_dsn_{uuid7().hex}"
        human = [
            f"This is the mail system at {self.hostname}.",
            "",
            "Your message could not be delivered to one or more recipients.",
            "",
            *(f"<{a.address}>: {_reply_text(a)}" for a in failures),
        ]
        status = [f"Reporting-MTA: dns; {self.hostname}", f"Arrival-Date: {now}"]
        for a in failures:
            code = a.status if a.status and a.status[:1] in ("4", "5") else ("5.0.0" if a.kind == "permanent" else "4.4.7")
            code = "5" + code[1:]  # final: an expired temporary failure is reported as permanent
            status += ["", f"Final-Recipient: rfc822; {a.address}", "Action: failed", f"Status: {code}"]
            if a.mx:
                status.append(f"Remote-MTA: dns; {_one_line(a.mx)}")
            status.append(f"Diagnostic-Code: {_diagnostic(a)}")
        parts = [
            f"From: Mail Delivery System <MAILER-DAEMON@{self.hostname}>",
            f"To: <{return_path}>",
            "Subject: Undelivered Mail Returned to Sender",
            f"Date: {now}",
            f"Message-ID: {make_msgid(domain=self.hostname)}",
            "Auto-Submitted: auto-replied",
            "MIME-Version: 1.0",
            f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
            "",
            "This is a MIME-encapsulated message.",
            "",
            f"--{boundary}",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
            "",
            *human,
            "",
            f"--{boundary}",
            "Content-Type: message/delivery-status",
            "",
            *status,
            "",
        ]
        headers = _original_headers(original)
        text = "\r\n".join(parts).encode()
        if headers:
            text += f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n".encode() + headers + b"\r\n"
        return text + f"--{boundary}--\r\n".encode()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _reply_text(a: Attempt) -> str:
    """The failure in one line; never empty, so a reader never mistakes what follows for it."""
    return _one_line(a.reply) or ("delivery failed" if a.kind == "permanent" else "delivery failed; gave up retrying")


def _diagnostic(a: Attempt) -> str:
    """An RFC 3464 ``Diagnostic-Code`` value: ``smtp; <code> <reply>`` for a server's reply, else
    ``x-engine; <reply>`` for what the engine itself saw (DNS failure, refused connection, expiry).
    ``Reply.text`` has the code stripped, so it is put back in front."""
    text = _reply_text(a)
    if a.code is None:
        return f"x-engine; {text[:900]}"
    if not text.startswith(str(a.code)):
        text = f"{a.code} {text}"
    return f"smtp; {text[:900]}"
