"""Request and response bodies used only by the HTTP API (templates, suppressions).

The submission models live in :mod:`engine.submit.models` because ``engine.accept``
works on them too; these are spoken only over HTTP.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.submit.models import storable
from engine.suppression import GLOBAL

# ---- /v1/templates


class TemplateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=200, description="[a-z0-9_-], 1-100 characters, starting with a letter or digit.")
    parts: dict[str, Any] = Field(description="subject (required), html and/or text: Jinja2 sources.")

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

    address: str = Field(max_length=320, description="The address to stop mailing (matched case-insensitively).")
    scope: str = Field(default=GLOBAL, max_length=64, description="A stream name, or '*' (default) for every stream.")
    reason: str = Field(default="manual", max_length=200)


class SuppressionOut(BaseModel):
    address: str
    scope: str
    reason: str
    source: str
    created_at: datetime


class SuppressionList(BaseModel):
    suppressions: list[SuppressionOut]


class SuppressionAdded(BaseModel):
    address: str
    scope: str
    created: bool = Field(description="False when the address was already suppressed for this scope.")
    pending_suppressed: int = Field(description="Queued recipients of this address that will now not be sent.")


class SuppressionRemoved(BaseModel):
    address: str
    removed_scopes: list[str]
