"""From a queued message and one recipient to the bytes handed to SMTP.

The delivery worker calls :meth:`Composer.compose` once per transaction:
render (template or literal parts), MIME, click/open tracking, List-Unsubscribe
for bulk streams, DKIM. Nothing here touches the database: the worker passes
the message row and recipient in, gets bytes out.

Raw messages (SMTP relay, REST ``raw``) go out byte-exact; only a DKIM
signature is added when the From domain has a key (existing signatures stay).

Click tracking stores nothing per send: a click token carries the recipient id
and link index, and :meth:`Composer.links` re-renders the recipient's HTML to
find the URL behind that index. Rendering is deterministic for a pinned
template version, so the redirect can only ever lead to a URL that was in the
message, at zero cost on the sending hot path.

A personalized copy's Message-ID names its recipient row with the signed VERP
token (``<{message uuid}.{token}@{domain}>``, when ``[feedback] bounce_domain``
is set): a feedback-loop report that returns only the original message is then
proof of which row it is about. Anything else in a Message-ID is never believed
by the inbound listener (every recipient sees it; anyone could copy it).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.compose.dkim import DkimSigner
from engine.compose.mime import Attachment, InlineImage, ListUnsubscribe, MessageContent, build_message
from engine.compose.render import Renderer, merge_vars
from engine.compose.sevenbit import to_seven_bit
from engine.compose.stored import StoredContent, StoredContentError
from engine.compose.tracking import Keyring, rewrite_links, track_html, unsubscribe_url
from engine.feedback.verp import Verp

if TYPE_CHECKING:
    from engine.config import Settings


@dataclass(frozen=True, slots=True)
class MessageRow:
    """The parts of a ``messages`` row composition needs, the content already parsed."""

    id: Any
    mail_from: str
    stream: str
    raw: bytes | None
    content: StoredContent | None
    metadata: Mapping[str, Any]
    source: str = "http"
    content_error: str | None = None
    """Why the stored content could not be read (``content`` is then None); compose refuses the message."""

    @classmethod
    def from_stored(
        cls,
        id: Any,
        mail_from: str,
        stream: str,
        raw: bytes | None,
        content: Mapping[str, Any] | None,
        metadata: Mapping[str, Any],
        source: str = "http",
    ) -> MessageRow:
        """From the columns as loaded, parsing the content JSON once per message (not per recipient).

        A damaged content does not raise here, where a worker loads a whole batch of
        messages: it is kept as ``content_error`` and :meth:`Composer.compose` refuses
        that one message.
        """
        if content is None:
            return cls(id, mail_from, stream, raw, None, metadata, source)
        try:
            parsed = StoredContent.from_json(content)
        except StoredContentError as exc:
            return cls(id, mail_from, stream, raw, None, metadata, source, str(exc))
        return cls(id, mail_from, stream, raw, parsed, metadata, source)


def engine_variables(settings: Settings) -> frozenset[str]:
    """Template variables the engine fills in itself: ``unsubscribe_url`` when it can sign one."""
    return frozenset({"unsubscribe_url"}) if settings.tracking.keys else frozenset()


class Composer:
    def __init__(
        self,
        settings: Settings,
        renderer: Renderer | None = None,
        signer: DkimSigner | None = None,
        keyring: Keyring | None = None,
    ) -> None:
        self.settings = settings
        self.renderer = renderer or Renderer(settings.templates, engine_variables=engine_variables(settings))
        self.signer = signer
        if self.signer is None and settings.domains:
            self.signer = DkimSigner.from_config(settings.domains, base_dir=settings.home)
        self.keyring = keyring
        if self.keyring is None and settings.tracking.keys:
            self.keyring = Keyring.from_config(settings.tracking)
        self.base_url = (settings.tracking.base_url or settings.http.public_url).rstrip("/")
        self.verp = Verp.from_settings(settings)

    def personalized(self, msg: MessageRow) -> bool:
        """Does each recipient get different bytes (tokens, variables)? Else one transaction serves all."""
        if msg.raw is not None:
            return False
        return (
            bool(self.keyring)
            or (msg.content is not None and msg.content.template is not None)
            or msg.stream in self.settings.mime.bulk_streams
        )

    def compose(self, msg: MessageRow, recipient_id: int, recipient_vars: Mapping[str, Any] | None = None) -> bytes:
        """The final bytes for this recipient (or for every recipient, when not personalized)."""
        return self._sign(self._unsigned(msg, recipient_id, recipient_vars))

    def compose_seven_bit(
        self, msg: MessageRow, recipient_id: int, recipient_vars: Mapping[str, Any] | None = None
    ) -> bytes | None:
        """The final bytes for a receiver without 8BITMIME (RFC 6152): converted to 7-bit, then
        signed, so the DKIM signature holds for what is sent; None when it cannot be converted."""
        converted = to_seven_bit(self._unsigned(msg, recipient_id, recipient_vars))
        return None if converted is None else self._sign(converted)

    def _unsigned(self, msg: MessageRow, recipient_id: int, recipient_vars: Mapping[str, Any] | None) -> bytes:
        if msg.raw is not None:
            return msg.raw
        content = msg.content
        if content is None:
            raise StoredContentError(msg.content_error or "the message has neither raw bytes nor content")
        url = unsubscribe_url(self.base_url, recipient_id, self.keyring) if self.keyring is not None else None
        subject, html, text = self._parts(content, recipient_vars, url)
        sender = content.sender
        list_unsub = None
        if html is not None and self.keyring is not None and (self.settings.tracking.track_clicks or self.settings.tracking.track_opens):
            html, _ = track_html(html, recipient_id, self.keyring, self.settings.tracking, self.base_url)
        if msg.stream in self.settings.mime.bulk_streams and url is not None:
            mailto = None
            if self.settings.mime.list_unsubscribe_mailto:
                # The same signed token in the subject identifies the recipient without personal data.
                mailto = f"mailto:{self.settings.mime.list_unsubscribe_mailto}?subject=unsubscribe%20{url.rsplit('/', 1)[1]}"
            list_unsub = ListUnsubscribe(url=url, mailto=mailto)
        domain = sender.address.rpartition("@")[2]
        built = build_message(
            MessageContent(
                sender=sender,
                to=content.to,
                cc=content.cc,
                reply_to=[content.reply_to] if content.reply_to else (),
                subject=subject,
                text=text,
                html=html,
                headers=content.headers,
                stream=msg.stream,
                list_unsubscribe=list_unsub,
                inline_images=[
                    InlineImage(i.content_id, i.content_type, base64.b64decode(i.content), i.filename)
                    for i in content.inline_images
                ],
                attachments=[
                    Attachment(a.filename, a.content_type, base64.b64decode(a.content)) for a in content.attachments
                ],
                feedback={k: str(v) for k, v in msg.metadata.items() if k in ("campaign", "customer", "sender_id")},
            ),
            sending_domain=domain,
            message_id=self._message_id(msg, recipient_id),
            config=self.settings.mime,
        )
        return built.raw

    def _message_id(self, msg: MessageRow, recipient_id: int) -> str:
        """The left part of the Message-ID: per recipient (signed when VERP is on) for personalized copies."""
        if not self.personalized(msg):
            return str(msg.id)
        return f"{msg.id}.{self.verp.token(recipient_id) if self.verp is not None else recipient_id}"

    def links(self, msg: MessageRow, recipient_vars: Mapping[str, Any] | None = None) -> list[str]:
        """The tracked link URLs of this recipient's copy, in index order (for click redirects)."""
        if msg.raw is not None or msg.content is None:
            return []
        _, html, _ = self._parts(msg.content, recipient_vars)
        if html is None:
            return []
        _, links = rewrite_links(html, lambda i, u: u, utm=self.settings.tracking.utm, max_links=self.settings.tracking.max_links)
        return links

    def _parts(
        self, content: StoredContent, recipient_vars: Mapping[str, Any] | None, unsubscribe: str | None = None,
    ) -> tuple[str, str | None, str | None]:
        template = content.template
        if template:
            variables = merge_vars(content.vars, dict(recipient_vars or {}))
            if unsubscribe is not None:
                variables.setdefault("unsubscribe_url", unsubscribe)  # the engine's own one-click link
            rendered = self.renderer.render(template, variables)
            subject = content.subject or rendered.subject
            return subject, rendered.html, rendered.text
        return content.subject or "", content.html, content.text

    def _sign(self, raw: bytes) -> bytes:
        if self.signer is None:
            return raw
        return self.signer.sign(raw)
