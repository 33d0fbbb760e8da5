"""API keys: random bearer secrets stored only as SHA-256 hashes, with scopes.

A key is 32 random bytes (``ek_`` + base64url), so a plain SHA-256 is the right
hash: there is nothing to brute-force the way there is with a password, and the
lookup stays one indexed equality.

A key may carry an expiry (``expires_at``) and an allowlist of client networks
(``allow``: CIDRs; empty means any address). ``rotate`` issues a new key under the
same name and lets the old one work until its grace ends (its ``expires_at``).
Only one key per name is *current* (neither revoked nor rotated out); revoking a
name revokes every key of it that still works, and a revoked name can be reused.

Verified keys are cached for ``[api] key_cache_ttl`` so a busy SMTP or HTTP client
does not cost a query per message. What the cache may delay, and by how much:

* an expiry (including a rotation's grace) is checked on every use, cached or not;
* revoke, rotate and allowlist changes made through this process's :class:`ApiKeys`
  clear its cache at once;
* the same changes made elsewhere (the CLI, another host) reach this process within
  ``key_cache_ttl``: a revoked key, a rotated-out key whose grace is shorter than the
  TTL, or a narrowed allowlist may be honoured that much longer;
* ``last_used_at`` is written when a key is looked up, so at most once per TTL.
"""

from __future__ import annotations

import builtins
import hashlib
import ipaddress
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from engine.audit import Actor
from engine.audit import record as audit
from engine.authlimit import AuthFailures
from engine.db.pool import acquire
from engine.db.queries import q
from engine.errors import ValidationFailed

SCOPES = ("send", "read", "consent", "metrics", "admin")
KEY_PREFIX = "ek_"
DEFAULT_GRACE = 86400.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: int
    name: str
    scopes: frozenset[str]
    expires_at: datetime | None = None
    allow: tuple[Network, ...] = field(default=())
    """Client networks this key may be used from; empty: any."""

    def allows(self, scope: str) -> bool:
        """``admin`` carries every scope; otherwise the scope must be granted explicitly."""
        return scope in self.scopes or "admin" in self.scopes

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or datetime.now(UTC))

    def permits(self, ip: str | None) -> bool:
        """May this key be used by a client at ``ip``? (An unknown address passes only an empty allowlist.)"""
        if not self.allow:
            return True
        if not ip:
            return False
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.allow)


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def parse_scopes(text: str | list[str]) -> list[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    scopes = sorted({s.strip() for s in items if s.strip()})
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ValidationFailed(f"scopes must be a non-empty subset of {', '.join(SCOPES)}; got {bad or 'none'}", "scopes")
    return scopes


def parse_networks(items: Sequence[str], field_name: str = "allow") -> list[Network]:
    """CIDRs (``10.0.0.0/8``, ``2001:db8::/32``, a bare address) as networks; host bits are dropped."""
    out: list[Network] = []
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValidationFailed(f"{part!r} is not a network like '10.0.0.0/8' or '2001:db8::/32'", field_name) from None
    return sorted(set(out), key=lambda n: (n.version, n.network_address, n.prefixlen))


def check_name(name: str) -> str:
    if not name or len(name) > 100 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValidationFailed("name must be 1-100 letters, digits, '-', '_' or '.'", "name")
    return name


def _new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _nets(value: Any) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(str(n), strict=False) for n in value or ())


def _when(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True, slots=True)
class Rotated:
    key: str
    """The new secret (shown once)."""
    id: int
    old_id: int
    old_valid_until: datetime


