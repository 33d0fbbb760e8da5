"""Dashboard logins: a sealed session cookie, a CSRF token per session, and the same-origin check.

Why a sealed cookie and no session table: the engine already has one secret every host shares
(:func:`engine.webhooks.secrets.engine_key`), so a cookie sealed with a key derived from it
(Fernet: AES-CBC plus HMAC-SHA256) can be checked by any engine process without a database
write per login. The cookie holds a random session id, the SHA-256 of the API key the person
logged in with (never the key itself; the hash is what ``api_keys`` stores, and it is encrypted
here) and an expiry. Every request re-checks that hash against ``api_keys``
(:meth:`engine.apikeys.ApiKeys.verify_digest`), so revoking the key ends its sessions within
``[api] key_cache_ttl`` and a scope change applies at once.

Logout deletes the cookie and remembers the session id in this process until it would have
expired, so a copy of the cookie replayed to the same engine is refused; another engine process
(several HTTP hosts) still accepts it until ``[dashboard] session_lifetime`` runs out.

CSRF: every form that changes something carries ``HMAC(csrf key, session id)`` in a hidden field,
checked on POST in constant time; the cookie is ``SameSite=Strict`` and POSTs must also come
from this origin (``Origin``, else ``Referer``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography.fernet import Fernet, InvalidToken

from engine.apikeys import hash_key

COOKIE = "engine_dashboard"
COOKIE_PATH = "/dashboard"
_SESSION_INFO = b"engine dashboard session v1"
_CSRF_INFO = b"engine dashboard csrf v1"
_MAX_COOKIE = 2048


def derive(secret: bytes, info: bytes) -> bytes:
    """A 32-byte key for one purpose from the engine's secret key (HMAC-SHA256 as the KDF)."""
    return hmac.new(secret, info, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class Session:
    sid: str
    key_digest: bytes
    """SHA-256 of the API key that logged in (what ``api_keys.key_hash`` holds)."""
    expires: float
    """Unix time."""


class Sessions:
    """Issues and opens session cookies; one per HTTP process."""

    def __init__(self, secret: bytes, lifetime: float, clock: Callable[[], float] = time.time) -> None:
        self._fernet = Fernet(base64.urlsafe_b64encode(derive(secret, _SESSION_INFO)))
        self._csrf_key = derive(secret, _CSRF_INFO)
        self.lifetime = lifetime
        self._clock = clock
        self._ended: dict[str, float] = {}

    def issue(self, api_key: str) -> tuple[str, Session]:
        """A new session for a verified key: (cookie value, session)."""
        now = self._clock()
        session = Session(secrets.token_urlsafe(18), hash_key(api_key), now + self.lifetime)
        body = json.dumps({"sid": session.sid, "kh": base64.b64encode(session.key_digest).decode(), "exp": session.expires})
        return self._fernet.encrypt_at_time(body.encode(), int(now)).decode(), session

    def open(self, cookie: str | None) -> Session | None:
        """The session a cookie carries, or None when it is absent, forged, expired or logged out."""
        if not cookie or len(cookie) > _MAX_COOKIE:
            return None
        now = self._clock()
        try:
            body = self._fernet.decrypt_at_time(cookie.encode(), int(self.lifetime) + 60, int(now))
            data = json.loads(body)
            session = Session(str(data["sid"]), base64.b64decode(data["kh"]), float(data["exp"]))
        except (InvalidToken, ValueError, KeyError, TypeError):
            return None
        if session.expires <= now or session.sid in self._ended:
            return None
        return session

    def end(self, session: Session) -> None:
        """Logout: this process refuses the session from now on."""
        now = self._clock()
        self._ended = {sid: exp for sid, exp in self._ended.items() if exp > now}
        self._ended[session.sid] = session.expires

    def csrf_token(self, session: Session) -> str:
        return hmac.new(self._csrf_key, session.sid.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_token(session), str(token))


def same_origin(headers: Mapping[str, str], public_url: str) -> bool:
    """Whether a state-changing request comes from a page of this engine.

    ``Origin`` (every browser sends it on a form POST), else ``Referer``; its host[:port] must be
    the ``Host`` the request was sent to, or the origin of ``[http] public_url`` (a TLS proxy in
    front). A request with neither header is refused: browsers always send one of them here.
    """
    source = headers.get("origin") or headers.get("referer")
    if not source or source == "null":
        return False
    parts = urlsplit(source)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    host = headers.get("host", "")
    if parts.netloc.lower() == host.lower():
        return True
    public = urlsplit(public_url)
    return (parts.scheme, parts.netloc.lower()) == (public.scheme, public.netloc.lower())


def safe_next(target: str | None) -> str:
    """Where to go after login: a dashboard path only (never another site: ``//evil``, ``/\\evil``, a scheme)."""
    if not target or not target.startswith(COOKIE_PATH) or "//" in target or "\\" in target or len(target) > 500:
        return COOKIE_PATH
    rest = target[len(COOKIE_PATH):]
    if rest and rest[0] not in "/?":
        return COOKIE_PATH
    return target
