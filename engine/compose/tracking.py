"""Signed tracking tokens, click-link rewriting and the open pixel.

A token names *what* happened to *which outbox row*, never *who*: it carries
an internal recipient id (an integer), a kind (open / click / unsubscribe), a
link index for clicks and the minute it was issued. No address, no name, no
message content: a token that leaks (forwarded mail, proxy logs) reveals
nothing personal, and a click can only redirect to a URL stored with the
message (``links[index]``), so the endpoint is never an open redirect.

Wire format (base64url, no padding)::

    version:u8  key_id:u8  kind:u8  recipient_id:varint  link_index:varint  issued_min:u32be
    + HMAC-SHA256(secret, "engine-tracking\\0" + payload)[:16]

about 38 characters. Keys rotate: sign with the current key, verify with any
key that is not retired or was retired less than ``key_grace_period`` ago.
Errors are distinct so the HTTP layer can answer 404 (forged, truncated,
unknown or dead key) or 410 (genuine but expired).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from functools import partial
from html import escape
from html.parser import HTMLParser
from urllib.parse import parse_qsl, urlencode

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from engine import varint
from engine.configtypes import Duration
from engine.errors import EngineError, NotFound

VERSION = 1
MAC_LEN = 16
_CONTEXT = b"engine-tracking\0"
_HEAD = struct.Struct(">BBB")
_ISSUED = struct.Struct(">I")
_MIN_LEN = _HEAD.size + 1 + 1 + _ISSUED.size + MAC_LEN
_MAX_TOKEN_CHARS = 80
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_CLOCK_SKEW = 300.0


class TokenKind(IntEnum):
    OPEN = 1
    CLICK = 2
    UNSUBSCRIBE = 3


class TokenInvalid(NotFound):
    """Forged, truncated, malformed, or signed by an unknown or dead key (answer 404)."""

    status = 404


class TokenExpired(EngineError):
    """Genuine but older than its kind's time-to-live (answer 410). ``token`` is the decoded token."""

    status = 410

    def __init__(self, message: str, token: Token) -> None:
        super().__init__(message)
        self.token = token


# --------------------------------------------------------------------------- config


class TrackingKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int = Field(ge=0, le=255)
    secret: SecretStr = Field(description="At least 32 characters of randomness (e.g. `openssl rand -hex 32`).")
    retired_at: datetime | None = Field(
        default=None,
        description="When this key stopped signing; it still verifies for key_grace_period after this.",
    )

    @model_validator(mode="after")
    def _strong(self) -> TrackingKey:
        if len(self.secret.get_secret_value()) < 32:
            raise ValueError(f"tracking key {self.id}: secret must be at least 32 characters")
        return self


