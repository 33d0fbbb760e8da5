"""MIME building: structure, headers, encodings, and no way to inject a header."""

from __future__ import annotations

import email
import email.policy
from datetime import datetime, timezone

import pytest

from engine.compose.mime import (
    Attachment,
    BuiltMessage,
    InlineImage,
    ListUnsubscribe,
    Mailbox,
    MessageContent,
    MimeConfig,
    MimeError,
    add_headers_to_raw,
    build_message,
    has_header,
)
from engine.errors import ValidationFailed

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


def content(**kw: object) -> MessageContent:
    base: dict = dict(
        sender=Mailbox("news@example.com", "Example News"),
        to=[Mailbox("bob@example.org", "Bob")],
        subject="Hello",
        text="Hello Bob\n",
        html="<p>Hello Bob</p>",
        stream="transactional",
    )
    base.update(kw)
    return MessageContent(**base)


def build(c: MessageContent, **kw: object) -> BuiltMessage:
    return build_message(c, sending_domain="example.com", **kw)


def parse(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def body(part: email.message.EmailMessage) -> str:
    """Decoded text of a part; the wire form is CRLF, compare in Python's LF form."""
    return part.get_content().replace("\r\n", "\n")


def test_alternative_structure_and_headers() -> None:
    when = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    built = build(
        content(cc=["carol@example.org"], reply_to=[Mailbox("help@example.com")],
                headers={"X-Campaign": "spring"}, feedback={"campaign": "spring", "customer": "c42", "sender_id": "eng"}),
        message_id="abc123", date=when,
    )
    assert built.message_id == "<abc123@example.com>"
    raw = built.raw
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert msg["From"] == "Example News <news@example.com>"
    assert msg["To"] == "Bob <bob@example.org>"
    assert msg["Cc"] == "carol@example.org"
    assert msg["Reply-To"] == "help@example.com"
    assert msg["Message-ID"] == "<abc123@example.com>"
    assert msg["Date"] == "Wed, 01 May 2024 12:00:00 +0000"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Feedback-ID"] == "spring:c42:transactional:eng"
    assert msg["X-Campaign"] == "spring"
    assert msg["Bcc"] is None
    assert msg["List-Unsubscribe"] is None and msg["List-Unsubscribe-Post"] is None
    text, html = list(msg.iter_parts())
    assert body(text) == "Hello Bob\n"
    assert body(html) == "<p>Hello Bob</p>\n"
    assert text["Content-Transfer-Encoding"] == "7bit"
    assert text.get_content_charset() == "utf-8"


def test_default_message_id_is_on_the_sending_domain() -> None:
    a, b = build(content()), build(content())
    assert a.message_id.endswith("@example.com>") and a.message_id != b.message_id
    assert parse(a.raw)["Message-ID"] == a.message_id


def test_non_ascii_subject_and_body_are_encoded() -> None:
    raw = build(content(subject="Grüße aus Köln ✓", text="Straße\n" + "x" * 120 + "\n",
                        html="<p>" + "y" * 2000 + "</p>")).raw
    assert raw.isascii()  # 7bit clean: safe without 8BITMIME
    assert b"=?utf-8?" in raw
    msg = parse(raw)
    assert msg["Subject"] == "Grüße aus Köln ✓"
    text, html = list(msg.iter_parts())
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert body(text) == "Straße\n" + "x" * 120 + "\n"
    assert html["Content-Transfer-Encoding"] in ("quoted-printable", "base64")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


def test_non_ascii_display_name() -> None:
    msg = parse(build(content(sender=Mailbox("news@example.com", "Zoë, Ltd."))).raw)
    assert msg["From"].addresses[0].display_name == "Zoë, Ltd."
    assert msg["From"].addresses[0].addr_spec == "news@example.com"


def test_inline_images_and_attachments() -> None:
    raw = build(content(
        html='<p><img src="cid:logo@example.com"></p>',
        inline_images=[InlineImage("logo@example.com", "image/png", PNG, "logo.png")],
        attachments=[Attachment("invoice.pdf", "application/pdf", b"%PDF-1.4 \x00\xff"),
                     Attachment("notes é.txt", "text/plain", b"hi")],
    )).raw
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/mixed"
    body, pdf, notes = list(msg.iter_parts())
    assert body.get_content_type() == "multipart/alternative"
    text, related = list(body.iter_parts())
    assert related.get_content_type() == "multipart/related"
    html, img = list(related.iter_parts())
    assert html.get_content_type() == "text/html"
    assert img["Content-ID"] == "<logo@example.com>"
    assert img.get_content() == PNG
    assert pdf.get_filename() == "invoice.pdf" and pdf.get_content() == b"%PDF-1.4 \x00\xff"
    assert notes.get_filename() == "notes é.txt"


def test_text_only_and_html_only() -> None:
    m = parse(build(content(html=None)).raw)
    assert m.get_content_type() == "text/plain" and m["MIME-Version"] == "1.0"
    m = parse(build(content(text=None)).raw)
    assert m.get_content_type() == "text/html"
    with pytest.raises(MimeError):
        build(content(text=None, html=None))


def test_boundary_never_collides_with_content() -> None:
    # A body full of lines that look like the stdlib's boundaries must not split the message.
    fake = "".join(f"--==============={i}==\n--==============={i}==--\n" for i in range(10**18, 10**18 + 50))
    msg = parse(build(content(text=fake, html="<p>" + fake + "</p>")).raw)
    parts = list(msg.iter_parts())
    assert len(parts) == 2
    assert body(parts[0]) == fake


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"subject": "Hi\r\nBcc: victim@example.net"}, "subject"),
        ({"subject": "Hi\nX-Evil: 1"}, "subject"),
        ({"headers": {"X-Custom": "a\r\nBcc: victim@example.net"}}, "headers.X-Custom"),
        ({"headers": {"X-Custom": "a\nb"}}, "headers.X-Custom"),
        ({"sender": Mailbox("news@example.com", "News\r\nBcc: victim@example.net")}, "from.name"),
        ({"to": [Mailbox("bob@example.org", "Bob\nX: y")]}, "to[0].name"),
        ({"to": ["bob@example.org\r\nBcc: x@y.test"]}, "to[0]"),
        ({"reply_to": ["a@b.test>\r\n"]}, "reply_to[0]"),
    ],
)
def test_header_injection_is_refused(kw: dict, field: str) -> None:
    with pytest.raises(MimeError) as exc:
        build(content(**kw))
    assert exc.value.field == field
    assert isinstance(exc.value, ValidationFailed) and exc.value.status == 422


