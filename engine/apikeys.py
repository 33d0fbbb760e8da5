"""API keys: random bearer secrets stored only as SHA-256 hashes, with scopes.

A key is 32 random bytes (``ek_`` + base64url), so a plain SHA-256 is the right
hash: there is nothing to brute-force the way there is with a password, and the
lookup stays one indexed equality. Verified keys are cached for a few seconds
(``[api] key_cache_ttl``) so a busy SMTP or HTTP client does not cost a query
per message; revocation takes effect within that TTL.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

import asyncpg

from engine.db.pool import acquire
from engine.db.queries import q
from engine.errors import ValidationFailed

SCOPES = ("send", "read", "consent", "metrics", "admin")
KEY_PREFIX = "ek_"


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: int
    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        """``admin`` carries every scope; otherwise the scope must be granted explicitly."""
        return scope in self.scopes or "admin" in self.scopes


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def parse_scopes(text: str | list[str]) -> list[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    scopes = sorted({s.strip() for s in items if s.strip()})
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ValidationFailed(f"scopes must be a non-empty subset of {', '.join(SCOPES)}; got {bad or 'none'}", "scopes")
    return scopes


class ApiKeys:
    def __init__(self, pool: asyncpg.Pool, cache_ttl: float = 5.0) -> None:
        self.pool = pool
        self.cache_ttl = cache_ttl
        self._cache: dict[bytes, tuple[float, ApiKey]] = {}

    async def create(self, name: str, scopes: list[str]) -> tuple[str, int]:
        """Create a key; the secret is returned once and never stored."""
        if not name or len(name) > 100 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValidationFailed("name must be 1-100 letters, digits, '-', '_' or '.'", "name")
        scopes = parse_scopes(scopes)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        async with acquire(self.pool) as conn:
            try:
                row = await conn.fetchrow(
                    *q("insert_api_key", name=name, prefix=key[:10], key_hash=hash_key(key), scopes=scopes)
                )
            except asyncpg.UniqueViolationError:
                raise ValidationFailed(f"an API key named {name!r} already exists", "name") from None
        assert row is not None  # INSERT ... RETURNING always returns the row it wrote
        return key, row["id"]

    async def list(self) -> list[asyncpg.Record]:
        async with acquire(self.pool) as conn:
            return await conn.fetch(*q("list_api_keys"))

    async def revoke(self, name: str) -> bool:
        async with acquire(self.pool) as conn:
            row = await conn.fetchrow(*q("revoke_api_key", name=name))
        self._cache.clear()
        return row is not None

    async def verify(self, key: str) -> ApiKey | None:
        """The key's identity and scopes, or None for an unknown or revoked key."""
        if not key or len(key) > 200:
            return None
        return await self.verify_digest(hash_key(key))

    async def verify_digest(self, digest: bytes) -> ApiKey | None:
        """:meth:`verify` by the key's hash: how a session re-checks a key it proved earlier.

        The SMTP relay keeps only the hash of the key a client authenticated with and
        re-checks it at every MAIL FROM, so a key revoked mid-session stops working
        within ``cache_ttl`` (and the cache keeps that check free of database round trips).
        """
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        async with acquire(self.pool) as conn:
            row = await conn.fetchrow(*q("find_api_key", key_hash=digest))
            if row is None:
                return None
            await conn.execute(*q("touch_api_key", id=row["id"]))
        api_key = ApiKey(row["id"], row["name"], frozenset(row["scopes"]))
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now + self.cache_ttl, api_key)
        # Lookup is by the hash of a 256-bit secret: response timing reveals nothing usable about other keys.
        return api_key
