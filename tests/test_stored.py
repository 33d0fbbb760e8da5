"""The stored message content: the shape rows have always had, read back as written."""

from __future__ import annotations

import base64
import email
import email.policy

import pytest

from engine.compose.mime import Mailbox
from engine.compose.pipeline import Composer, MessageRow
from engine.compose.stored import StoredAttachment, StoredContent, StoredContentError, StoredImage, pin_template
from engine.config import load_settings
from engine.errors import EngineError

B64 = base64.b64encode(b"\x89PNG").decode()

# A row as accept wrote it before the model existed: the format existing rows hold.
FULL_ROW = {
    "from": {"email": "shop@example.com", "name": "Shop"},
    "to": [{"email": "ann@example.net"}, {"email": "bob@example.net", "name": "Bob"}],
    "cc": [{"email": "cc@example.net"}],
    "subject": "Hello",
    "text": "Hi\n",
    "html": "<p>Hi <img src='cid:logo@shop'></p>",
    "headers": {"X-Campaign": "c1"},
    "template": None,
    "vars": {"order": 17},
    "inline_images": [{"content_id": "logo@shop", "content_type": "image/png", "content": B64, "filename": None}],
    "attachments": [{"filename": "terms.txt", "content_type": "text/plain", "content": B64}],
    "reply_to": {"email": "help@example.com", "name": "Help"},
}
MINIMAL_ROW = {
    "from": {"email": "shop@example.com"},
    "to": [{"email": "ann@example.net"}],
    "cc": [],
    "subject": None,
    "text": None,
    "html": None,
    "headers": {},
    "template": "receipt@3",
    "vars": {},
}


def test_writes_the_keys_and_order_rows_have() -> None:
    content = StoredContent(
        sender=Mailbox("shop@example.com", "Shop"),
        to=[Mailbox("ann@example.net"), Mailbox("bob@example.net", "Bob")],
        cc=[Mailbox("cc@example.net")],
        subject="Hello",
        text="Hi\n",
        html="<p>Hi <img src='cid:logo@shop'></p>",
        headers={"X-Campaign": "c1"},
        vars={"order": 17},
        inline_images=[StoredImage("logo@shop", "image/png", B64)],
        attachments=[StoredAttachment("terms.txt", "text/plain", B64)],
        reply_to=Mailbox("help@example.com", "Help"),
    )
    out = content.to_json()
    assert out == FULL_ROW and list(out) == list(FULL_ROW)
    minimal = StoredContent(sender=Mailbox("shop@example.com"), to=[Mailbox("ann@example.net")], template="receipt@3")
    assert list(minimal.to_json().items()) == list(MINIMAL_ROW.items())  # optional keys absent, not null


@pytest.mark.parametrize("row", [FULL_ROW, MINIMAL_ROW], ids=["full", "minimal"])
def test_reads_back_what_it_wrote(row: dict) -> None:
    content = StoredContent.from_json(row)
    assert content.to_json() == row
    assert StoredContent.from_json(content.to_json()) == content


def test_absent_optional_keys_read_as_empty() -> None:
    content = StoredContent.from_json({"from": {"email": "a@x.test"}})
    assert content.to == [] and content.headers == {} and content.vars == {} and content.reply_to is None
    assert content.inline_images == [] and content.attachments == [] and content.template is None


def test_pin_template_rewrites_only_the_template() -> None:
    stored = StoredContent(sender=Mailbox("a@x.test"), template="welcome").to_json()
    pin_template(stored, "welcome@4")
    assert StoredContent.from_json(stored).template == "welcome@4"


@pytest.mark.parametrize(
    "row", [{}, {"to": []}, {"from": "a@x.test"}, {"from": {"email": "a@x.test"}, "to": [{"name": "no email"}]},
            {"from": {"email": "a@x.test"}, "attachments": [{"filename": "f"}]}],
)
def test_a_damaged_row_is_one_clear_error(row: dict) -> None:
    with pytest.raises(StoredContentError, match="malformed"):
        StoredContent.from_json(row)


def test_a_damaged_row_is_refused_at_compose_not_at_load(tmp_path) -> None:
    composer = Composer(load_settings(None, env={"ENGINE_HOME": str(tmp_path)}))
    broken = MessageRow.from_stored("m1", "a@x.test", "default", None, {"to": []}, {})
    assert broken.content is None and broken.content_error and "malformed" in broken.content_error
    assert not composer.personalized(broken)
    with pytest.raises(EngineError, match="malformed"):
        composer.compose(broken, 1)
    assert composer.links(broken) == []


def test_compose_reads_the_stored_row(tmp_path) -> None:
    composer = Composer(load_settings(None, env={"ENGINE_HOME": str(tmp_path)}))
    msg = MessageRow.from_stored("m1", "shop@example.com", "default", None, FULL_ROW, {})
    parsed = email.message_from_bytes(composer.compose(msg, 7), policy=email.policy.default)
    assert parsed["From"] == "Shop <shop@example.com>" and parsed["Reply-To"] == "Help <help@example.com>"
    assert parsed["To"] == "ann@example.net, Bob <bob@example.net>" and parsed["Cc"] == "cc@example.net"
    assert parsed["X-Campaign"] == "c1" and parsed["Subject"] == "Hello"
    names = [p.get_filename() for p in parsed.iter_attachments()]
    assert names == ["terms.txt"]
