"""What a submission server adds to relayed mail (RFC 5321 §4.4, RFC 6409 §8): a ``Received``
trace field on top, and ``Date`` / ``Message-ID`` when the client left them out.

Everything else stays byte-exact: the trace is prepended, the missing fields are inserted at
the end of the header block, and nothing is parsed beyond the field names of that block.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from email.utils import format_datetime

from engine.submit.identity import header_end

_UNSAFE = re.compile(r"[^\x21-\x7e]")


def _clean(text: str, limit: int = 200) -> str:
    """A client-supplied token (HELO name) made safe for a header: printable ASCII, bounded."""
    return _UNSAFE.sub("?", text)[:limit] or "unknown"


def protocol(tls: bool, authenticated: bool) -> str:
    """RFC 3848 ``with`` keyword: ESMTP, ESMTPS (TLS), ESMTPA (AUTH), ESMTPSA (both)."""
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


def add_trace(
    raw: bytes, *, helo: str | None, peer_ip: str | None, hostname: str, proto: str, queue_id: str, now: datetime,
) -> bytes:
    end = header_end(raw)
    head = raw[:end]
    names = {m.group(1).lower() for m in re.finditer(rb"^([!-9;-~]+)[ \t]*:", head, re.MULTILINE)}
    extra = b""
    if b"date" not in names:
        extra += b"Date: " + format_datetime(now).encode() + b"\r\n"
    if b"message-id" not in names:
        extra += f"Message-ID: <{uuid.uuid4().hex}@{_clean(hostname)}>".encode() + b"\r\n"
    if extra:
        # Before the blank line that ends the header block (or at the end of a body-less message).
        blank = len(b"\r\n") if head.endswith(b"\r\n\r\n") else len(b"\n") if head.endswith(b"\n\n") else 0
        cut = end - blank
        if cut and not raw[:cut].endswith(b"\n"):
            extra = b"\r\n" + extra
        raw = raw[:cut] + extra + raw[cut:]
    received = (
        f"Received: from {_clean(helo or 'unknown')} ({_clean(peer_ip or 'unknown')})\r\n"
        f"\tby {_clean(hostname)} with {proto} id {queue_id};\r\n\t{format_datetime(now)}\r\n"
    ).encode()
    return received + raw
