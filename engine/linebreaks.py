"""One rule for line endings, shared by the DKIM signer and the SMTP client.

SMTP sends CRLF line ends only; a message with a bare CR or a bare LF is converted on the
way out. DKIM signs the bytes as they will be sent, so both apply this very rule: if the
signer normalised differently (e.g. bare LF only) a bare CR would be converted after
signing and break the signature at the receiver.
"""

from __future__ import annotations

import re

_ANY_BREAK = re.compile(rb"\r\n|\r|\n")


def crlf(data: bytes) -> bytes:
    """Every bare CR and bare LF as CRLF; the same bytes object when there is none (the common case)."""
    n = data.count(b"\r\n")
    if data.count(b"\n") == n and data.count(b"\r") == n:
        return data
    return _ANY_BREAK.sub(b"\r\n", data)
