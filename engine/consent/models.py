"""One consent record as it comes in (REST body, NDJSON import line, CLI), validated.

Everything here is outside input: a bad field is a 4xx (or a per-line import error) naming it.
Addresses are keyed lower-cased; ``captured_at`` may not lie in the future (beyond a little
clock skew) since a future time would make the record unbeatable by real later changes.
Legacy opt-ins (no metadata) may omit ``captured_at``: they then date from the epoch, so any
real record overrides them.
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.suppression import normalize_address

LEGAL_BASES = ("consent", "contract", "legal_obligation", "vital_interests", "public_task", "legitimate_interest")
CLOCK_SKEW = timedelta(minutes=5)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_Text = Annotated[str, Field(min_length=1, max_length=200)]


class FieldError(ValueError):
    """A cross-field check's error that still names its field (pydantic puts model-level errors at the root)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _printable(v: str | None, what: str) -> str | None:
    if v is not None and any(ord(c) < 32 or ord(c) == 127 for c in v):
        raise ValueError(f"{what} must not contain control characters (CR, LF, NUL ...)")
    return v


class Evidence(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ip: str | None = Field(default=None, max_length=64)
    user_agent: str | None = Field(default=None, max_length=500)

    @field_validator("ip")
    @classmethod
    def _ip(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                ipaddress.ip_address(v)
            except ValueError:
                raise ValueError(f"{v!r} is not an IP address") from None
        return v

    @field_validator("user_agent")
    @classmethod
    def _ua(cls, v: str | None) -> str | None:
        return _printable(v, "user_agent")


class ConsentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str = Field(max_length=320)
    purpose: str = Field(max_length=64)
    status: Literal["granted", "revoked", "unknown"]
    legal_basis: Literal["consent", "contract", "legal_obligation", "vital_interests", "public_task", "legitimate_interest"] | None = None
    source: _Text | None = Field(default=None, description="System and form, e.g. crm:hubspot, signup-form.")
    captured_at: datetime | None = Field(default=None, description="When the consent was given or withdrawn (required unless legacy).")
    policy_version: str | None = Field(default=None, max_length=100)
    double_opt_in_at: datetime | None = None
    evidence: Evidence | None = None
    effective_from: datetime | None = None
    effective_until: datetime | None = None
    contact_id: str | None = Field(default=None, min_length=1, max_length=200)
    legacy: bool = Field(default=False, description="An imported opt-in without metadata ([consent] legacy decides).")

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        return normalize_address(v)

    @field_validator("source", "policy_version", "contact_id")
    @classmethod
    def _text(cls, v: str | None, info: Any) -> str | None:
        return _printable(v, info.field_name)

    @field_validator("captured_at", "double_opt_in_at", "effective_from", "effective_until")
    @classmethod
    def _aware(cls, v: datetime | None, info: Any) -> datetime | None:
        if v is not None and v.tzinfo is None:
            raise ValueError("give a time zone (e.g. 2026-11-01T10:00:00Z)")
        return v

    @model_validator(mode="after")
    def _coherent(self) -> ConsentIn:
        now = datetime.now(UTC)
        if self.captured_at is None:
            if not self.legacy:
                raise FieldError("captured_at", "captured_at is required (only legacy records may omit it)")
            self.captured_at = EPOCH
        elif self.captured_at > now + CLOCK_SKEW:
            raise FieldError("captured_at", "captured_at is in the future")
        if self.source is None:
            if not self.legacy:
                raise FieldError("source", "source is required (e.g. 'crm:hubspot' or 'signup-form')")
            self.source = "legacy"
        if self.effective_from and self.effective_until and self.effective_until <= self.effective_from:
            raise FieldError("effective_until", "effective_until must be after effective_from")
        return self


def field_of(exc_errors: list[Any]) -> tuple[str, str]:
    """(field, message) of the first pydantic error."""
    if not exc_errors:
        return "body", "invalid"
    e = exc_errors[0]
    loc = ".".join(str(p) for p in e.get("loc", ())) or "body"
    cause = (e.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        loc = ".".join(p for p in (loc if loc != "body" else "", cause.field) if p)
    msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
    if e.get("type") == "extra_forbidden":
        msg = "unknown field"
    return loc, msg