class ApiKeys:
    """The ``api_keys`` table, the verification cache, and the failed-authentication limiter.

    ``actor`` on a change records it in the audit log in the same transaction (the CLI
    passes one; code that makes keys for itself, such as tests, may not).
    """

    def __init__(self, pool: asyncpg.Pool, cache_ttl: float = 5.0, failures_per_minute: int = 0) -> None:
        self.pool = pool
        self.cache_ttl = cache_ttl
        self.failures = AuthFailures(failures_per_minute)
        self._cache: dict[bytes, tuple[float, ApiKey]] = {}

    async def create(
        self, name: str, scopes: list[str], *, allow: Sequence[str] = (), expires_at: datetime | None = None,
        actor: Actor | None = None,
    ) -> tuple[str, int]:
        """Create a key; the secret is returned once and never stored."""
        check_name(name)
        scopes = parse_scopes(scopes)
        nets = parse_networks(allow)
        if expires_at is not None and expires_at <= datetime.now(UTC):
            raise ValidationFailed("the expiry is in the past", "expires")
        key = _new_secret()
        async with acquire(self.pool) as conn, conn.transaction():
            try:
                row = await conn.fetchrow(*q(
                    "insert_api_key", name=name, prefix=key[:10], key_hash=hash_key(key), scopes=scopes,
                    allow_cidrs=nets or None, expires_at=expires_at,
                ))
            except asyncpg.UniqueViolationError:
                raise ValidationFailed(f"an API key named {name!r} already exists", "name") from None
            assert row is not None  # INSERT ... RETURNING always returns the row it wrote
            if actor is not None:
                await audit(conn, actor, "apikey.create", name, after={
                    "id": row["id"], "scopes": scopes, "allow": [str(n) for n in nets], "expires_at": _when(expires_at),
                })
        return key, row["id"]

    async def list(self) -> list[asyncpg.Record]:
        async with acquire(self.pool) as conn:
            return await conn.fetch(*q("list_api_keys"))

    async def revoke(self, name: str, *, actor: Actor | None = None) -> bool:
        """Revoke every key of ``name`` that still works (the current one and any in rotation grace)."""
        async with acquire(self.pool) as conn, conn.transaction():
            rows = await conn.fetch(*q("revoke_api_key", name=name))
            if rows and actor is not None:
                await audit(conn, actor, "apikey.revoke", name, before={
                    "keys": [
                        {"id": r["id"], "scopes": list(r["scopes"]), "allow": list(r["allow"] or []),
                         "expires_at": _when(r["expires_at"]), "rotated": r["rotated_at"] is not None}
                        for r in rows
                    ],
                }, after={"revoked": [r["id"] for r in rows]})
        self._cache.clear()
        return bool(rows)

    async def rotate(
        self, name: str, grace: float = DEFAULT_GRACE, *, expires_at: datetime | None = None, actor: Actor | None = None,
    ) -> Rotated:
        """A new key for ``name`` (same scopes and allowlist); the old one works ``grace`` seconds more.

        The old key's expiry becomes the end of the grace (or stays, when earlier). The new key
        gets ``expires_at`` (None: no expiry), not the old one's.
        """
        if grace < 0:
            raise ValidationFailed("the grace period cannot be negative", "grace")
        if expires_at is not None and expires_at <= datetime.now(UTC):
            raise ValidationFailed("the expiry is in the past", "expires")
        key = _new_secret()
        async with acquire(self.pool) as conn, conn.transaction():
            old = await conn.fetchrow(*q("api_key_current", name=name))
            if old is None:
                raise ValidationFailed(f"no current API key named {name!r}", "name")
            until = await conn.fetchval(*q("api_key_rotate_out", id=old["id"], grace=grace))
            row = await conn.fetchrow(*q(
                "insert_api_key", name=name, prefix=key[:10], key_hash=hash_key(key), scopes=list(old["scopes"]),
                allow_cidrs=old["allow_cidrs"], expires_at=expires_at,
            ))
            assert row is not None
            if actor is not None:
                await audit(conn, actor, "apikey.rotate", name,
                            before={"id": old["id"], "expires_at": _when(old["expires_at"])},
                            after={"id": row["id"], "old_id": old["id"], "old_valid_until": _when(until),
                                   "grace_seconds": grace, "expires_at": _when(expires_at)})
        self._cache.clear()
        return Rotated(key, row["id"], old["id"], until)

    async def set_allow(self, name: str, allow: Sequence[str], *, actor: Actor | None = None) -> builtins.list[str]:
        """Replace the allowlist of every working key of ``name`` (empty: any address); returns it."""
        nets = parse_networks(allow)
        async with acquire(self.pool) as conn, conn.transaction():
            before = await conn.fetch(*q("api_key_allow_of", name=name))
            if not before:
                raise ValidationFailed(f"no current API key named {name!r}", "name")
            await conn.fetch(*q("api_key_set_allow", name=name, allow_cidrs=nets or None))
            if actor is not None:
                await audit(conn, actor, "apikey.allow", name,
                            before={"allow": sorted({a for r in before for a in (r["allow"] or [])})},
                            after={"allow": [str(n) for n in nets], "keys": [r["id"] for r in before]})
        self._cache.clear()
        return [str(n) for n in nets]

    async def verify(self, key: str) -> ApiKey | None:
        """The key's identity and scopes, or None for an unknown, revoked or expired key."""
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
            return None if hit[1].expired() else hit[1]
        async with acquire(self.pool) as conn:
            row = await conn.fetchrow(*q("find_api_key", key_hash=digest))
            if row is None:
                self._cache.pop(digest, None)
                return None
            await conn.execute(*q("touch_api_key", id=row["id"]))
        api_key = ApiKey(row["id"], row["name"], frozenset(row["scopes"]), row["expires_at"], _nets(row["allow_cidrs"]))
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now + self.cache_ttl, api_key)
        # Lookup is by the hash of a 256-bit secret: response timing reveals nothing usable about other keys.
        return api_key


def parse_expiry(expires: str | None, ttl: float | None, now: datetime | None = None) -> datetime | None:
    """``--expires 2027-01-01`` (a date or ISO time, UTC unless given) or ``--ttl 90d`` (seconds), or None."""
    if expires and ttl is not None:
        raise ValidationFailed("give --expires or --ttl, not both", "expires")
    if ttl is not None:
        if ttl <= 0:
            raise ValidationFailed("the TTL must be positive", "ttl")
        return (now or datetime.now(UTC)) + timedelta(seconds=ttl)
    if not expires:
        return None
    try:
        t = datetime.fromisoformat(expires)
    except ValueError:
        raise ValidationFailed(f"{expires!r} is not a date like 2027-01-01 or a time like 2027-01-01T12:00:00Z", "expires") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)
