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


def has_long_line(data: bytes | bytearray, max_line: int) -> bool:
    """Does ``data`` have a CRLF-delimited line longer than ``max_line`` octets (CRLF not counted)?

    Lines split at CRLF only (a bare LF or CR is part of a line), as aiosmtpd reads them.
    One :meth:`bytes.rfind` per ``max_line`` octets, not one step per line: the last CRLF
    within ``max_line + 2`` octets of a line start ends only lines short enough, and the
    octet after it starts a line again.
    """
    pos, size = 0, len(data)
    while size - pos > max_line:
        crlf = data.rfind(b"\r\n", pos, pos + max_line + 2)
        if crlf < 0:
            return True
        pos = crlf + 2
    return False
