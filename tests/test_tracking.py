"""Tracking tokens (sign, verify, rotate, expire) and link rewriting."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from engine.compose.tracking import (
    Keyring,
    Token,
    TokenExpired,
    TokenInvalid,
    TokenKind,
    TrackingConfig,
    add_utm,
    insert_open_pixel,
    open_pixel_html,
    rewrite_links,
    track_html,
    tracking_url,
    unsubscribe_url,
)
from engine.errors import NotFound

NOW = 1_714_564_800.0  # 2024-05-01T12:00:00Z
DAY = 86400.0
K1 = "k1-" + "a" * 40
K2 = "k2-" + "b" * 40


def ring(**kw: object) -> Keyring:
    return Keyring({1: K1}, **kw)  # type: ignore[arg-type]


def b64(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def unb64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# ----------------------------------------------------------------- tokens


@pytest.mark.parametrize("kind", list(TokenKind))
@pytest.mark.parametrize("rid", [0, 1, 127, 128, 300, 2**31, 2**63 - 1])
def test_round_trip(kind: TokenKind, rid: int) -> None:
    k = ring()
    tok = k.sign(kind, rid, 7 if kind == TokenKind.CLICK else 0, now=NOW)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", tok) and len(tok) <= 60
    got = k.verify(tok, now=NOW + 60)
    assert got == Token(kind=kind, recipient_id=rid, link_index=7 if kind == TokenKind.CLICK else 0,
                        issued_at=NOW // 60 * 60, key_id=1)


def test_token_is_compact_and_holds_no_personal_data() -> None:
    k = ring()
    tok = k.sign(TokenKind.CLICK, 123456, 3, now=NOW)
    assert len(tok) < 45
    raw = b64(tok)
    payload = raw[:-16]
    # version, key id, kind, varint(123456)=3 bytes, varint(3), minutes u32
    assert payload[:3] == bytes([1, 1, TokenKind.CLICK])
    assert len(payload) == 3 + 3 + 1 + 4
    assert b"@" not in raw and b"example" not in raw
    assert int(NOW // 60).to_bytes(4, "big") == payload[-4:]


@pytest.mark.parametrize("mutate", ["flip_mac", "flip_payload", "truncate", "extend", "garbage", "empty", "padding"])
def test_tampered_or_truncated_tokens_rejected(mutate: str) -> None:
    k = ring()
    tok = k.sign(TokenKind.CLICK, 42, 1, now=NOW)
    raw = bytearray(b64(tok))
    if mutate == "flip_mac":
        raw[-1] ^= 1
        bad = unb64(bytes(raw))
    elif mutate == "flip_payload":
        raw[3] ^= 1  # recipient id 42 -> 43: must not verify
        bad = unb64(bytes(raw))
    elif mutate == "truncate":
        bad = tok[:-4]
    elif mutate == "extend":
        bad = unb64(bytes(raw) + b"\x00")
    elif mutate == "garbage":
        bad = "not a token!"
    elif mutate == "empty":
        bad = ""
    else:
        bad = tok + "=="
    with pytest.raises(TokenInvalid) as exc:
        k.verify(bad, now=NOW)
    assert isinstance(exc.value, NotFound) and exc.value.status == 404


def test_every_prefix_is_rejected() -> None:
    k = ring()
    tok = k.sign(TokenKind.OPEN, 99, now=NOW)
    for n in range(len(tok)):
        with pytest.raises(TokenInvalid):
            k.verify(tok[:n], now=NOW)


def test_foreign_key_rejected() -> None:
    mine = ring()
    theirs = Keyring({1: "other-" + "c" * 40})
    with pytest.raises(TokenInvalid):
        mine.verify(theirs.sign(TokenKind.OPEN, 1, now=NOW), now=NOW)
    unknown_id = Keyring({9: K1})  # same secret, unknown key id
    with pytest.raises(TokenInvalid):
        mine.verify(unknown_id.sign(TokenKind.OPEN, 1, now=NOW), now=NOW)


def test_expired_is_distinct_from_invalid() -> None:
    k = ring(ttl={TokenKind.OPEN: 10 * DAY, TokenKind.UNSUBSCRIBE: 100 * DAY})
    opened = k.sign(TokenKind.OPEN, 5, now=NOW)
    unsub = k.sign(TokenKind.UNSUBSCRIBE, 5, now=NOW)
    assert k.verify(opened, now=NOW + 9 * DAY).recipient_id == 5
    with pytest.raises(TokenExpired) as exc:
        k.verify(opened, now=NOW + 11 * DAY)
    assert exc.value.status == 410
    assert exc.value.token.recipient_id == 5
    assert not isinstance(exc.value, TokenInvalid)
    assert k.verify(unsub, now=NOW + 11 * DAY).kind == TokenKind.UNSUBSCRIBE


def test_future_token_rejected() -> None:
    k = ring()
    with pytest.raises(TokenInvalid):
        k.verify(k.sign(TokenKind.OPEN, 1, now=NOW + DAY), now=NOW)


def test_rotation_grace_period() -> None:
    old = Keyring({1: K1})
    tok = old.sign(TokenKind.CLICK, 77, 2, now=NOW)
    retired = NOW + DAY
    rotated = Keyring({1: K1, 2: K2}, retired_at={1: retired}, grace_period=30 * DAY)
    assert rotated.signing_key_id == 2
    new_tok = rotated.sign(TokenKind.CLICK, 77, 2, now=NOW + 2 * DAY)
    assert b64(new_tok)[1] == 2
    # old key still verifies during its grace period, new tokens verify too
    assert rotated.verify(tok, now=retired + 29 * DAY).recipient_id == 77
    assert rotated.verify(new_tok, now=retired + 29 * DAY).key_id == 2
    # after the grace period the old key is dead
    with pytest.raises(TokenInvalid):
        rotated.verify(tok, now=retired + 31 * DAY)
    # a staged key (present, not yet signing) verifies before the switch
    staged = Keyring({1: K1, 2: K2}, signing_key_id=1)
    assert staged.verify(new_tok, now=NOW + 2 * DAY).key_id == 2


def test_keyring_from_config() -> None:
    retired = datetime(2024, 5, 2, tzinfo=UTC)
    cfg = TrackingConfig.model_validate({
        "keys": [{"id": 1, "secret": K1, "retired_at": retired.isoformat()}, {"id": 2, "secret": K2}],
        "key_grace_period": "7d",
        "click_ttl": "90d",
        "utm": {"utm_source": "engine"},
    })
    k = Keyring.from_config(cfg)
    assert k.signing_key_id == 2
    tok = Keyring({1: K1}).sign(TokenKind.CLICK, 1, now=NOW)
    assert k.verify(tok, now=(retired + timedelta(days=6)).timestamp()).key_id == 1
    with pytest.raises(TokenInvalid):
        k.verify(tok, now=(retired + timedelta(days=8)).timestamp())
    assert "secret" not in repr(cfg) or K2 not in repr(cfg)


@pytest.mark.parametrize(
    "data",
    [
        {"keys": [{"id": 1, "secret": "short"}]},
        {"keys": [{"id": 1, "secret": K1}, {"id": 1, "secret": K2}]},
        {"keys": [{"id": 300, "secret": K1}]},
        {"keys": [{"id": 1, "secret": K1}], "signing_key_id": 2},
        {"keys": [{"id": 1, "secret": K1}], "unknown": 1},
    ],
)
def test_bad_tracking_config(data: dict) -> None:
    with pytest.raises(ValidationError):
        TrackingConfig.model_validate(data)


# ----------------------------------------------------------------- links

HTML = """<html><body>
<p><a href="https://shop.example.com/a?x=1&amp;y=2#top" class="btn">Shop</a></p>
<p><a href='http://blog.example.com/post'>Blog</a> <A HREF=https://caps.example.com>caps</A></p>
<p><a href="mailto:help@example.com">Mail</a> <a href="tel:+123">Call</a> <a href="#section">Jump</a>
<a href="/relative">rel</a> <a data-notrack href="https://private.example.com/reset?t=1">Reset</a>
<a name="anchor">no href</a></p>
<p><a href="https://shop.example.com/a?x=1&amp;y=2#top">Shop again</a></p>
</body></html>"""


def test_rewrite_links_keeps_a_mapping_and_skips_non_http() -> None:
    out, links = rewrite_links(HTML, lambda i, url: f"https://t.example.com/t/c/TOKEN{i}")
    assert links == [
        "https://shop.example.com/a?x=1&y=2#top",
        "http://blog.example.com/post",
        "https://caps.example.com",
        "https://shop.example.com/a?x=1&y=2#top",
    ]
    for i in range(4):
        assert re.search(f'(?i:href)="https://t.example.com/t/c/TOKEN{i}"', out)
    assert 'href="mailto:help@example.com"' in out
    assert 'href="tel:+123"' in out
    assert 'href="#section"' in out and 'href="/relative"' in out
    assert 'href="https://private.example.com/reset?t=1"' in out
    assert 'class="btn"' in out and ">Shop</a>" in out
    # everything but the rewritten hrefs is unchanged
    stripped = re.sub(r"""href=("[^"]*"|'[^']*'|[^\s>]+)""", "href", out, flags=re.I)
    assert stripped == re.sub(r"""href=("[^"]*"|'[^']*'|[^\s>]+)""", "href", HTML, flags=re.I)


