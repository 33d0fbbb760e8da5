"""Request and response bodies used only by the HTTP API (templates, suppressions).

The submission models live in :mod:`engine.submit.models` because ``engine.accept``
works on them too; these are spoken only over HTTP.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from engine.submit.models import ADDRESS_PATTERN, storable
from engine.suppression import GLOBAL

# ---- /v1/templates


class TemplateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        max_length=200, description="[a-z0-9_-], 1-100 characters, starting with a letter or digit.",
        json_schema_extra={"pattern": "^[a-z0-9][a-z0-9_-]{0,99}$"},
    )
    parts: dict[str, Any] = Field(
        description="subject (required), html and/or text: Jinja2 sources.",
        json_schema_extra={
            "properties": {p: {"type": "string"} for p in ("subject", "html", "text")},
            "required": ["subject"], "additionalProperties": False,
            "anyOf": [{"required": ["html"]}, {"required": ["text"]}],
        },
    )

    @field_validator("parts")
    @classmethod
    def _parts(cls, v: dict[str, Any]) -> dict[str, Any]:
        return storable(v)  # stored as jsonb: no NUL, no integer beyond 64 bits


class TemplateCreated(BaseModel):
    name: str
    version: int
    required_variables: list[str]


# ---- /v1/suppressions


class SuppressionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str = Field(
        max_length=320, description="The address to stop mailing (matched case-insensitively).",
        json_schema_extra={"minLength": 3, "maxLength": 254, "pattern": ADDRESS_PATTERN},
    )
    scope: str = Field(default=GLOBAL, max_length=64, description="A stream name, or '*' (default) for every stream.")
    reason: str = Field(default="manual", max_length=200, description="Why (free text, kept with the suppression).")


class SuppressionOut(BaseModel):
    address: str
    scope: str
    reason: str
    source: str
    created_at: datetime


class SuppressionList(BaseModel):
    suppressions: list[SuppressionOut]
    next: str | None = Field(default=None, description="Pass as 'after' for the next page; null on the last page.")


class SuppressionAdded(BaseModel):
    address: str
    scope: str
    created: bool = Field(description="False when the address was already suppressed for this scope.")
    pending_suppressed: int = Field(description="Queued recipients of this address that will now not be sent.")


class SuppressionRemoved(BaseModel):
    address: str
    removed_scopes: list[str]


# ---- /v1/webhooks

URL_PATTERN = r"^https?://[^\s/?#@:]+(:[0-9]{1,5})?([/?][^\s#]*)?$"
"""An endpoint URL as engine.webhooks.safety.check_url accepts it (it must also resolve to a public address)."""


class WebhookBatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_events: int = Field(default=1, ge=1, le=1000, description="Events per request (1 = one event per request, unbatched).")
    max_wait_ms: int = Field(default=1000, ge=0, le=60000, description="How long to wait for a full batch, from its oldest event.")


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        max_length=2048, description="https:// (or http://) URL that receives POSTs.",
        json_schema_extra={"pattern": URL_PATTERN},
    )
    events: list[str] | None = Field(
        default=None, max_length=50, description="Event types, e.g. ['email.delivered', 'email.bounced']; omitted: all.",
    )
    streams: list[str] | None = Field(default=None, max_length=50, description="Only these streams; omitted: all.")
    description: str = Field(default="", max_length=500)
    enabled: bool = True
    batch: WebhookBatchIn | None = Field(default=None, description="Omitted: one event per request.")


class WebhookPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # url, description and enabled may be omitted but not null (SkipJsonSchema: the schema says so).
    url: Annotated[str, Field(max_length=2048, json_schema_extra={"pattern": URL_PATTERN})] | SkipJsonSchema[None] = None
    events: list[str] | None = Field(default=None, max_length=50, description="null: every type.")
    streams: list[str] | None = Field(default=None, max_length=50, description="null: every stream.")
    description: Annotated[str, Field(max_length=500)] | SkipJsonSchema[None] = None
    enabled: bool | SkipJsonSchema[None] = Field(default=None, description="true re-enables an endpoint a 410 disabled.")
    batch: WebhookBatchIn | None = None


class WebhookBatchOut(BaseModel):
    max_events: int
    max_wait_ms: int


class WebhookOut(BaseModel):
    id: str
    url: str
    description: str
    events: list[str] | None
    streams: list[str] | None
    enabled: bool
    disabled_reason: str | None
    batch: WebhookBatchOut
    created_at: datetime
    updated_at: datetime
    secret_rotation_ends_at: datetime | None
    status: dict[str, Any] | None = Field(default=None, description="Backlog, dead letters and lag (GET of one endpoint).")


class WebhookCreated(WebhookOut):
    secret: str = Field(description="whsec_...: shown once. Verify signatures with it (Standard Webhooks).")


class WebhookList(BaseModel):
    webhooks: list[WebhookOut]


class WebhookDeliveryOut(BaseModel):
    id: int
    event_id: str
    recipient_id: int | None
    lane: str
    state: str
    attempts: int
    event_at: datetime
    next_attempt_at: datetime | None
    last_status: int | None
    last_error: str | None
    last_attempt_at: datetime | None
    delivered_at: datetime | None
    replay: bool


class WebhookDeliveryList(BaseModel):
    deliveries: list[WebhookDeliveryOut]
    next_before: int | None = Field(description="Pass as 'before' for the next (older) page; null at the end.")


class WebhookReplayIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_ids: list[str] | None = Field(default=None, max_length=10000, description="evt_... ids to send again.")
    since: datetime | None = Field(default=None, description="Events at or after this time (with or without until).")
    until: datetime | None = None
    dead_letters: bool = Field(default=False, description="Every dead letter (or those of event_ids) under its own id.")


class WebhookReplayOut(BaseModel):
    queued: int


# ---- /v1/events


class EventOut(BaseModel):
    id: str
    type: str
    timestamp: str
    data: dict[str, Any]


class EventPageOut(BaseModel):
    events: list[EventOut]
    next: str = Field(description="Cursor for the next page (pass as 'after'); stays put when nothing new was there.")
    has_more: bool
