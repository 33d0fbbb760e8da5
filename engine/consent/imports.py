"""NDJSON bulk sync of consent: one record per line, validated whole or not at all.

The REST import (``POST /v1/consent/import``) and the CLI (``engine consent import``) read
lines their own way (a streamed request body, a file or stdin, gzip or not) and hand each
line here: it becomes one :class:`ConsentIn` or a :class:`ValidationFailed` naming the field,
so a line is applied entirely or not at all. Valid lines are applied in batches of
:data:`BATCH` (one transaction and one statement each, see :mod:`engine.consent.store`).
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import ValidationError

from engine.consent.models import ConsentIn, ConsentRecord, fast_record, field_of
from engine.consent.policy import ConsentPolicy
from engine.consent.store import OUTCOMES, check_purpose
from engine.errors import ValidationFailed

BATCH = 10000
"""Lines applied per transaction: one commit (a WAL flush) per batch, so fewer is cheaper per line."""
MAX_LINE = 64 * 1024
"""A longer line is that line's error (a consent record is a few hundred bytes)."""


def parse_document(line: bytes) -> dict[str, Any]:
    """One line as a JSON object; anything else names ``line``."""
    if len(line) > MAX_LINE:
        raise ValidationFailed(f"line longer than {MAX_LINE} bytes", field="line")
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ValidationFailed(f"not JSON: {exc}", field="line") from None
    if not isinstance(doc, dict):
        raise ValidationFailed("each line must be a JSON object", field="line")
    return doc


def parse_record(doc: Any, policy: ConsentPolicy) -> ConsentRecord | ConsentIn:
    """One consent record, validated; an error names its field (``purpose`` for an undeclared one).

    The plain shape of a CRM export takes the fast path (:func:`fast_record`); anything else,
    errors included, goes through the :class:`ConsentIn` model.
    """
    fast = fast_record(doc, policy.all_purposes)
    if fast is not None:
        return fast
    try:
        change = ConsentIn.model_validate(doc)
    except ValidationError as exc:
        where, msg = field_of(exc.errors())
        raise ValidationFailed(msg, field=where) from None
    check_purpose(policy, change.purpose)
    return change


def parse_line(line: bytes, policy: ConsentPolicy) -> ConsentRecord | ConsentIn:
    return parse_record(parse_document(line), policy)


def empty_totals() -> dict[str, int]:
    """The counters an import answers with: lines, invalid, each outcome, and queued mail stopped."""
    return {"lines": 0, "invalid": 0, **dict.fromkeys(OUTCOMES, 0), "pending_stopped": 0}
