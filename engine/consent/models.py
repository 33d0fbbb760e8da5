"""One consent record as it comes in (REST body, NDJSON import line, CLI), validated.

Everything here is outside input: a bad field is a 4xx (or a per-line import error) naming it.
Addresses are keyed lower-cased; ``captured_at`` may not lie in the future (beyond a little
clock skew) since a future time would make the record unbeatable by real later changes.
Legacy opt-ins (no metadata) may omit ``captured_at``: they then date from the epoch, so any
real record overrides them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Container, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.errors import ValidationFailed
from engine.netaddr import IpAddress
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

    ip: IpAddress | None = Field(default=None, max_length=64)
    user_agent: str | None = Field(default=None, max_length=500)

    @field_validator("user_agent")
    @classmethod
    def _ua(cls, v: str | None) -> str | None:
        return _printable(v, "user_agent")


@dataclass(slots=True)
class ConsentRecord:
    """A validated consent record as the store applies it: :meth:`ConsentIn.record`, or :func:`fast_record`.

    Not frozen: a frozen dataclass sets each of its 13 fields through ``object.__setattr__``,
    which made building one cost more than validating the line it comes from (a bulk import
    builds one per line). Nothing mutates a record after it is built.
    """

    address: str
    purpose: str
    status: str
    legal_basis: str | None
    source: str
    captured_at: datetime
    policy_version: str | None = None
    double_opt_in_at: datetime | None = None
    evidence: dict[str, Any] | None = None
    effective_from: datetime | None = None
    effective_until: datetime | None = None
    contact_id: str | None = None
    legacy: bool = False


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

    def record(self) -> ConsentRecord:
        assert self.source is not None and self.captured_at is not None  # _coherent fills both
        return ConsentRecord(
            address=self.address, purpose=self.purpose, status=self.status, legal_basis=self.legal_basis,
            source=self.source, captured_at=self.captured_at, policy_version=self.policy_version,
            double_opt_in_at=self.double_opt_in_at,
            evidence=self.evidence.model_dump(exclude_none=True) if self.evidence is not None else None,
            effective_from=self.effective_from, effective_until=self.effective_until, contact_id=self.contact_id,
            legacy=self.legacy,
        )


_FAST_KEYS = frozenset(ConsentIn.model_fields) - {"evidence"}
_STATUSES = frozenset(("granted", "revoked", "unknown"))
_BASES = frozenset(LEGAL_BASES)
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:\d{2})\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BAD = object()
_SKEW_SECONDS = CLOCK_SKEW.total_seconds()


def _text(v: Any, low: int, high: int) -> bool:
    return type(v) is str and low <= len(v) <= high and not _CONTROL.search(v)


def _time(v: Any) -> Any:
    """An RFC 3339 time with its zone as a datetime, None for None, else _BAD (left to the model)."""
    if v is None:
        return None
    if type(v) is not str or not _TIME.match(v):
        return _BAD
    try:
        return datetime.fromisoformat(v)
    except ValueError:
        return _BAD


def fast_record(doc: Mapping[str, Any], purposes: Container[str]) -> ConsentRecord | None:
    """The record ``doc`` describes when it is plainly valid (the shape a CRM export has), else None.

    Accepts a subset of what :class:`ConsentIn` accepts and builds the same record from it;
    anything unusual (evidence, a legacy record without metadata, a time in another notation,
    a type to coerce, any error at all) returns None, and the caller validates with ConsentIn,
    which also words the error. A bulk import validates every line: this costs about half of
    what the model does per line (no model instance, no Python validators called through pydantic).
    """
    if not _FAST_KEYS.issuperset(doc):
        return None
    address, purpose, status, source = doc.get("address"), doc.get("purpose"), doc.get("status"), doc.get("source")
    legal_basis, policy_version, contact_id = doc.get("legal_basis"), doc.get("policy_version"), doc.get("contact_id")
    legacy = doc.get("legacy", False)
    if not (
        type(address) is str and len(address) <= 320 and type(purpose) is str and purpose in purposes
        and type(status) is str and status in _STATUSES and _text(source, 1, 200) and type(legacy) is bool
        and (legal_basis is None or (type(legal_basis) is str and legal_basis in _BASES))
        and (policy_version is None or _text(policy_version, 0, 100))
        and (contact_id is None or _text(contact_id, 1, 200))
    ):
        return None
    captured_at = _time(doc.get("captured_at"))
    double_opt_in_at = _time(doc.get("double_opt_in_at"))
    effective_from = _time(doc.get("effective_from"))
    effective_until = _time(doc.get("effective_until"))
    if captured_at is None or _BAD in (captured_at, double_opt_in_at, effective_from, effective_until):
        return None
    if captured_at.timestamp() > time.time() + _SKEW_SECONDS:  # floats: an aware datetime.now() was 13% of an import
        return None
    if effective_from and effective_until and effective_until <= effective_from:
        return None
    try:
        key = normalize_address(address)
    except ValidationFailed:
        return None
    return ConsentRecord(
        address=key, purpose=purpose, status=status, legal_basis=legal_basis, source=cast(str, source), captured_at=captured_at,
        policy_version=policy_version, double_opt_in_at=double_opt_in_at, effective_from=effective_from,
        effective_until=effective_until, contact_id=contact_id, legacy=legacy,
    )


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
