"""VERP return paths: ``b-<token>@<bounce_domain>`` names the recipient row a bounce is about.

Why a signed token: an asynchronous bounce or a complaint must map back to the
exact outbox row without guessing from the (often rewritten, forwarded or
missing) recipient address in the report, and nobody outside may fabricate a
bounce that suppresses someone else's address. The token carries only the
internal recipient id (no address: the return path is visible to every hop)
and a truncated HMAC.

Wire format, then RFC 4648 base32, lower-cased, no padding (local parts are
case-insensitive in practice, so the alphabet must survive case folding)::

    key_id:u8  recipient_id:varint  HMAC-SHA256(secret, "engine-verp\\0" + key_id + recipient_id)[:10]

The same token signs the Message-ID of a personalized message
(``<{message uuid}.{token}@{sending domain}>``, :mod:`engine.compose.pipeline`), so a
feedback-loop report that comes back without the envelope still names its row
with proof (:meth:`Verp.parse_token`).

A recipient id below 2**28 gives a 24-character token (``b-`` + 24 + ``@domain``,
well under the 64-octet local-part limit). 80 bits of tag make a forgery a
2**-80 guess per attempt; the listener logs and ignores forgeries.

Keys rotate like tracking keys: sign with the current key, verify with any key
that is not retired or retired less than ``key_grace_period`` ago (bounces
arrive within days, complaints within weeks: the default grace is 90 days).
With no ``[[feedback.keys]]`` the ``[[tracking.keys]]`` secrets are used; the
distinct HMAC context keeps the two token kinds from ever verifying as each other.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from engine import varint
from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.config import Settings

PREFIX = "b-"
MAC_LEN = 10
_CONTEXT = b"engine-verp\0"
_MAX_TOKEN_CHARS = 40
_TOKEN_RE = re.compile(r"^[a-z2-7]{16,40}$")
# A VERP-looking address anywhere in text (report headers, an ARF's Original-Mail-From...).
_FIND_RE = re.compile(r"(?i)\bb-[a-z2-7]{16,40}@[a-z0-9.-]{1,253}")


def _read_varint(buf: bytes) -> int | None:
    """The varint filling ``buf`` exactly, else None (trailing bytes or overlong = malformed)."""
    got = varint.decode(buf)
    return got[0] if got is not None and got[1] == len(buf) else None


class Verp:
    """Makes and checks VERP return paths for one bounce domain (plus domains it also answers for)."""

    def __init__(
        self,
        domain: str,
        keys: Mapping[int, bytes | str],
        *,
        signing_key_id: int | None = None,
        retired_at: Mapping[int, float] | None = None,
        grace_period: float = 90 * 86400.0,
        also_domains: Iterable[str] = (),
    ) -> None:
        if not keys:
            raise ConfigError("VERP needs a signing key: add [[feedback.keys]] (or [[tracking.keys]]) with id and secret")
        self.domain = domain.strip().rstrip(".").lower()
        self.domains = frozenset([self.domain, *(d.strip().rstrip(".").lower() for d in also_domains)])
        self._keys = {int(k): (v.encode() if isinstance(v, str) else bytes(v)) for k, v in keys.items()}
        if any(not 0 <= k <= 255 for k in self._keys):
            raise ConfigError("VERP key ids must be 0-255")
        self._retired = dict(retired_at or {})
        self.grace_period = grace_period
        if signing_key_id is None:
            live = [k for k in self._keys if k not in self._retired]
            if not live:
                raise ConfigError("every VERP key is retired; add a new [[feedback.keys]] entry")
            signing_key_id = max(live)
        if signing_key_id not in self._keys or signing_key_id in self._retired:
            raise ConfigError(f"VERP signing key {signing_key_id} is missing or retired")
        self.signing_key_id = signing_key_id

    @classmethod
    def from_settings(cls, settings: Settings) -> Verp | None:
        """The configured VERP, or None when ``[feedback] bounce_domain`` is unset (VERP off)."""
        fb = settings.feedback
        if fb.bounce_domain is None:
            return None
        if fb.keys:
            keys, signing, grace = fb.keys, fb.signing_key_id, fb.key_grace_period
        else:
            keys, signing, grace = settings.tracking.keys, settings.tracking.signing_key_id, fb.key_grace_period
        return cls(
            fb.bounce_domain,
            {k.id: k.secret.get_secret_value() for k in keys},
            signing_key_id=signing,
            retired_at={k.id: k.retired_at.timestamp() for k in keys if k.retired_at is not None},
            grace_period=grace,
            also_domains=fb.inbound.accept_domains,
        )

    def _mac(self, secret: bytes, payload: bytes) -> bytes:
        return hmac.new(secret, _CONTEXT + payload, hashlib.sha256).digest()[:MAC_LEN]

    def token(self, recipient_id: int) -> str:
        if not isinstance(recipient_id, int) or isinstance(recipient_id, bool) or not 0 <= recipient_id < 2**63:
            raise ValueError("recipient_id must be an integer in [0, 2**63)")
        payload = bytes([self.signing_key_id]) + varint.encode(recipient_id)
        raw = payload + self._mac(self._keys[self.signing_key_id], payload)
        return base64.b32encode(raw).decode("ascii").rstrip("=").lower()

    def return_path(self, recipient_id: int) -> str:
        """``b-<token>@<bounce_domain>``: the envelope sender (MAIL FROM) for this recipient row."""
        return f"{PREFIX}{self.token(recipient_id)}@{self.domain}"

    def is_ours(self, address: str) -> bool:
        """Does ``address`` look like one of our VERP addresses (whether or not its tag is genuine)?"""
        local, domain = _split(address)
        return local is not None and domain in self.domains and local.startswith(PREFIX)

    def parse(self, address: str, *, now: float | None = None) -> int | None:
        """The recipient id of a genuine VERP address; None for anything else. Never raises."""
        try:
            return self._parse(address, now)
        except Exception:  # noqa: BLE001 - the contract: hostile input gives None
            return None

    def parse_token(self, token: str, *, now: float | None = None) -> int | None:
        """The recipient id of a genuine bare token (as in our Message-IDs); None for anything else. Never raises."""
        try:
            return self._verify(token.lower(), now) if isinstance(token, str) else None
        except Exception:  # noqa: BLE001 - the contract: hostile input gives None
            return None

    def _parse(self, address: str, now: float | None) -> int | None:
        local, domain = _split(address)
        if local is None or domain not in self.domains or not local.startswith(PREFIX):
            return None
        return self._verify(local[len(PREFIX):], now)

    def _verify(self, tok: str, now: float | None) -> int | None:
        if len(tok) > _MAX_TOKEN_CHARS or not _TOKEN_RE.match(tok):
            return None
        try:
            raw = base64.b32decode(tok.upper() + "=" * (-len(tok) % 8))
        except (binascii.Error, ValueError):
            return None
        if len(raw) < 2 + MAC_LEN or base64.b32encode(raw).decode("ascii").rstrip("=").lower() != tok:
            return None  # too short, or a non-canonical spelling (stray bits in the last character)
        payload, mac = raw[:-MAC_LEN], raw[-MAC_LEN:]
        key_id = payload[0]
        secret = self._keys.get(key_id)
        if secret is None or not hmac.compare_digest(mac, self._mac(secret, payload)):
            return None
        retired = self._retired.get(key_id)
        if retired is not None and (time.time() if now is None else now) > retired + self.grace_period:
            return None
        return _read_varint(payload[1:])

    def find(self, texts: Iterable[str | None]) -> tuple[list[int], int]:
        """VERP addresses of ours inside free text: (genuine recipient ids, number of forged ones)."""
        ids: list[int] = []
        forged = 0
        for text in texts:
            if not text:
                continue
            for m in _FIND_RE.finditer(text[:20000]):
                addr = m.group(0).rstrip(".")
                if not self.is_ours(addr):
                    continue
                rid = self.parse(addr)
                if rid is None:
                    forged += 1
                elif rid not in ids:
                    ids.append(rid)
        return ids, forged


def _split(address: str) -> tuple[str | None, str]:
    if not isinstance(address, str) or len(address) > 512:
        return None, ""
    a = address.strip().strip("<>").strip()
    local, at, domain = a.rpartition("@")
    if not at or not local:
        return None, ""
    return local.lower(), domain.rstrip(".").lower()