def test_rewrite_links_utm_does_not_clobber() -> None:
    html = '<a href="https://x.test/p?utm_source=mine&amp;a=1#f">x</a><a href="https://x.test/q">y</a>'
    _, links = rewrite_links(html, lambda i, u: f"https://t/{i}",
                             utm={"utm_source": "engine", "utm_medium": "email"})
    assert links == [
        "https://x.test/p?utm_source=mine&a=1&utm_medium=email#f",
        "https://x.test/q?utm_source=engine&utm_medium=email",
    ]


def test_add_utm_keeps_url_intact() -> None:
    assert add_utm("https://x.test/a?b=%2F&c", {"u": "1"}) == "https://x.test/a?b=%2F&c&u=1"
    assert add_utm("https://x.test/a", {}) == "https://x.test/a"
    assert add_utm("https://x.test/a?u=0", {"u": "1"}) == "https://x.test/a?u=0"


def test_rewrite_links_escapes_and_caps() -> None:
    html = "".join(f'<a href="https://x.test/{i}">{i}</a>' for i in range(10))
    out, links = rewrite_links(html, lambda i, u: f'https://t/"{i}"&<', max_links=3)
    assert len(links) == 3
    assert 'href="https://t/&quot;0&quot;&amp;&lt;"' in out
    assert 'href="https://x.test/3"' in out


