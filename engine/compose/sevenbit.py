"""Making a message fit a receiver that does not take 8-bit data (RFC 6152, RFC 5321 4.5.3.1.6).

SMTP without 8BITMIME carries 7-bit lines of at most 998 octets; with 8BITMIME a line may
carry any octet but NUL, still at most 998 of them (arbitrary binary needs BINARYMIME,
which we never use). :func:`body_class` says which a message needs; :func:`to_seven_bit`
converts what does not fit, part by part, the way RFC 6152 section 3 asks:

* a text part (or a message without MIME structure) is re-encoded quoted-printable,
  any other leaf part base64, with its ``Content-Transfer-Encoding`` rewritten;
* multiparts and ``message/rfc822`` parts are walked, their delimiters kept byte for byte;
  a preamble or epilogue that does not fit is dropped (readers ignore it);
* what fits already stays untouched, so a 7-bit part of a converted message keeps its bytes.

It gives up (``None``, the caller bounces with ``5.6.3``) when a header has 8-bit data, NUL or
an over-long line (that needs SMTPUTF8 or a rewrite the sender should do), or when a part that
claims to be quoted-printable or base64 carries 8-bit data (there is no knowing what it meant).

The conversion works on unsigned bytes: the caller signs its result (DKIM over converted
bytes holds at the receiver, a signature over the 8-bit original would not).
"""

from __future__ import annotations

import binascii
import re
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Literal

from engine.linebreaks import crlf, has_long_line

MAX_LINE = 998
"""Octets per line without the CRLF (RFC 5321 4.5.3.1.6)."""

BodyClass = Literal["7bit", "8bit", "binary"]

_PARSER = BytesHeaderParser(policy=compat32)


def body_class(data: bytes) -> BodyClass:
    """``7bit``: ASCII, no NUL, short lines; ``8bit``: needs 8BITMIME; ``binary``: NUL or lines over 998 octets."""
    if b"\x00" in data or has_long_line(data, MAX_LINE):
        return "binary"
    return "7bit" if data.isascii() else "8bit"


def to_seven_bit(message: bytes) -> bytes | None:
    """The message with every part that does not fit 7-bit SMTP re-encoded, or None if that cannot be done."""
    return _entity(crlf(message), top=True)


def _split(entity: bytes) -> tuple[bytes, bytes | None]:
    """Header block (without its final CRLF) and body (None: there is no blank line, no body)."""
    if entity.startswith(b"\r\n"):
        return b"", entity[2:]
    end = entity.find(b"\r\n\r\n")
    if end < 0:
        return entity, None
    return entity[:end], entity[end + 4 :]


def _entity(entity: bytes, *, top: bool = False) -> bytes | None:
    head, body = _split(entity)
    if body_class(head) != "7bit":
        return None
    if body is None or body_class(body) == "7bit":
        return entity
    fields = _PARSER.parsebytes(head + b"\r\n\r\n")
    maintype, subtype = fields.get_content_maintype(), fields.get_content_subtype()
    cte = str(fields.get("content-transfer-encoding", "7bit")).strip().lower()
    if maintype == "multipart":
        boundary = fields.get_boundary()
        inner = _multipart(body, boundary.encode("ascii", "replace")) if boundary else None
        new_cte = "7bit"
    elif maintype == "message" and subtype in ("rfc822", "global"):
        inner, new_cte = _entity(body), "7bit"
    elif cte in ("quoted-printable", "base64"):
        return None  # encoded, yet 8-bit: no telling what it meant
    elif maintype == "text":
        inner, new_cte = _quoted_printable(body), "quoted-printable"
    else:
        inner, new_cte = _base64(body), "base64"
    if inner is None:
        return None
    if cte != new_cte or "content-transfer-encoding" in fields:
        head = _set_field(head, b"Content-Transfer-Encoding", new_cte.encode())
    if top:
        head = _mime_fields(head, fields, body)
    return head + b"\r\n\r\n" + inner


def _mime_fields(head: bytes, fields: Message, body: bytes) -> bytes:
    """A top-level message without MIME fields gets them, or its new encoding would mean nothing."""
    if "mime-version" not in fields:
        head = _add_field(head, b"MIME-Version: 1.0")
    if "content-type" not in fields:
        try:
            body.decode("utf-8")
            charset = b"utf-8"
        except UnicodeDecodeError:
            charset = b"unknown-8bit"  # RFC 1428: 8-bit text in an unknown character set
        head = _add_field(head, b"Content-Type: text/plain; charset=" + charset)
    return head


def _multipart(body: bytes, boundary: bytes) -> bytes | None:
    """Each body part converted; delimiter lines (RFC 2046 5.1.1) kept as they were."""
    delimiter = re.compile(rb"(?:\A|\r\n)--" + re.escape(boundary) + rb"(?:--)?[ \t]*(?=\r\n|\Z)")
    out: list[bytes] = []
    last, first = 0, True
    for m in delimiter.finditer(body):
        segment = body[last : m.start()]
        if first:  # the preamble
            out.append(segment if body_class(segment) == "7bit" else b"")
            first = False
        else:
            if not segment.startswith(b"\r\n"):
                return None
            part = _entity(segment[2:])
            if part is None:
                return None
            out.append(b"\r\n" + part)
        out.append(m.group(0))
        last = m.end()
    if first:
        return None  # no delimiter at all: not the multipart it claims to be
    epilogue = body[last:]
    out.append(epilogue if body_class(epilogue) == "7bit" else b"\r\n")
    return b"".join(out)


def _quoted_printable(body: bytes) -> bytes:
    """Text, line breaks kept as line breaks; lines at most 76 octets (RFC 2045 6.7)."""
    lines = body.split(b"\r\n")
    encoded = [binascii.b2a_qp(line, quotetabs=False, istext=False) for line in lines]
    # b2a_qp soft-wraps with "=\n"; SMTP wants CRLF everywhere.
    return b"\r\n".join(e.replace(b"=\n", b"=\r\n") for e in encoded)


def _base64(body: bytes) -> bytes:
    encoded = binascii.b2a_base64(body, newline=False)
    return b"\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))


_FIELD_CACHE: dict[bytes, re.Pattern[bytes]] = {}


def _set_field(head: bytes, name: bytes, value: bytes) -> bytes:
    """``head`` with every ``name`` field (and its folded lines) replaced by one ``name: value``."""
    pattern = _FIELD_CACHE.get(name)
    if pattern is None:
        pattern = _FIELD_CACHE[name] = re.compile(
            rb"(?im)^" + re.escape(name) + rb"[ \t]*:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*(?:\r\n|\Z)"
        )
    kept = pattern.sub(b"", head)
    if kept.endswith(b"\r\n"):
        kept = kept[:-2]
    return _add_field(kept, name + b": " + value)


def _add_field(head: bytes, field: bytes) -> bytes:
    return head + b"\r\n" + field if head else field


__all__ = ["MAX_LINE", "BodyClass", "body_class", "to_seven_bit"]