@pytest.mark.parametrize(
    "name",
    ["Content-Type", "content-transfer-encoding", "MIME-Version", "DKIM-Signature", "Received",
     "Return-Path", "From", "Bcc", "Message-ID", "List-Unsubscribe", "ARC-Seal", "Content-Foo"],
)
def test_structural_headers_cannot_be_overridden(name: str) -> None:
    with pytest.raises(MimeError) as exc:
        build(content(headers={name: "x"}))
    assert name in str(exc.value)


@pytest.mark.parametrize("name", ["X Bad", "X:Bad", "", "Ünï", "X-\x00", "a" * 77])
def test_invalid_header_names_refused(name: str) -> None:
    with pytest.raises(MimeError):
        build(content(headers={name: "x"}))


def test_custom_header_non_ascii_value_is_encoded() -> None:
    raw = build(content(headers={"X-Note": "café"})).raw
    assert raw.isascii()
    assert parse(raw)["X-Note"] == "café"


def test_bulk_needs_and_gets_list_unsubscribe() -> None:
    with pytest.raises(MimeError) as exc:
        build(content(stream="bulk"))
    assert exc.value.field == "list_unsubscribe"
    lu = ListUnsubscribe(url="https://t.example.com/u/AbC_d-1", mailto="mailto:unsub@example.com?subject=unsubscribe")
    msg = parse(build(content(stream="bulk", list_unsubscribe=lu)).raw)
    assert msg["List-Unsubscribe"] == (
        "<https://t.example.com/u/AbC_d-1>, <mailto:unsub@example.com?subject=unsubscribe>"
    )
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_transactional_has_no_list_unsubscribe() -> None:
    msg = parse(build(content(stream="transactional")).raw)
    assert "List-Unsubscribe" not in msg and "List-Unsubscribe-Post" not in msg


