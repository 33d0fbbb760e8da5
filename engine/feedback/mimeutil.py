"""Bounded, never-raising helpers over the stdlib ``email`` package.

Bounces and complaints arrive from strangers: broken MIME, 10 MB attachments,
thousands of nested multiparts, made-up charsets. The stdlib parser is lenient
but recursive (deep nesting raises RecursionError) and decodes whole payloads,
so everything here is cut to fixed budgets first. What a bounce says is in its
first few kilobytes; the returned original message is only needed for its
headers.
"""

from __future__ import annotations

import email
import email.parser
import email.policy
import html
import re
from collections.abc import Iterator
from email.header import decode_header, make_header
from email.message import Message
from typing import Any

MAX_RAW = 1024 * 1024  # bytes of a message we look at
MAX_PART_TEXT = 64 * 1024  # characters of one part's text
MAX_PARTS = 100  # MIME parts walked
MAX_DEPTH = 8  # nesting levels walked
MAX_NESTED_CONTAINERS = 40  # multipart/* and message/* headers kept before the raw input is cut
MAX_HEADERS = 100  # headers kept from an original message

_CONTAINER_RE = re.compile(rb"(?im)^content-type:[ \t]*(?:\r?\n[ \t]+)*(?:multipart|message)/")


def bound_raw(raw: bytes) -> bytes:
    """Cut input to what the parser can take without recursing or eating memory."""
    if not isinstance(raw, (bytes, bytearray)):
        raw = str(raw).encode("utf-8", "replace")
    raw = bytes(raw[:MAX_RAW])
    count = 0
    for m in _CONTAINER_RE.finditer(raw):
        count += 1
        if count > MAX_NESTED_CONTAINERS:
            return raw[: m.start()]
    return raw


def load_message(raw: bytes) -> Message:
    """Parse bytes into a compat32 Message, falling back to headers-only on parser failure."""
    data = bound_raw(raw)
    try:
        msg = email.message_from_bytes(data, policy=email.policy.compat32)
        return _repair_boundary(msg, data) or msg
    except (RecursionError, MemoryError, Exception):  # noqa: BLE001 - hostile input: any parser failure
        head, _, body = data.partition(b"\n\n")
        msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head + b"\n\n")
        msg.set_payload(body.decode("utf-8", "replace"))
        return msg


_DELIM_RE = re.compile(rb"(?m)^--([!-~]{1,200}?)(--)?\r?$")


def _repair_boundary(msg: Message, data: bytes) -> Message | None:
    """Re-parse a multipart whose declared boundary never occurs (seen in real bounces).

    Some MTAs rewrite the boundary parameter but not the body; the parser then
    sees one opaque text body. We adopt the first delimiter-looking line instead.
    """
    try:
        if not content_type(msg).startswith("multipart/") or isinstance(msg.get_payload(), list):
            return None
        declared = msg.get_boundary()
    except Exception:  # noqa: BLE001
        return None
    if not declared:
        return None
    sep = data.find(b"\n\n")
    sep2 = data.find(b"\r\n\r\n")
    cut = min(x for x in (sep, sep2, len(data)) if x >= 0)
    head, body = data[:cut], data[cut:]
    m = _DELIM_RE.search(body)
    if not m or m.group(1) == declared.encode("utf-8", "replace"):
        return None
    fixed = head.replace(declared.encode("utf-8", "replace"), m.group(1), 1) + body
    try:
        again = email.message_from_bytes(fixed, policy=email.policy.compat32)
    except Exception:  # noqa: BLE001
        return None
    return again if isinstance(again.get_payload(), list) else None


def header(msg: Message, name: str) -> str:
    """A header's decoded value ('' when absent or undecodable)."""
    try:
        value = msg.get(name)
    except Exception:  # noqa: BLE001
        return ""
    if value is None:
        return ""
    return decode_str(value)


def decode_str(value: object) -> str:
    """Decode RFC 2047 words; never raise."""
    try:
        text = str(value)
    except Exception:  # noqa: BLE001
        return ""
    if "=?" in text:
        try:
            text = str(make_header(decode_header(text)))
        except Exception:  # noqa: BLE001
            pass
    return re.sub(r"\s+", " ", text).strip()


def iter_parts(msg: Message) -> Iterator[tuple[Message, int]]:
    """Depth-first walk (iterative, bounded in parts and depth), yielding (part, depth)."""
    stack: list[tuple[Message, int]] = [(msg, 0)]
    seen = 0
    while stack and seen < MAX_PARTS:
        part, depth = stack.pop()
        seen += 1
        yield part, depth
        if depth >= MAX_DEPTH:
            continue
        try:
            payload = part.get_payload() if part.is_multipart() else None
        except Exception:  # noqa: BLE001
            payload = None
        if isinstance(payload, list):
            children = [p for p in payload if isinstance(p, Message)]
            for child in reversed(children[:MAX_PARTS]):
                stack.append((child, depth + 1))


