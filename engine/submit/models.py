"""The REST submission schema (pydantic), which FastAPI turns into OpenAPI.

Models reject unknown fields, so a misspelt key is a 422 naming it rather than
a silently dropped option. Cross-field rules (raw vs structured content, CR/LF
in header values, address syntax) are checked here too, so every error names
the offending field.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from engine.addresses import AddressError, is_address_literal, split_address

MAX_HEADER_VALUE = 998

ADDRESS_PATTERN = r"^[^\x00-\x20\x7f@]{1,64}@[^\x00-\x20\x7f@]{1,253}$"
"""What an address looks like, for the OpenAPI document (the server checks more: engine.addresses.split_address)."""
_ADDRESS_DOC: dict[str, Any] = {
    "minLength": 3, "pattern": ADDRESS_PATTERN, "description": "local@domain: no spaces or control characters",
}
_NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"
_TEMPLATE_REF = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}(@[0-9]{1,9})?$"


def _no_crlf(value: str, what: str) -> str:
    if "\r" in value or "\n" in value or "\x00" in value:
        raise ValueError(f"{what} must not contain CR, LF or NUL characters")
    return value


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Error type of :func:`storable`; its ``ctx["path"]`` extends the field's location (see engine.api.app).
UNSTORABLE = "unstorable"


def _unstorable(path: str, what: str) -> PydanticCustomError:
    return PydanticCustomError(UNSTORABLE, "{what}", {"path": path, "what": what})


def _walk(value: Any, path: str, single_line: bool = False) -> None:
    if isinstance(value, str):
        if "\x00" in value:
            raise _unstorable(path, "must not contain NUL (\\u0000) characters")
        if single_line and ("\r" in value or "\n" in value):
            raise _unstorable(path, "must not contain CR or LF (values may end up in headers)")
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise _unstorable(path, "integer is outside the signed 64-bit range")
    elif isinstance(value, dict):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and "\x00" in k:
                raise _unstorable(sub.replace("\x00", "\\u0000"), "key must not contain NUL (\\u0000) characters")
            if single_line and isinstance(k, str) and ("\r" in k or "\n" in k):
                raise _unstorable(sub.replace("\r", "\\r").replace("\n", "\\n"), "key must not contain CR or LF")
            _walk(v, sub, single_line)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _walk(v, f"{path}[{i}]", single_line)


JsonT = TypeVar("JsonT")


def storable(value: JsonT, *, single_line: bool = False) -> JsonT:
    """Refuse what Postgres cannot store as text/jsonb: NUL characters, integers beyond 64 bits.

    One recursive walk; ``"\\x00" in s`` per string (no per-character loop). The error's
    ``ctx["path"]`` is the offending key path inside the field (``order.items[2].note``).
    ``single_line``: no CR/LF either (metadata and external ids, which may end up in headers).
    """
    _walk(value, "", single_line)
    return value


def _no_nul(value: str | None) -> str | None:
    if value is not None and "\x00" in value:
        raise ValueError("must not contain NUL (\\u0000) characters")
    return value


def _address(value: str) -> str:
    try:
        split_address(value)
    except AddressError as exc:
        raise ValueError(str(exc)) from None
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=10 * 1024 * 1024)


class Mailbox(_Model):
    """An address with an optional display name (and, for recipients, per-recipient template vars)."""

    email: Annotated[str, Field(max_length=254, json_schema_extra=_ADDRESS_DOC)]
    name: Annotated[str | None, Field(max_length=200, json_schema_extra={"pattern": _NO_CONTROL})] = None
    vars: dict[str, Any] | None = None
    contact_id: Annotated[str | None, Field(min_length=1, max_length=200)] = None
    """The CRM/CDP id of this recipient: stored per recipient, on every event, never in a URL."""
    external: dict[str, Any] | None = None
    """Other external ids (CDP segment, membership and reason, CRM owner ...), carried like contact_id."""

    @field_validator("vars")
    @classmethod
    def _vars(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return storable(v)

    @field_validator("contact_id")
    @classmethod
    def _contact_id(cls, v: str | None) -> str | None:
        if v is not None and any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise ValueError("contact_id must not contain control characters")
        return v

    @field_validator("external")
    @classmethod
    def _external(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and len(repr(v)) > 8192:
            raise ValueError("external is larger than 8 KB")
        return storable(v, single_line=True)

    @field_validator("email")
    @classmethod
    def _email(cls, v: str) -> str:
        return _address(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else _no_crlf(v, "name")


_RawAddress = Annotated[
    str, Field(max_length=300, json_schema_extra={"minLength": 3, "pattern": _NO_CONTROL, "description": "'a@b' or 'Name <a@b>'"})
] | Mailbox


_FROM_STRING = frozenset({"email", "name"})
_NAME_ADDR_RE = re.compile(r'^\s*(?:"([^"]*)"|([^"<>]*?))\s*<([^<>\s]+)>\s*$')


def as_mailbox(value: _RawAddress) -> Mailbox:
    """``"a@b"``, ``"Name <a@b>"`` or ``{email, name, vars}`` -> Mailbox (validated)."""
    if isinstance(value, Mailbox):
        return value
    m = _NAME_ADDR_RE.match(value)
    if m:
        name = m.group(1) if m.group(1) is not None else m.group(2)
        email = m.group(3)
    else:
        name, email = None, value.strip()
    # Same checks as Mailbox's validators, without a second pydantic pass per address
    # (that was 18% of the batch submit path).
    if len(email) > 254:
        raise ValueError("address is longer than 254 characters")
    _address(email)
    if name:
        if len(name) > 200:
            raise ValueError("name is longer than 200 characters")
        _no_crlf(name, "name")
    return Mailbox.model_construct(_fields_set=set(_FROM_STRING), email=email, name=name or None, vars=None)


def _checked_mailbox(value: _RawAddress, info: ValidationInfo) -> Mailbox:
    try:
        mailbox = as_mailbox(value)
    except ValidationError as exc:  # pragma: no cover - as_mailbox raises ValueError itself
        raise ValueError(str(exc.errors()[0]["msg"]).removeprefix("Value error, ")) from None
    if info.field_name in _RECIPIENT_FIELDS:
        _no_literal(mailbox.email, info)
    return mailbox


_RECIPIENT_FIELDS = frozenset({"to", "cc", "bcc", "rcpt_to"})


def _no_literal(address: str, info: ValidationInfo) -> None:
    """Refuse a recipient like ``user@[192.0.2.1]`` unless ``[routing] allow_address_literals``.

    The API passes that setting as the validation context (``allow_address_literals``);
    without a context, literals are refused.
    """
    allowed = bool(info.context and info.context.get("allow_address_literals"))
    if not allowed and is_address_literal(address.rpartition("@")[2]):
        raise ValueError("address literals are not accepted as recipients ([routing] allow_address_literals = false)")


# An address as "a@b", "Name <a@b>" or {email, name, vars}; always a Mailbox once validated.
AddressIn = Annotated[_RawAddress, AfterValidator(_checked_mailbox)]


class Envelope(_Model):
    mail_from: Annotated[str, Field(max_length=254)] = Field(
        description="Envelope sender (return path); '' is the null sender.",
        json_schema_extra={"anyOf": [{"const": ""}, {"pattern": ADDRESS_PATTERN}]},
    )
    rcpt_to: list[Annotated[str, Field(max_length=254, json_schema_extra=_ADDRESS_DOC)]] = Field(
        min_length=1, description="Envelope recipients (RCPT TO)."
    )

    @field_validator("mail_from")
    @classmethod
    def _from(cls, v: str) -> str:
        return v if v == "" else _address(v)

    @field_validator("rcpt_to")
    @classmethod
    def _rcpts(cls, v: list[str], info: ValidationInfo) -> list[str]:
        for a in v:
            _address(a)
            _no_literal(a, info)
        return v


def _base64(value: str, what: str) -> str:
    import base64
    import binascii

    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} must be base64") from None
    return value


class InlineImageIn(_Model):
    """An image the HTML shows as ``<img src="cid:CONTENT_ID">`` (sent as multipart/related)."""

    content_id: str = Field(pattern=r"^[A-Za-z0-9._@+-]{1,100}$")
    content_type: str = Field(pattern=r"^image/[a-z0-9.+-]{1,50}$")
    content: str = Field(description="base64")
    filename: str | None = Field(default=None, max_length=200)

    @field_validator("content")
    @classmethod
    def _b64(cls, v: str) -> str:
        return _base64(v, "content")

    @field_validator("filename")
    @classmethod
    def _fname(cls, v: str | None) -> str | None:
        return None if v is None else _no_crlf(v, "filename")


class AttachmentIn(_Model):
    filename: str = Field(min_length=1, max_length=200)
    content_type: str = Field(default="application/octet-stream", pattern=r"^[a-z0-9.+-]{1,50}/[a-z0-9.+-]{1,100}$")
    content: str = Field(description="base64")

    @field_validator("content")
    @classmethod
    def _b64(cls, v: str) -> str:
        return _base64(v, "content")

    @field_validator("filename")
    @classmethod
    def _fname(cls, v: str) -> str:
        return _no_crlf(v, "filename")


class MessageIn(_Model):
    """One message: structured (from/to/subject/parts or template) or raw RFC 5322 with an envelope."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, json_schema_extra=lambda s: _message_shape(s))

    from_: AddressIn | None = Field(default=None, alias="from", description="Sender (From:); required unless `raw`.")
    to: list[AddressIn] = Field(default_factory=list, description="Recipients; to, cc and bcc together need at least one.")
    cc: list[AddressIn] = Field(default_factory=list)
    bcc: list[AddressIn] = Field(default_factory=list, description="Recipients not shown in any header.")
    reply_to: AddressIn | None = None
    subject: Annotated[str, Field(max_length=MAX_HEADER_VALUE)] | None = Field(
        default=None, description="Required unless a template provides it."
    )
    text: str | None = Field(default=None, description="Plain-text body.")
    html: str | None = Field(default=None, description="HTML body (links are click-tracked when tracking is on).")
    headers: dict[str, Annotated[str, Field(max_length=MAX_HEADER_VALUE)]] = Field(
        default_factory=dict, description="Extra header fields, name -> value (single line)."
    )
    stream: str | None = Field(default=None, description="A configured stream; omitted: [queue] default_stream.")
    template: Annotated[str, Field(max_length=200, json_schema_extra={"pattern": _TEMPLATE_REF})] | None = Field(
        default=None, description="A template name, or name@version to pin one; renders subject/html/text from `vars`."
    )
    vars: dict[str, Any] = Field(default_factory=dict, description="Template variables for every recipient.")
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Your own data, stored with the message and sent on every event."
    )
    send_at: datetime | None = Field(default=None, description="Hold the message until then (with a timezone).")
    inline_images: list[InlineImageIn] = Field(default_factory=list, max_length=50)
    attachments: list[AttachmentIn] = Field(default_factory=list, max_length=50)
    raw: str | None = Field(default=None, description="A complete RFC 5322 message; needs `envelope`.")
    envelope: Envelope | None = None

    @field_validator("text", "html", "template")
    @classmethod
    def _text(cls, v: str | None) -> str | None:
        return _no_nul(v)

    @field_validator("vars")
    @classmethod
    def _json(cls, v: dict[str, Any]) -> dict[str, Any]:
        return storable(v)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, Any]) -> dict[str, Any]:
        return storable(v, single_line=True)

    @field_validator("subject")
    @classmethod
    def _subject(cls, v: str | None) -> str | None:
        return None if v is None else _no_crlf(v, "subject")

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not name or len(name) > 76 or not all(33 <= ord(c) <= 126 and c != ":" for c in name):
                raise ValueError(f"header name {name!r} is not a valid RFC 5322 field name")
            _no_crlf(value, f"header {name!r}")
        return v

    @field_validator("send_at")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is None:
            raise ValueError("send_at must include a timezone, e.g. 2026-01-01T09:00:00Z")
        return v

    @model_validator(mode="after")
    def _shape(self) -> MessageIn:
        if self.raw is not None:
            structured = [
                k for k in ("from_", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "template",
                            "inline_images", "attachments")
                if getattr(self, k)
            ]
            if structured:
                names = ", ".join("from" if k == "from_" else k for k in structured)
                raise ValueError(f"a raw message carries its own content; remove: {names}")
            if self.envelope is None:
                raise ValueError("a raw message needs an explicit envelope {mail_from, rcpt_to}")
            if not self.raw.strip():
                raise ValueError("raw message is empty")
            return self
        if self.envelope is not None:
            raise ValueError("envelope is only used with raw; structured messages use from/to/cc/bcc")
        if self.from_ is None:
            raise ValueError("from is required")
        if not (self.to or self.cc or self.bcc):
            raise ValueError("at least one recipient is required in to, cc or bcc")
        if self.template is None and not (self.text or self.html):
            raise ValueError("no content: give text and/or html, a template, or a raw message")
        if self.template is None and self.subject is None:
            raise ValueError("subject is required unless a template provides it")
        if self.inline_images and self.template is None and not self.html:
            raise ValueError("inline_images need an html part (or a template with one)")
        return self