class TrackingConfig(BaseModel):
    """``[tracking]``: base URL of the tracking endpoints, signing keys, lifetimes, UTM tags."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str | None = Field(default=None, description="Base of /t/o, /t/c, /u links; unset means http.public_url.")
    keys: list[TrackingKey] = Field(default_factory=list)
    signing_key_id: int | None = Field(default=None, description="Unset: the highest id that is not retired.")
    key_grace_period: Duration = 30 * 86400.0
    open_ttl: Duration = 180 * 86400.0
    click_ttl: Duration = 180 * 86400.0
    unsubscribe_ttl: Duration = 400 * 86400.0
    track_opens: bool = True
    track_clicks: bool = True
    utm: dict[str, str] = Field(default_factory=dict, description="Added to tracked links unless already present.")
    max_links: int = Field(default=500, ge=0, description="Links beyond this many are left untracked.")

    @model_validator(mode="after")
    def _keys(self) -> TrackingConfig:
        ids = [k.id for k in self.keys]
        if len(ids) != len(set(ids)):
            raise ValueError("tracking key ids must be unique")
        if self.signing_key_id is not None:
            key = next((k for k in self.keys if k.id == self.signing_key_id), None)
            if key is None:
                raise ValueError(f"signing_key_id {self.signing_key_id} is not among keys")
            if key.retired_at is not None:
                raise ValueError(f"signing key {key.id} is retired")
        return self


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True, slots=True)
class Token:
    kind: TokenKind
    recipient_id: int
    link_index: int
    issued_at: float
    """Unix seconds, minute precision."""
    key_id: int


def _href_to(quoted: str, m: re.Match[str]) -> str:
    """The replacement of one href attribute by the tracked URL (already HTML-escaped)."""
    return f'{m.group(1)}"{quoted}"'


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    got = varint.decode(buf, pos, end)
    if got is None:
        raise TokenInvalid("malformed tracking token")
    return got


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Keyring:
    """Signs with one key, verifies with every key still alive."""

    def __init__(
        self,
        keys: Mapping[int, bytes | str],
        *,
        signing_key_id: int | None = None,
        retired_at: Mapping[int, float] | None = None,
        grace_period: float = 30 * 86400.0,
        ttl: Mapping[TokenKind, float] | None = None,
    ) -> None:
        if not keys:
            raise EngineError("tracking needs at least one key ([[tracking.keys]] with id and secret)")
        self._keys = {int(k): (v.encode() if isinstance(v, str) else bytes(v)) for k, v in keys.items()}
        for k in self._keys:
            if not 0 <= k <= 255:
                raise EngineError(f"tracking key id {k} must be 0-255")
        self._retired = dict(retired_at or {})
        self.grace_period = grace_period
        self.ttl = {
            TokenKind.OPEN: 180 * 86400.0, TokenKind.CLICK: 180 * 86400.0, TokenKind.UNSUBSCRIBE: 400 * 86400.0,
            **(ttl or {}),
        }
        if signing_key_id is None:
            live = [k for k in self._keys if k not in self._retired]
            if not live:
                raise EngineError("every tracking key is retired; add a new key")
            signing_key_id = max(live)
        if signing_key_id not in self._keys or signing_key_id in self._retired:
            raise EngineError(f"tracking signing key {signing_key_id} is missing or retired")
        self.signing_key_id = signing_key_id

    @classmethod
    def from_config(cls, cfg: TrackingConfig) -> Keyring:
        return cls(
            {k.id: k.secret.get_secret_value() for k in cfg.keys},
            signing_key_id=cfg.signing_key_id,
            retired_at={k.id: k.retired_at.timestamp() for k in cfg.keys if k.retired_at is not None},
            grace_period=cfg.key_grace_period,
            ttl={TokenKind.OPEN: cfg.open_ttl, TokenKind.CLICK: cfg.click_ttl, TokenKind.UNSUBSCRIBE: cfg.unsubscribe_ttl},
        )

    def _mac(self, secret: bytes, payload: bytes) -> bytes:
        return hmac.new(secret, _CONTEXT + payload, hashlib.sha256).digest()[:MAC_LEN]

    def sign(self, kind: TokenKind, recipient_id: int, link_index: int = 0, *, now: float | None = None) -> str:
        """A token for one recipient row (and one link, for clicks)."""
        kind = TokenKind(kind)
        if not isinstance(recipient_id, int) or not 0 <= recipient_id < 2**63:
            raise ValueError("recipient_id must be an integer in [0, 2**63)")
        if not isinstance(link_index, int) or not 0 <= link_index < 2**32:
            raise ValueError("link_index must be an integer in [0, 2**32)")
        minutes = int((time.time() if now is None else now) // 60)
        payload = (
            _HEAD.pack(VERSION, self.signing_key_id, kind)
            + varint.encode(recipient_id)
            + varint.encode(link_index)
            + _ISSUED.pack(minutes & 0xFFFFFFFF)
        )
        return _b64encode(payload + self._mac(self._keys[self.signing_key_id], payload))

    def verify(self, token: str, *, now: float | None = None) -> Token:
        """Decode and check a token. Raises TokenInvalid (404) or TokenExpired (410)."""
        now = time.time() if now is None else now
        if not isinstance(token, str) or len(token) > _MAX_TOKEN_CHARS or not _TOKEN_RE.match(token):
            raise TokenInvalid("malformed tracking token")
        try:
            raw = _b64decode(token)
        except (binascii.Error, ValueError):
            raise TokenInvalid("malformed tracking token") from None
        if len(raw) < _MIN_LEN:
            raise TokenInvalid("truncated tracking token")
        payload, mac = raw[:-MAC_LEN], raw[-MAC_LEN:]
        version, key_id, kind = _HEAD.unpack_from(payload)
        if version != VERSION:
            raise TokenInvalid("unknown tracking token version")
        secret = self._keys.get(key_id)
        if secret is None:
            raise TokenInvalid("tracking token signed by an unknown key")
        if not hmac.compare_digest(mac, self._mac(secret, payload)):
            raise TokenInvalid("tracking token signature does not match")
        retired = self._retired.get(key_id)
        if retired is not None and now > retired + self.grace_period:
            raise TokenInvalid("tracking token signed by a key past its grace period")
        recipient_id, pos = _read_varint(payload, _HEAD.size, len(payload))
        link_index, pos = _read_varint(payload, pos, len(payload))
        if len(payload) - pos != _ISSUED.size:
            raise TokenInvalid("malformed tracking token")
        (minutes,) = _ISSUED.unpack_from(payload, pos)
        try:
            kind = TokenKind(kind)
        except ValueError:
            raise TokenInvalid("unknown tracking token kind") from None
        issued = minutes * 60.0
        decoded = Token(kind=kind, recipient_id=recipient_id, link_index=link_index, issued_at=issued, key_id=key_id)
        if issued > now + _CLOCK_SKEW:
            raise TokenInvalid("tracking token issued in the future")
        if now > issued + self.ttl[kind]:
            raise TokenExpired("tracking link has expired", decoded)
        return decoded


# --------------------------------------------------------------------------- URLs


def tracking_url(base_url: str, kind: TokenKind, token: str) -> str:
    """``/t/o/{token}`` (open), ``/t/c/{token}`` (click), ``/u/{token}`` (unsubscribe)."""
    path = {TokenKind.OPEN: "t/o", TokenKind.CLICK: "t/c", TokenKind.UNSUBSCRIBE: "u"}[TokenKind(kind)]
    return f"{base_url.rstrip('/')}/{path}/{token}"


def add_utm(url: str, params: Mapping[str, str]) -> str:
    """Append query parameters the URL does not already have; the rest of the URL is kept as is."""
    if not params:
        return url
    base, hash_, fragment = url.partition("#")
    path, q, query = base.partition("?")
    existing = {k for k, _ in parse_qsl(query, keep_blank_values=True)}
    extra = [(k, v) for k, v in params.items() if k not in existing]
    if not extra:
        return url
    query = (query + "&" if query else "") + urlencode(extra)
    return f"{path}?{query}{hash_}{fragment}"


_HREF_RE = re.compile(r"""(\shref\s*=\s*)("[^"]*"|'[^']*'|[^\s"'>]+)""", re.IGNORECASE)