def test_malformed_html_does_not_crash() -> None:
    for html in ["<a href=", "<a href='https://x.test", "<<<a>>>", "<a href=\"https://x.test\"", ""]:
        out, links = rewrite_links(html, lambda i, u: "https://t/")
        assert isinstance(out, str) and isinstance(links, list)


def test_open_pixel_before_body_end() -> None:
    pixel = open_pixel_html("https://t.example.com/t/o/abc")
    assert pixel.startswith("<img ") and 'src="https://t.example.com/t/o/abc"' in pixel
    out = insert_open_pixel("<html><body><p>x</p></BODY></html>", "https://t.example.com/t/o/abc")
    assert out == f"<html><body><p>x</p>{pixel}</BODY></html>"
    assert insert_open_pixel("<p>x</p>", "https://t/o") == "<p>x</p>" + open_pixel_html("https://t/o")


def test_track_html_end_to_end() -> None:
    cfg = TrackingConfig.model_validate({"keys": [{"id": 1, "secret": K1}], "utm": {"utm_medium": "email"}})
    k = Keyring.from_config(cfg)
    out, links = track_html(HTML, 4242, k, cfg, "https://t.example.com/", now=NOW)
    assert len(links) == 4
    click_tokens = re.findall(r'(?i:href)="https://t\.example\.com/t/c/([A-Za-z0-9_-]+)"', out)
    assert len(click_tokens) == 4
    for i, tok in enumerate(click_tokens):
        t = k.verify(tok, now=NOW)
        assert (t.kind, t.recipient_id, t.link_index) == (TokenKind.CLICK, 4242, i)
        assert links[t.link_index].startswith(("https://", "http://"))  # the only possible redirect target
    (open_tok,) = re.findall(r'src="https://t\.example\.com/t/o/([A-Za-z0-9_-]+)"', out)
    assert k.verify(open_tok, now=NOW).kind == TokenKind.OPEN
    assert out.index(open_tok) < out.index("</body>")
    u = unsubscribe_url("https://t.example.com", 4242, k, now=NOW)
    assert u.startswith("https://t.example.com/u/")
    assert k.verify(u.rsplit("/", 1)[1], now=NOW).kind == TokenKind.UNSUBSCRIBE
    assert tracking_url("https://t/", TokenKind.OPEN, "x") == "https://t/t/o/x"