_STRUCTURED = ("from", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "template", "inline_images", "attachments")


def _message_shape(schema: dict[str, Any]) -> None:
    """The cross-field rules of :meth:`MessageIn._shape`, for the OpenAPI document.

    Either ``raw`` with an ``envelope`` and no structured field, or ``from``, a recipient
    in to/cc/bcc, and content: a template, or a subject with text or html.
    """
    filled = {"type": "string", "minLength": 1}
    nonempty = {**filled, "pattern": "\\S"}
    listed = {"type": "array", "minItems": 1}
    raw = {
        "required": ["raw", "envelope"],
        "properties": {"raw": nonempty, "envelope": {"type": "object"}, **{k: False for k in _STRUCTURED}},
    }
    structured = {
        "required": ["from"],
        "properties": {"from": {"not": {"type": "null"}}, "raw": {"type": "null"}, "envelope": {"type": "null"}},
        "allOf": [
            {"anyOf": [{"required": [k], "properties": {k: listed}} for k in ("to", "cc", "bcc")]},
            {"anyOf": [
                {"required": ["template"], "properties": {"template": {"type": "string"}}},
                {"required": ["subject"], "properties": {"subject": {"type": "string"}},
                 "anyOf": [{"required": [k], "properties": {k: filled}} for k in ("text", "html")]},
            ]},
            {"anyOf": [
                {"properties": {"inline_images": {"maxItems": 0}}},
                {"required": ["template"], "properties": {"template": {"type": "string"}}},
                {"required": ["html"], "properties": {"html": filled}},
            ]},
        ],
    }
    schema["oneOf"] = [raw, structured]


class BatchIn(_Model):
    messages: list[MessageIn] = Field(min_length=1)


class RecipientOut(BaseModel):
    id: int
    email: str
    state: str


class AcceptedOut(BaseModel):
    id: str
    recipients: list[RecipientOut]


class BatchOut(BaseModel):
    messages: list[AcceptedOut]


class AttemptOut(BaseModel):
    at: datetime
    outcome: str
    code: int | None
    status: str | None
    reply: str | None
    mx: str | None
    duration_ms: int | None


class RecipientStatus(BaseModel):
    id: int
    email: str
    kind: str
    state: str
    attempts: int
    next_attempt_at: datetime | None
    last_code: int | None
    last_status: str | None
    last_reply: str | None
    updated_at: datetime
    history: list[AttemptOut] = []


class MessageStatus(BaseModel):
    id: str
    created_at: datetime
    source: str
    mail_from: str
    stream: str
    metadata: dict[str, Any]
    send_at: datetime | None
    raw_size: int | None
    recipients: list[RecipientStatus]


class ErrorOut(BaseModel):
    error: str
    field: str | None = None
    details: list[dict[str, Any]] | None = None