def test_list_unsubscribe_values_checked() -> None:
    bad = [
        ListUnsubscribe(url="http://t.example.com/u/x"),  # one-click needs https
        ListUnsubscribe(url="https://t.example.com/u/x>, <https://evil.test"),
        ListUnsubscribe(url="https://t.example.com/u/x\r\nBcc: a@b.test"),
        ListUnsubscribe(mailto="https://not-mailto.test"),
        ListUnsubscribe(),
    ]
    for lu in bad:
        with pytest.raises(MimeError):
            build(content(stream="bulk", list_unsubscribe=lu))
    # loopback http is allowed for development
    msg = parse(build(content(stream="bulk", list_unsubscribe=ListUnsubscribe(url="http://127.0.0.1:8025/u/x"))).raw)
    assert msg["List-Unsubscribe"] == "<http://127.0.0.1:8025/u/x>"


def test_feedback_id_format_is_configurable_and_sanitized() -> None:
    cfg = MimeConfig(feedback_id_format="{customer}:{campaign}:{sender_id}")
    msg = parse(build(content(feedback={"campaign": "a:b c", "customer": "7", "sender_id": "eng"}), config=cfg).raw)
    assert msg["Feedback-ID"] == "7:a-b-c:eng"
    assert "Feedback-ID" not in parse(build(content()).raw)  # no sender id, no header
    with pytest.raises(ValueError):
        MimeConfig(feedback_id_format="{email}:{sender_id}")


def test_smtputf8_local_part() -> None:
    raw = build(content(to=["jürgen@example.org"])).raw
    msg = email.message_from_bytes(raw, policy=email.policy.SMTPUTF8)
    assert msg["To"] == "jürgen@example.org"
    assert not raw.isascii()  # sent with SMTPUTF8: UTF-8 headers


def test_bad_addresses_refused() -> None:
    for bad in ["not-an-address", "a@", "@b.test", "a b@c.test", "a@b..test"]:
        with pytest.raises(MimeError):
            build(content(to=[bad]))
    with pytest.raises(MimeError) as exc:
        build(content(to=[]))
    assert exc.value.field == "to"
    with pytest.raises(MimeError) as exc:
        build_message(content(), sending_domain="bad domain")
    assert exc.value.field == "sending_domain"


def test_inline_image_checks() -> None:
    with pytest.raises(MimeError):
        build(content(inline_images=[InlineImage("a\r\nb", "image/png", PNG)]))
    with pytest.raises(MimeError):
        build(content(inline_images=[InlineImage("logo", "text/html", b"<script>")]))
    with pytest.raises(MimeError):
        build(content(attachments=[Attachment("a.bin", "application/octet-stream\r\nX: y", b"x")]))


# ----------------------------------------------------------------- raw messages

RAW = (
    b"From: a@example.com\r\nTo: b@example.org\r\nSubject: raw\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    b"Body line 1\r\n\xc3\xa9 8bit line\r\n.\r\n..leading dots\r\n"
)


def test_add_headers_keeps_the_message_byte_exact() -> None:
    out = add_headers_to_raw(RAW, [("Received", "from a by b; Wed, 01 May 2024 12:00:00 +0000"),
                                   ("Feedback-ID", "x:y:z"), ("X-Note", "café")])
    assert out.endswith(RAW)
    head = out[: len(out) - len(RAW)]
    assert head.startswith(b"Received: from a by b; Wed, 01 May 2024 12:00:00 +0000\r\nFeedback-ID: x:y:z\r\n")
    assert head.isascii() and head.endswith(b"\r\n")
    msg = parse(out)
    assert msg["X-Note"] == "café" and msg["Subject"] == "raw"


def test_add_headers_uses_the_message_line_ending() -> None:
    raw = b"Subject: lf\n\nbody\n"
    assert add_headers_to_raw(raw, {"X-A": "1"}) == b"X-A: 1\nSubject: lf\n\nbody\n"


def test_add_headers_refuses_injection() -> None:
    with pytest.raises(MimeError):
        add_headers_to_raw(RAW, {"X-A": "1\r\nBcc: x@y.test"})
    with pytest.raises(MimeError):
        add_headers_to_raw(RAW, {"X A": "1"})


def test_has_header() -> None:
    assert has_header(RAW, "subject") and has_header(RAW, "Content-Type")
    assert not has_header(RAW, "Message-ID")
    assert not has_header(b"Subject: x\r\n\r\nMessage-ID: <in@body>\r\n", "Message-ID")
