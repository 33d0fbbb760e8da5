"""The DNS questions the authentication checks ask, answered once per run.

Uses the resolver ``[routing]`` configures (its nameservers and timeouts), so a check sees
what delivery sees. Lookups never raise: each returns an :class:`Answer` whose status tells
a missing name (``nxdomain``), a name without that type (``nodata``) and a failure that may
pass (``error``: SERVFAIL, timeout) apart, because SPF and DMARC give those different results.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename

from engine.deliver.routing import RoutingConfig

Status = Literal["ok", "nxdomain", "nodata", "error"]


@dataclass(frozen=True, slots=True)
class Answer:
    status: Status
    values: tuple[str, ...] = ()
    """TXT: each record's strings joined; A/AAAA: addresses; PTR: names; MX: ``"pref host"``."""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def void(self) -> bool:
        """An answer with nothing in it (RFC 7208 4.6.4 counts these)."""
        return self.status in ("nxdomain", "nodata")


class DnsLookup:
    """Cached TXT, A/AAAA, MX and PTR lookups for one run of checks (safe for concurrent use in one loop)."""

    def __init__(self, config: RoutingConfig | None = None) -> None:
        cfg = config or RoutingConfig()
        self._cache: dict[tuple[str, str], asyncio.Future[Answer]] = {}
        self._resolver: dns.asyncresolver.Resolver | None
        self._no_resolver = ""
        try:
            if cfg.nameservers:
                self._resolver = dns.asyncresolver.Resolver(configure=False)
                self._resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in cfg.nameservers]
            else:
                self._resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration as exc:
            self._resolver = None
            self._no_resolver = f"no DNS nameservers configured (system resolver: {exc}); set [routing] nameservers"
            return
        self._resolver.timeout = min(cfg.attempt_timeout, cfg.timeout)
        self._resolver.lifetime = cfg.timeout
        self._resolver.cache = None
        self._resolver.use_edns(0, 0, 1232)

    async def txt(self, name: str) -> Answer:
        return await self._get(name, "TXT")

    async def mx(self, name: str) -> Answer:
        return await self._get(name, "MX")

    async def a(self, name: str, rdtype: Literal["A", "AAAA"] = "A") -> Answer:
        return await self._get(name, rdtype)

    async def addresses(self, name: str) -> tuple[list[str], list[str]]:
        """IPv4 then IPv6 addresses of ``name``, and the errors met (empty when it simply has none)."""
        v4, v6 = await asyncio.gather(self.a(name, "A"), self.a(name, "AAAA"))
        found = [*v4.values, *v6.values]
        return found, [ans.reason for ans in (v4, v6) if ans.status == "error"]

    async def ptr(self, address: str) -> Answer:
        return await self._get(dns.reversename.from_address(address).to_text(omit_final_dot=True), "PTR")

    async def _get(self, name: str, rdtype: str) -> Answer:
        key = (name.lower().rstrip("."), rdtype)
        future = self._cache.get(key)
        if future is None:
            future = self._cache[key] = asyncio.ensure_future(self._query(*key))
        return await asyncio.shield(future)

    async def _query(self, name: str, rdtype: str) -> Answer:
        what = f"{name} {rdtype}"
        if self._resolver is None:
            return Answer("error", reason=self._no_resolver)
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as exc:
            return Answer("error", reason=f"{name!r} is not a valid DNS name ({exc})")
        try:
            answer = await self._resolver.resolve(qname, dns.rdatatype.from_text(rdtype), search=False)
        except dns.resolver.NXDOMAIN:
            return Answer("nxdomain", reason=f"{name} does not exist (NXDOMAIN)")
        except dns.resolver.NoAnswer:
            return Answer("nodata", reason=f"{name} has no {rdtype} record")
        except dns.resolver.NoNameservers as exc:
            return Answer("error", reason=f"DNS lookup of {what} failed: {str(exc).split(': ', 1)[-1]}")
        except dns.exception.Timeout:
            return Answer("error", reason=f"DNS lookup of {what} timed out")
        except (dns.exception.DNSException, OSError) as exc:
            return Answer("error", reason=f"DNS lookup of {what} failed: {exc}")
        rrset = answer.rrset if answer.rrset is not None else ()
        values: list[str] = []
        for rd in rrset:
            if rdtype == "TXT":
                values.append(b"".join(rd.strings).decode("utf-8", "replace"))
            elif rdtype == "MX":
                values.append(f"{rd.preference} {rd.exchange.to_text(omit_final_dot=True).lower()}")
            elif rdtype == "PTR":
                values.append(rd.target.to_text(omit_final_dot=True).lower())
            else:
                values.append(str(ipaddress.ip_address(rd.address)))
        return Answer("ok", tuple(values))
