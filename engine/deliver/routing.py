"""MX routing: which hosts, at which addresses and ports, receive mail for a domain.

The delivery loop asks :meth:`Router.resolve` for every destination domain, so
it must be cheap when repeated (answers are cached for their DNS TTL, negative
answers for a short capped time, and concurrent lookups of the same record
share one query) and its failures must say whether retrying can help: a
domain that does not exist or refuses mail (null MX, RFC 7505) is a permanent
failure that bounces now, while SERVFAIL or a timeout only defers.

Order of decisions for a domain:

1. an address literal (``[192.0.2.1]``) is its own route;
2. a static route from ``[routing] static`` (exact domain, then ``.suffix``
   for subdomains, then ``*``) wins over DNS, like Postfix's transport map;
3. MX records, sorted by preference and shuffled within equal preference
   (RFC 5321 5.1), each host resolved to its IPv4 then IPv6 addresses;
4. no MX at all: the domain's own A/AAAA (implicit MX, RFC 5321 5.1).

A :class:`Route` carries a ``site`` key naming the receiving site (the set of
MX hosts), so that every domain hosted by the same provider shares one
connection pool and one set of shaping limits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import random
import re
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import idna
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from engine.addresses import literal_is_public
from engine.configtypes import Duration
from engine.deliver.hop import Hop
from engine.errors import EngineError

NULL_MX_REASON = "domain does not accept mail (null MX, RFC 7505)"

_ASCII_DOMAIN_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*$")
_MX, _A, _AAAA = dns.rdatatype.MX, dns.rdatatype.A, dns.rdatatype.AAAA


# --------------------------------------------------------------------------- errors and results


class RouteError(EngineError):
    """No route to a domain. ``permanent`` tells the caller to bounce (True) or defer (False)."""

    def __init__(self, reason: str, *, permanent: bool, domain: str = "") -> None:
        super().__init__(f"{domain}: {reason}" if domain else reason)
        self.reason = reason
        self.permanent = permanent
        self.domain = domain


@dataclass(frozen=True, slots=True)
class Route:
    """Where mail for ``domain`` goes: ``hops`` in the order to try them."""

    domain: str  # ASCII (IDNA-encoded), lower case
    hops: tuple[Hop, ...]
    mx_hosts: tuple[str, ...]  # in the order tried
    site: str  # shared by all domains served by the same MX hosts
    kind: Literal["mx", "implicit", "static", "literal"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- config


def _parse_target(value: Any) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address -> (host, port)."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        host, port = value
    elif isinstance(value, str):
        text = value.strip()
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", text) or re.fullmatch(r"([^:\[\]\s]+)(?::(\d+))?", text)
        if m:
            host, port = m.group(1), m.group(2)
        elif _is_ip(text):
            host, port = text, None
        else:
            raise ValueError(f"expected 'host:port' (IPv6 as '[::1]:25'), got {value!r}")
    else:
        raise ValueError(f"expected 'host:port', got {value!r}")
    if port is not None:
        port = int(port)
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is out of range 1-65535")
    host = str(host)
    if not _is_ip(host):
        host = _domain_or_value_error(host)
    return host, port


def _parse_nameserver(value: Any) -> tuple[str, int]:
    host, port = _parse_target(value)
    if not _is_ip(host):
        raise ValueError(f"a nameserver must be an IP address (with an optional port), got {value!r}")
    return host, 53 if port is None else port


StaticTarget = Annotated[tuple[str, int | None], BeforeValidator(_parse_target)]
Nameserver = Annotated[tuple[str, int], BeforeValidator(_parse_nameserver)]


class RoutingConfig(BaseModel):
    """The ``[routing]`` section of the config (composed into engine.config.Settings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    static: dict[str, StaticTarget] = Field(
        default_factory=dict,
        description="domain, '.suffix' (subdomains) or '*' -> 'host:port'; wins over DNS.",
    )
    nameservers: list[Nameserver] = Field(
        default_factory=list, description="'ip[:port]' DNS servers to ask; empty means the system resolver."
    )
    timeout: Duration = Field(default=5.0, description="Give up on one DNS lookup after this long (all tries).")
    attempt_timeout: Duration = Field(default=2.0, description="Wait this long for one UDP answer before retrying.")
    cache_size: int = Field(default=10000, ge=0, description="DNS answers kept in memory (0 disables the cache).")
    max_ttl: Duration = Field(default=86400.0, description="Cap on how long a positive answer is cached.")
    negative_ttl: Duration = Field(default=60.0, description="Cap on how long NXDOMAIN/no-data is cached.")
    error_ttl: Duration = Field(default=5.0, description="How long SERVFAIL/timeouts are remembered (0: never).")
    mx_port: int = Field(default=25, ge=1, le=65535, description="Port for MX hosts and static routes without one.")
    ipv6: bool = Field(default=True, description="Also look up AAAA and try IPv6 addresses (after IPv4).")
    max_mx_hosts: int = Field(default=10, ge=1, le=100, description="Use at most this many MX hosts per domain.")
    allow_address_literals: bool = Field(
        default=False,
        description=(
            "Accept recipients like user@[192.0.2.1] (SMTP RCPT and REST) and deliver straight to that IP, "
            "bypassing MX and static routes; loopback/private/link-local literals are never delivered to."
        ),
    )

    @field_validator("static", mode="before")
    @classmethod
    def _static_keys(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        out: dict[str, Any] = {}
        for key, target in v.items():
            if not isinstance(key, str):
                raise ValueError(f"route key {key!r} must be a string")
            if key == "*":
                norm = "*"
            elif key.startswith("."):
                norm = "." + _domain_or_value_error(key[1:])
            else:
                norm = _domain_or_value_error(key)
            if norm in out:
                raise ValueError(f"route {key!r} is given twice")
            out[norm] = target
        return out


# --------------------------------------------------------------------------- names


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def normalize_domain(domain: str) -> str:
    """Lower-case ASCII form of a domain (unicode is IDNA-encoded); RouteError if it is not a domain."""
    if not isinstance(domain, str):
        raise RouteError("domain must be a string", permanent=True)
    text = domain.strip()
    text = text[:-1] if text.endswith(".") else text
    if not text:
        raise RouteError("empty domain", permanent=True, domain=domain)
    if not text.isascii():
        try:
            text = idna.encode(text, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise RouteError(f"not a valid internationalized domain ({exc})", permanent=True, domain=domain) from None
    text = text.lower()
    if not _ASCII_DOMAIN_RE.match(text):
        raise RouteError("not a valid domain name", permanent=True, domain=domain)
    try:
        dns.name.from_text(text)
    except dns.exception.DNSException as exc:
        raise RouteError(f"not a valid domain name ({exc})", permanent=True, domain=domain) from None
    return text


def _domain_or_value_error(text: str) -> str:
    """normalize_domain for pydantic validators, which report ValueError with the key."""
    try:
        return normalize_domain(text)
    except RouteError as exc:
        raise ValueError(f"{text!r}: {exc.reason}") from None


def _address_literal(domain: str) -> str | None:
    """The IP of ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 4.1.3), else None."""
    text = domain.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
        ok = _is_ip(inner) and ":" in inner
    else:
        ok = _is_ip(inner) and ":" not in inner
    if not ok:
        raise RouteError("not a valid address literal", permanent=True, domain=domain)
    return str(ipaddress.ip_address(inner))


# --------------------------------------------------------------------------- cache


@dataclass(frozen=True, slots=True)
class _Answer:
    """One cached DNS outcome for (name, type); lookups never raise, they return this."""

    status: Literal["ok", "nxdomain", "nodata", "error"]
    values: tuple[Any, ...] = ()  # MX: (preference, host) with host "" for "."; A/AAAA: addresses
    reason: str = ""
    ttl: float = 0.0


class Router:
    """Resolves domains to ordered delivery hops. One per process; safe for concurrent use in one loop."""

    def __init__(self, config: RoutingConfig | None = None, *, rng: random.Random | None = None) -> None:
        self.config = config or RoutingConfig()
        self._rng = rng or random.Random()
        self._cache: OrderedDict[tuple[str, dns.rdatatype.RdataType], tuple[float, _Answer]] = OrderedDict()
        self._inflight: dict[tuple[str, dns.rdatatype.RdataType], asyncio.Future[_Answer]] = {}
        self.stats = {"queries": 0, "cache_hits": 0, "shared": 0}
        self._resolver, self._no_resolver_reason = self._make_resolver()

    def _make_resolver(self) -> tuple[dns.asyncresolver.Resolver | None, str]:
        cfg = self.config
        try:
            if cfg.nameservers:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in cfg.nameservers]
            else:
                resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration as exc:
            return None, f"no DNS nameservers configured (system resolver: {exc}); set [routing] nameservers"
        resolver.timeout = min(cfg.attempt_timeout, cfg.timeout)
        resolver.lifetime = cfg.timeout
        resolver.cache = None  # we cache ourselves, with negative caps and single-flight
        resolver.use_edns(0, 0, 1232)  # big MX sets fit in UDP; TC still falls back to TCP
        return resolver, ""

    # ----- public -----------------------------------------------------------

    async def resolve(self, domain: str) -> Route:
        """The route for ``domain``; raises :class:`RouteError` (``permanent`` says bounce or defer)."""
        literal = _address_literal(domain)
        if literal is not None:
            if not self.config.allow_address_literals:
                raise RouteError(
                    "address literals are not accepted ([routing] allow_address_literals = false)",
                    permanent=True,
                    domain=domain,
                )
            if not literal_is_public(domain):
                raise RouteError(
                    f"address literal [{literal}] is not a public address (loopback, private, link-local "
                    "or reserved): not delivering there",
                    permanent=True,
                    domain=domain,
                )
            hop = Hop(literal, literal, self.config.mx_port, 0)
            return Route(domain.strip().lower(), (hop,), (literal,), f"[{literal}]", "literal")
        name = normalize_domain(domain)
        try:
            static = self._static_for(name)
            if static is not None:
                return await self._static_route(name, *static)
            return await self._mx_route(name)
        except RouteError as exc:
            if not exc.domain:
                raise RouteError(exc.reason, permanent=exc.permanent, domain=name) from None
            raise

    def clear_cache(self) -> None:
        self._cache.clear()

    # ----- static routes ----------------------------------------------------

    def _static_for(self, name: str) -> tuple[str, int | None] | None:
        static = self.config.static
        if not static:
            return None
        if name in static:
            return static[name]
        labels = name.split(".")
        for i in range(1, len(labels)):
            target = static.get("." + ".".join(labels[i:]))
            if target is not None:
                return target
        return static.get("*")

    async def _static_route(self, name: str, host: str, port: int | None) -> Route:
        port = self.config.mx_port if port is None else port
        site = f"static:{host}:{port}"
        if _is_ip(host):
            return Route(name, (Hop(host, host, port, 0),), (host,), site, "static")
        addresses, errors = await self._addresses(host)
        if not addresses:
            if errors:
                raise RouteError(f"static route host {host}: {errors[0]}", permanent=False)
            raise RouteError(f"static route host {host} has no A/AAAA address", permanent=True)
        hops = tuple(Hop(host, addr, port, 0) for addr in addresses)
        return Route(name, hops, (host,), site, "static")

    # ----- DNS routes -------------------------------------------------------

    async def _mx_route(self, name: str) -> Route:
        mx = await self._lookup(name, _MX)
        if mx.status == "nxdomain":
            raise RouteError("domain does not exist (NXDOMAIN)", permanent=True)
        if mx.status == "error":
            raise RouteError(mx.reason, permanent=False)
        if mx.status == "nodata":
            return await self._implicit_route(name)
        records = [(pref, host) for pref, host in mx.values if host]
        if not records:
            raise RouteError(NULL_MX_REASON, permanent=True)
        hosts = self._order(records)[: self.config.max_mx_hosts]
        results = await asyncio.gather(*(self._addresses(host) for _, host in hosts))
        hops: list[Hop] = []
        errors: list[str] = []
        for (pref, host), (addresses, errs) in zip(hosts, results):
            hops.extend(Hop(host, addr, self.config.mx_port, pref) for addr in addresses)
            errors.extend(errs)
        mx_hosts = tuple(host for _, host in hosts)
        if not hops:
            listed = ", ".join(mx_hosts)
            if errors:
                raise RouteError(f"cannot resolve any MX host ({listed}): {errors[0]}", permanent=False)
            raise RouteError(f"none of the MX hosts ({listed}) has an A/AAAA address", permanent=True)
        return Route(name, tuple(hops), mx_hosts, ",".join(sorted(set(mx_hosts))), "mx")

    async def _implicit_route(self, name: str) -> Route:
        addresses, errors = await self._addresses(name)
        if not addresses:
            if errors:
                raise RouteError(f"no MX; looking up its A/AAAA failed: {errors[0]}", permanent=False)
            raise RouteError("domain has no MX and no A/AAAA records", permanent=True)
        hops = tuple(Hop(name, addr, self.config.mx_port, 0) for addr in addresses)
        return Route(name, hops, (name,), name, "implicit")

    def _order(self, records: Iterable[tuple[int, str]]) -> list[tuple[int, str]]:
        """By preference; equal preferences in random order to spread load (RFC 5321 5.1)."""
        by_pref: dict[int, list[str]] = {}
        for pref, host in records:
            group = by_pref.setdefault(pref, [])
            if host not in group:
                group.append(host)
        ordered: list[tuple[int, str]] = []
        for pref in sorted(by_pref):
            group = by_pref[pref]
            self._rng.shuffle(group)
            ordered.extend((pref, host) for host in group)
        return ordered

    async def _addresses(self, host: str) -> tuple[list[str], list[str]]:
        """IPv4 then IPv6 addresses of ``host`` and the temporary errors met on the way."""
        types = (_A, _AAAA) if self.config.ipv6 else (_A,)
        answers = await asyncio.gather(*(self._lookup(host, t) for t in types))
        addresses: list[str] = []
        errors: list[str] = []
        for ans in answers:
            if ans.status == "ok":
                addresses.extend(a for a in ans.values if a not in addresses)
            elif ans.status == "error":
                errors.append(ans.reason)
        return addresses, errors

    # ----- cached, single-flight lookups ------------------------------------

    async def _lookup(self, name: str, rdtype: dns.rdatatype.RdataType) -> _Answer:
        key = (name, rdtype)
        cached = self._cache.get(key)
        if cached is not None:
            expires, answer = cached
            if expires > time.monotonic():
                self._cache.move_to_end(key)
                self.stats["cache_hits"] += 1
                return answer
            del self._cache[key]
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._fetch(key))
            self._inflight[key] = future
        else:
            self.stats["shared"] += 1
        # shield: one caller giving up must not cancel the lookup the others wait for.
        return await asyncio.shield(future)

    async def _fetch(self, key: tuple[str, dns.rdatatype.RdataType]) -> _Answer:
        try:
            self.stats["queries"] += 1
            answer = await self._query(*key)
            if answer.ttl > 0 and self.config.cache_size > 0:
                self._cache[key] = (time.monotonic() + answer.ttl, answer)
                self._cache.move_to_end(key)
                while len(self._cache) > self.config.cache_size:
                    self._cache.popitem(last=False)
            return answer
        finally:
            self._inflight.pop(key, None)

    async def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> _Answer:
        cfg = self.config
        what = f"{name} {dns.rdatatype.to_text(rdtype)}"
        if self._resolver is None:
            return _Answer("error", reason=self._no_resolver_reason, ttl=cfg.error_ttl)
        try:
            answer = await self._resolver.resolve(dns.name.from_text(name), rdtype, search=False)
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.kwargs.get("responses") or {}
            return _Answer("nxdomain", ttl=self._negative_ttl(next(iter(responses.values()), None)))
        except dns.resolver.NoAnswer as exc:
            return _Answer("nodata", ttl=self._negative_ttl(exc.kwargs.get("response")))
        except dns.resolver.NoNameservers as exc:
            return _Answer("error", reason=f"DNS lookup of {what} failed: {_errors_text(exc)}", ttl=cfg.error_ttl)
        except dns.exception.Timeout:
            return _Answer("error", reason=f"DNS lookup of {what} timed out after {cfg.timeout:g}s", ttl=cfg.error_ttl)
        except (dns.exception.DNSException, OSError) as exc:
            return _Answer("error", reason=f"DNS lookup of {what} failed: {exc}", ttl=cfg.error_ttl)
        ttl = min(max(0.0, answer.expiration - time.time()), cfg.max_ttl)
        rrset = answer.rrset if answer.rrset is not None else ()
        if rdtype == _MX:
            values: tuple[Any, ...] = tuple(
                (rd.preference, rd.exchange.to_text(omit_final_dot=True).lower() if rd.exchange != dns.name.root else "")
                for rd in rrset
            )
        else:
            values = tuple(str(ipaddress.ip_address(rd.address)) for rd in rrset)
        return _Answer("ok", values, ttl=ttl)

    def _negative_ttl(self, response: Any) -> float:
        """The SOA-derived negative TTL (RFC 2308), capped by ``negative_ttl``."""
        cap = self.config.negative_ttl
        if response is None:
            return cap
        try:
            return min(float(response.resolve_chaining().minimum_ttl), cap)
        except dns.exception.DNSException:
            return cap


def _errors_text(exc: dns.resolver.NoNameservers) -> str:
    """'Server Do53:127.0.0.1@53 answered SERVFAIL' without dnspython's leading sentence."""
    return str(exc).split(": ", 1)[-1]
