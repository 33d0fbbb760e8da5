"""A structured message as stored in ``messages.content`` (jsonb), typed once for both sides.

Accept writes it (:meth:`StoredContent.to_json`) when a REST message is enqueued;
the delivery worker and the click redirect read it back
(:meth:`StoredContent.from_json`) to compose. Only this module knows the JSON
keys, so the writer and the readers cannot drift apart across the queue. The
stored shape is what existing rows hold and must stay so::

    {"from": MAILBOX, "to": [MAILBOX], "cc": [MAILBOX], "subject": str | null,
     "text": str | null, "html": str | null, "headers": {name: value},
     "template": str | null, "vars": {...},
     "inline_images": [{"content_id", "content_type", "content" (base64), "filename"}],  # only if any
     "attachments": [{"filename", "content_type", "content" (base64)}],                   # only if any
     "reply_to": MAILBOX}                                                                  # only if set

    MAILBOX = {"email": str, "name": str}  ("name" only when there is one)

Reading is on the delivery hot path (once per message a worker loads), so
:meth:`~StoredContent.from_json` only reshapes: no validation. The values were
validated at submission, and ``build_message`` checks everything that reaches a
header again. Mailboxes are read straight into :class:`~engine.compose.mime.Mailbox`
so composing a copy per recipient converts nothing. Attachments and inline
images stay base64 here, as stored; they are decoded when a message is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.compose.mime import Mailbox
from engine.errors import EngineError


class StoredContentError(EngineError):
    """A stored content is not in the shape :class:`StoredContent` writes (a damaged row)."""


def _mailbox_to_json(mb: Mailbox) -> dict[str, Any]:
    out: dict[str, Any] = {"email": mb.address}
    if mb.name:
        out["name"] = mb.name
    return out


def _mailbox_from_json(data: Mapping[str, Any]) -> Mailbox:
    return Mailbox(data["email"], data.get("name"))


@dataclass(slots=True)
class StoredImage:
    """An inline image the HTML shows as ``cid:<content_id>``; ``content`` is base64."""

    content_id: str
    content_type: str
    content: str
    filename: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "content_id": self.content_id,
            "content_type": self.content_type,
            "content": self.content,
            "filename": self.filename,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoredImage:
        return cls(data["content_id"], data["content_type"], data["content"], data.get("filename"))


@dataclass(slots=True)
class StoredAttachment:
    """A file attached to the message; ``content`` is base64."""

    filename: str
    content_type: str
    content: str

    def to_json(self) -> dict[str, Any]:
        return {"filename": self.filename, "content_type": self.content_type, "content": self.content}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoredAttachment:
        return cls(data["filename"], data["content_type"], data["content"])


@dataclass(slots=True)
class StoredContent:
    """The structured parts of one REST message: addresses, literal parts or a template, extras.

    ``subject``, ``text`` and ``html`` are literal parts; with a ``template`` they are
    rendered from it instead (a literal ``subject`` still wins). ``vars`` are the
    message's template variables; per-recipient variables live on the recipient rows.
    """

    sender: Mailbox
    """Stored under the key ``from``."""
    to: list[Mailbox] = field(default_factory=list)
    cc: list[Mailbox] = field(default_factory=list)
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    template: str | None = None
    """``name`` as submitted; accept pins it to ``name@N`` before the row is written."""
    vars: dict[str, Any] = field(default_factory=dict)
    inline_images: list[StoredImage] = field(default_factory=list)
    attachments: list[StoredAttachment] = field(default_factory=list)
    reply_to: Mailbox | None = None

    def to_json(self) -> dict[str, Any]:
        """The stored form (keys and order as rows have always had them); shares ``headers``/``vars``."""
        out: dict[str, Any] = {
            "from": _mailbox_to_json(self.sender),
            "to": [_mailbox_to_json(m) for m in self.to],
            "cc": [_mailbox_to_json(m) for m in self.cc],
            "subject": self.subject,
            "text": self.text,
            "html": self.html,
            "headers": self.headers,
            "template": self.template,
            "vars": self.vars,
        }
        if self.inline_images:
            out["inline_images"] = [i.to_json() for i in self.inline_images]
        if self.attachments:
            out["attachments"] = [a.to_json() for a in self.attachments]
        if self.reply_to is not None:
            out["reply_to"] = _mailbox_to_json(self.reply_to)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoredContent:
        """Read a stored form back. Absent optional keys read as empty; a missing ``from``
        or a mailbox/attachment without its required keys is a :class:`StoredContentError`."""
        try:
            images = data.get("inline_images")
            attachments = data.get("attachments")
            reply_to = data.get("reply_to")
            return cls(
                _mailbox_from_json(data["from"]),
                [_mailbox_from_json(m) for m in data.get("to") or ()],
                [_mailbox_from_json(m) for m in data.get("cc") or ()],
                data.get("subject"),
                data.get("text"),
                data.get("html"),
                data.get("headers") or {},
                data.get("template"),
                data.get("vars") or {},
                [StoredImage.from_json(i) for i in images] if images else [],
                [StoredAttachment.from_json(a) for a in attachments] if attachments else [],
                _mailbox_from_json(reply_to) if reply_to else None,
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise StoredContentError(f"stored message content is malformed: {type(exc).__name__}: {exc}") from None


def pin_template(stored: dict[str, Any], ref: str) -> None:
    """Point an already stored-form content at template version ``ref`` (``name@N``).

    Accept resolves the template versions of a whole batch at once, after each
    message's content was put in its stored form.
    """
    stored["template"] = ref