def content_type(part: Message) -> str:
    try:
        return (part.get_content_type() or "text/plain").lower()
    except Exception:  # noqa: BLE001
        return "text/plain"


def _charset(part: Message) -> str:
    try:
        cs = part.get_content_charset() or "utf-8"
    except Exception:  # noqa: BLE001
        cs = "utf-8"
    try:
        "".encode(cs)
    except (LookupError, ValueError):
        return "utf-8"
    return cs


def part_bytes(part: Message, limit: int = MAX_PART_TEXT * 2) -> bytes:
    """A leaf part's decoded payload, cut to ``limit`` bytes."""
    try:
        payload = part.get_payload()
        if isinstance(payload, list):
            return b""
        if isinstance(payload, str) and len(payload) > limit * 2:
            # decode only the head of huge parts (base64 of the head is still valid base64 up to a multiple of 4)
            part = _shallow_copy(part, payload[: limit * 2 - (limit * 2) % 4])
        data = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001
        return b""
    if not isinstance(data, (bytes, bytearray)):
        return b""
    return bytes(data[:limit])


def _shallow_copy(part: Message, payload: str) -> Message:
    clone = Message()
    for k, v in part.items():
        clone[k] = v
    clone.set_payload(payload)
    return clone


_TAG_RE = re.compile(r"(?is)<(script|style)\b.*?</\1>|<br\s*/?>|</(p|div|tr|li|h\d)>|<[^>]{0,2000}>")


def part_text(part: Message) -> str:
    """A leaf part's text (HTML flattened), decoded with a safe charset, cut to MAX_PART_TEXT."""
    data = part_bytes(part)
    if not data:
        try:
            payload = part.get_payload()
        except Exception:  # noqa: BLE001
            payload = ""
        if isinstance(payload, str):
            return payload[:MAX_PART_TEXT].replace("\r\n", "\n")
        if isinstance(payload, list):
            # message/delivery-status is parsed by compat32 into header blocks
            return "\n\n".join(_headers_text(p) for p in payload[:MAX_PARTS] if isinstance(p, Message))[:MAX_PART_TEXT]
        return ""
    try:
        text = data.decode(_charset(part), "replace")
    except Exception:  # noqa: BLE001
        text = data.decode("utf-8", "replace")
    if content_type(part) == "text/html":
        text = html.unescape(_TAG_RE.sub(lambda m: "\n" if m.group(0)[:2].lower() in ("<b", "</") else " ", text))
    return text[:MAX_PART_TEXT].replace("\r\n", "\n").replace("\r", "\n")


def _headers_text(block: Message) -> str:
    out = []
    try:
        for k, v in block.items():
            out.append(f"{k}: {decode_str(v)}")
    except Exception:  # noqa: BLE001
        pass
    return "\n".join(out)


def headers_dict(msg: Message) -> dict[str, str]:
    """First value of each header (decoded, bounded), for mapping a bounce back to what we sent."""
    out: dict[str, str] = {}
    try:
        items = msg.items()[:MAX_HEADERS * 2]
    except Exception:  # noqa: BLE001
        return out
    for k, v in items:
        key = str(k).strip()
        if key and key not in out and len(out) < MAX_HEADERS:
            out[key] = decode_str(v)[:2000]
    return out


def ses_notification(text: str) -> dict[str, Any] | None:
    """An Amazon SES/SNS JSON notification (Bounce, Complaint, Delivery) inside a body, or None.

    SES posts these through SNS, and some setups deliver them by email; the
    SNS envelope carries the SES document as a JSON string in ``Message``.
    """
    import json

    if '"notificationType"' not in text and '\\"notificationType\\"' not in text and '"eventType"' not in text:
        return None
    start = text.find("{")
    end = text.rfind("}")
    if start < 0 or end <= start:
        return None
    blob = text[start : end + 1]
    doc = None
    for candidate in (blob, re.sub(r"!\r?\n ", "", blob), re.sub(r"\r?\n", "", blob)):
        try:
            doc = json.loads(candidate)
            break
        except (ValueError, RecursionError):
            continue
    if not isinstance(doc, dict):
        return None
    inner = doc.get("Message")
    if isinstance(inner, str):
        try:
            inner_doc = json.loads(inner)
        except (ValueError, RecursionError):
            inner_doc = None
        if isinstance(inner_doc, dict):
            doc = inner_doc
    kind = doc.get("notificationType") or doc.get("eventType")
    return doc if isinstance(kind, str) else None
