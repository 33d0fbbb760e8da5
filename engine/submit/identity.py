"""Contact identity carried in raw submissions: ``X-Engine-Contact-Id`` and ``X-Engine-Meta``.

SMTP (and raw REST) clients cannot add JSON fields to a recipient, so they may put the
recipient's CRM/CDP id in ``X-Engine-Contact-Id`` and other external ids as a JSON object in
``X-Engine-Meta``. Both are taken out of the stored message (the world never sees them: they
would leak internal ids) and stored per recipient like REST's ``contact_id`` / ``external``;
they apply to every recipient of that submission. Only the header block is scanned, in one
pass over its lines; a message without either header is returned as the same bytes object.
"""

from __future__ import annotations

from typing import Any

import orjson

from engine.errors import ValidationFailed
from engine.submit.models import storable

CONTACT_HEADER = b"x-engine-contact-id"
META_HEADER = b"x-engine-meta"
MAX_META = 8192


def header_end(raw: bytes) -> int:
    """Offset just past the header block (its blank line), or len(raw) when there is no body."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = raw.find(sep)
        if i >= 0:
            return i + len(sep)
    return len(raw)


def extract_identity(raw: bytes) -> tuple[bytes, str | None, dict[str, Any] | None]:
    """(message without the identity headers, contact id, external ids)."""
    lowered_head = raw[: header_end(raw)].lower()
    if b"x-engine-" not in lowered_head:
        return raw, None, None
    end = header_end(raw)
    lines = raw[:end].splitlines(keepends=True)
    kept: list[bytes] = []
    found: dict[bytes, bytes] = {}
    current: bytes | None = None
    for line in lines:
        if line[:1] in (b" ", b"\t") and current is not None:  # a folded continuation
            found[current] += line.strip(b"\r\n")
            continue
        name, colon, value = line.partition(b":")
        key = name.strip().lower()
        if colon and key in (CONTACT_HEADER, META_HEADER):
            if key in found:
                raise ValidationFailed(f"{name.decode('ascii', 'replace')} appears twice", field=name.decode("ascii", "replace"))
            found[key] = value.strip(b"\r\n")
            current = key
            continue
        current = None
        kept.append(line)
    if not found:
        return raw, None, None
    contact_id = None
    if CONTACT_HEADER in found:
        try:
            contact_id = found[CONTACT_HEADER].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValidationFailed("X-Engine-Contact-Id is not UTF-8", field="X-Engine-Contact-Id") from None
        if not 1 <= len(contact_id) <= 200 or any(ord(c) < 32 or ord(c) == 127 for c in contact_id):
            raise ValidationFailed("X-Engine-Contact-Id must be 1-200 printable characters", field="X-Engine-Contact-Id")
    external = None
    if META_HEADER in found:
        blob = found[META_HEADER].strip()
        if len(blob) > MAX_META:
            raise ValidationFailed(f"X-Engine-Meta is larger than {MAX_META} bytes", field="X-Engine-Meta")
        try:
            external = orjson.loads(blob)
        except orjson.JSONDecodeError:
            raise ValidationFailed("X-Engine-Meta is not valid JSON", field="X-Engine-Meta") from None
        if not isinstance(external, dict):
            raise ValidationFailed("X-Engine-Meta must be a JSON object", field="X-Engine-Meta")
        try:
            storable(external, single_line=True)
        except ValueError as exc:
            raise ValidationFailed(f"X-Engine-Meta: {exc}", field="X-Engine-Meta") from None
    return b"".join(kept) + raw[end:], contact_id, external