class _LinkFinder(HTMLParser):
    """Collect ``<a>`` start tags with their exact source offsets."""

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self.source = source
        self.line_starts = [0]
        for m in re.finditer("\n", source):
            self.line_starts.append(m.end())
        self.anchors: list[tuple[int, str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag != "a":
            return
        raw = self.get_starttag_text() or ""
        line, col = self.getpos()
        start = self.line_starts[line - 1] + col
        if self.source[start : start + len(raw)] == raw:  # only rewrite what we located exactly
            self.anchors.append((start, raw, dict(attrs)))

    handle_startendtag = handle_starttag


def rewrite_links(
    html: str,
    make_url: Callable[[int, str], str],
    *,
    utm: Mapping[str, str] | None = None,
    max_links: int = 500,
) -> tuple[str, list[str]]:
    """Point every ``<a href="http(s)://...">`` at ``make_url(index, url)``.

    Returns the new HTML and ``links`` (index -> destination, UTM included),
    which must be stored with the message: the click endpoint redirects only
    to ``links[token.link_index]``. mailto:, tel:, anchors, relative URLs and
    links marked ``data-notrack`` are left alone.
    """
    finder = _LinkFinder(html)
    finder.feed(html)
    finder.close()
    out: list[str] = []
    links: list[str] = []
    pos = 0
    for start, raw, attrs in finder.anchors:
        href = (attrs.get("href") or "").strip()
        if "data-notrack" in attrs or not re.match(r"^https?://", href, re.IGNORECASE):
            continue
        if len(links) >= max_links or start < pos:
            continue
        dest = add_utm(href, utm or {})
        new_url = make_url(len(links), dest)
        quoted = escape(new_url, quote=True)
        new_tag, n = _HREF_RE.subn(partial(_href_to, quoted), raw, count=1)
        if n != 1:
            continue
        links.append(dest)
        out.append(html[pos:start])
        out.append(new_tag)
        pos = start + len(raw)
    out.append(html[pos:])
    return "".join(out), links


def open_pixel_html(url: str) -> str:
    """A 1x1 image tag for open tracking."""
    return (
        f'<img src="{escape(url, quote=True)}" width="1" height="1" alt="" '
        'style="display:block;width:1px;height:1px;border:0;margin:0;padding:0;">'
    )


_BODY_END_RE = re.compile(r"</body\s*>", re.IGNORECASE)


def insert_open_pixel(html: str, url: str) -> str:
    """Insert the pixel before the last ``</body>``, or at the end when there is none."""
    pixel = open_pixel_html(url)
    matches = list(_BODY_END_RE.finditer(html))
    if not matches:
        return html + pixel
    at = matches[-1].start()
    return html[:at] + pixel + html[at:]


def track_html(
    html: str, recipient_id: int, keyring: Keyring, cfg: TrackingConfig, base_url: str, *, now: float | None = None
) -> tuple[str, list[str]]:
    """Click rewriting and open pixel for one recipient, as configured. Returns (html, links)."""
    links: list[str] = []
    if cfg.track_clicks:
        def make(index: int, _url: str) -> str:
            return tracking_url(base_url, TokenKind.CLICK, keyring.sign(TokenKind.CLICK, recipient_id, index, now=now))

        html, links = rewrite_links(html, make, utm=cfg.utm, max_links=cfg.max_links)
    if cfg.track_opens:
        html = insert_open_pixel(
            html, tracking_url(base_url, TokenKind.OPEN, keyring.sign(TokenKind.OPEN, recipient_id, now=now))
        )
    return html, links


def unsubscribe_url(base_url: str, recipient_id: int, keyring: Keyring, *, now: float | None = None) -> str:
    """The RFC 8058 one-click target for List-Unsubscribe."""
    return tracking_url(base_url, TokenKind.UNSUBSCRIBE, keyring.sign(TokenKind.UNSUBSCRIBE, recipient_id, now=now))
