"""The export's typed schema: every column the batch read yields, and which ones each event type keeps.

One SQL read (``export_events``) flattens every event of a batch into typed columns; each
event type's files keep the common columns plus its own, so a file's schema depends only on
its type (stable across files, what a warehouse table wants). Addresses are not exported:
``contact_id`` is the join key to the CRM (and erasure stays simple).
"""

from __future__ import annotations

import pyarrow as pa

from engine.events.public import PUBLIC_TYPES

TS = pa.timestamp("us", tz="UTC")

# Every column the read yields, in order, with its Arrow type (the CSV parse uses these); the
# exporter adds each event's ``date`` and ``hour`` (UTC) from ``occurred_us``.
READ: list[tuple[str, pa.DataType]] = [
    ("event_id", pa.int64()), ("kind", pa.string()), ("occurred_us", pa.int64()), ("message_id", pa.string()),
    ("recipient_id", pa.int64()), ("stream", pa.string()), ("contact_id", pa.string()), ("external", pa.string()),
    ("campaign", pa.string()), ("metadata", pa.string()), ("template_name", pa.string()),
    ("template_version", pa.int32()), ("sending_domain", pa.string()), ("provider", pa.string()),
    ("egress", pa.string()), ("submission_source", pa.string()), ("smtp_code", pa.int32()),
    ("enhanced_status", pa.string()), ("reply", pa.string()), ("mx", pa.string()), ("category", pa.string()),
    ("hard", pa.bool_()), ("permanent", pa.bool_()), ("attempt", pa.int32()), ("next_attempt_at", pa.string()),
    ("link_index", pa.int32()), ("url", pa.string()), ("method", pa.string()), ("feedback_type", pa.string()),
    ("reason", pa.string()), ("origin", pa.string()), ("verified", pa.bool_()), ("purpose", pa.string()),
    ("consent_status", pa.string()), ("old_status", pa.string()), ("legal_basis", pa.string()),
    ("policy_version", pa.string()), ("address_hash", pa.string()),
]
READ_TYPES = dict(READ)

COMMON = ["event_id", "event_type", "occurred_at", "message_id", "recipient_id", "stream", "contact_id", "external",
          "campaign", "metadata", "template_name", "template_version"]
_OUTCOME = ["attempt", "smtp_code", "enhanced_status", "reply", "mx", "provider", "egress", "sending_domain"]
BY_TYPE: dict[str, list[str]] = {
    "accepted": ["submission_source"],
    "deferred": [*_OUTCOME, "category", "next_attempt_at"],
    "delivered": _OUTCOME,
    "bounced": [*_OUTCOME, "category", "hard", "permanent", "origin", "verified"],
    "expired": [*_OUTCOME, "category"],
    "suppressed": ["reason", "submission_source"],
    "complained": ["provider", "sending_domain", "feedback_type", "origin", "verified"],
    "opened": [],
    "clicked": ["link_index", "url"],
    "unsubscribed": ["method"],
    "consent_changed": ["purpose", "consent_status", "old_status", "legal_basis", "policy_version", "submission_source"],
    "contact_erased": ["address_hash"],
}
assert set(BY_TYPE) == set(PUBLIC_TYPES), "every public event type needs its export columns"


def schema_for(kind: str) -> pa.Schema:
    """The Arrow schema of one event type's files (``kind``: engine type name)."""
    fields = [
        pa.field("event_id", pa.int64(), nullable=False), pa.field("event_type", pa.string(), nullable=False),
        pa.field("occurred_at", TS, nullable=False),
    ]
    for name in COMMON[3:] + BY_TYPE[kind]:
        fields.append(pa.field(name, READ_TYPES[name]))
    return pa.schema(fields)


FACTS_SCHEMA = pa.schema([
    ("date", pa.string()), ("stream", pa.string()), ("provider", pa.string()), ("sending_domain", pa.string()),
    ("campaign", pa.string()), ("sent", pa.int64()), ("delivered", pa.int64()), ("deferred", pa.int64()),
    ("bounced_hard", pa.int64()), ("bounced_soft", pa.int64()), ("expired", pa.int64()), ("complaints", pa.int64()),
    ("opens", pa.int64()), ("clicks", pa.int64()), ("unsubscribes", pa.int64()),
])
