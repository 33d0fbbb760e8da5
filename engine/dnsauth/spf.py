"""SPF (RFC 7208): would a receiver let this address send for this domain?

A small evaluator of our own (no new dependency): the ``ip4``, ``ip6``, ``a``, ``mx``,
``include``, ``exists``, ``ptr`` and ``all`` mechanisms, the ``redirect`` modifier and macros,
with the RFC's limits (at most 10 terms that query DNS, at most 2 lookups that find nothing,
at most 10 MX or PTR names per term), so a record that receivers reject for being too
expensive is reported as the ``permerror`` they will see. ``exp`` is not needed to judge a
result and is ignored.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Literal

from engine.dnsauth.lookup import DnsLookup

Result = Literal["pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"]
QUALIFIERS: dict[str, Result] = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
MAX_LOOKUPS = 10
MAX_VOID = 2
MAX_NAMES = 10

_MECHANISM_RE = re.compile(r"^([+\-~?]?)(all|include|a|mx|ptr|ip4|ip6|exists)(?=$|[:/])(.*)$", re.IGNORECASE)
_MODIFIER_RE = re.compile(r"^([a-z][a-z0-9_.-]*)=(.*)$", re.IGNORECASE)
_DUAL_CIDR_RE = re.compile(r"^(?::(?P<domain>[^/]+))?(?:/(?P<cidr4>\d+))?(?://(?P<cidr6>\d+))?$")
_MACRO_RE = re.compile(r"%(?:\{(?P<letter>[slodiphcrtvSLODIPHCRTV])(?P<digits>\d*)(?P<reverse>[rR]?)(?P<delims>[.\-+,/_=]*)\}|(?P<esc>[%_-]))")


class SpfError(Exception):
    """A result decided before the record was fully evaluated (permerror or temperror)."""

    def __init__(self, result: Result, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Term:
    qualifier: Result
    name: str  # lower case mechanism name
    value: str  # what follows the name (":domain/24", ":192.0.2.0/24", "")
    text: str


@dataclass(slots=True)
class Verdict:
    """The result for one address, with the term that decided it and why."""

    result: Result
    record: str | None = None
    """The SPF record of the domain checked (None: it has none)."""
    matched: str | None = None
    """The term that matched (``include:_spf.example.net``), or None (default result, or an error)."""
    reason: str = ""
    lookups: int = 0


@dataclass(slots=True)
class _Run:
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    sender: str
    helo: str
    lookups: int = 0
    void: int = 0
    trail: list[str] = field(default_factory=list)


def parse(record: str) -> tuple[list[Term], str | None]:
    """The mechanisms in order, and the ``redirect`` domain-spec; SpfError(permerror) on a syntax error."""
    terms: list[Term] = []
    redirect: str | None = None
    seen: set[str] = set()
    for text in record.split()[1:]:
        mod = _MODIFIER_RE.match(text)
        if mod and not _MECHANISM_RE.match(text):
            name = mod.group(1).lower()
            if name in ("redirect", "exp"):
                if name in seen:
                    raise SpfError("permerror", f"the {name}= modifier appears twice")
                seen.add(name)
                if name == "redirect":
                    redirect = mod.group(2)
            continue  # unknown modifiers are ignored (RFC 7208 6)
        mech = _MECHANISM_RE.match(text)
        if mech is None:
            raise SpfError("permerror", f"unknown term {text!r}")
        qualifier, name, value = mech.group(1) or "+", mech.group(2).lower(), mech.group(3)
        if name == "all" and value:
            raise SpfError("permerror", f"'all' takes no argument: {text!r}")
        if name in ("include", "exists") and not value.startswith(":"):
            raise SpfError("permerror", f"{name} needs a domain: {text!r}")
        if name in ("ip4", "ip6"):
            try:
                net = ipaddress.ip_network(value[1:], strict=False) if value.startswith(":") else None
            except ValueError:
                net = None
            if net is None or net.version != int(name[2]):
                raise SpfError("permerror", f"bad {name} network: {text!r}")
        if name in ("a", "mx", "ptr") and not _DUAL_CIDR_RE.match(value):
            raise SpfError("permerror", f"bad {name} argument: {text!r}")
        terms.append(Term(QUALIFIERS[qualifier], name, value, text))
    return terms, redirect


class SpfChecker:
    """Evaluates SPF over a :class:`DnsLookup` (which caches: checking many addresses costs one set of queries)."""

    def __init__(self, lookup: DnsLookup) -> None:
        self.lookup = lookup

    async def check(self, ip: str, domain: str, *, sender: str | None = None, helo: str = "") -> Verdict:
        """The SPF result for mail from ``ip`` with return-path domain ``domain``."""
        run = _Run(ipaddress.ip_address(ip), sender or f"postmaster@{domain}", helo)
        try:
            verdict = await self._evaluate(run, domain.lower().rstrip("."), top=True)
        except SpfError as exc:
            verdict = Verdict(exc.result, reason=exc.reason)
            verdict.record = run.trail[0] if run.trail else None
        verdict.lookups = run.lookups
        return verdict

    async def _record(self, domain: str) -> str | None:
        ans = await self.lookup.txt(domain)
        if ans.status == "error":
            raise SpfError("temperror", ans.reason)
        found = [t for t in ans.values if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]
        if len(found) > 1:
            raise SpfError("permerror", f"{domain} publishes {len(found)} SPF records (one is allowed)")
        return found[0] if found else None

    async def _evaluate(self, run: _Run, domain: str, *, top: bool = False) -> Verdict:
        record = await self._record(domain)
        if record is None:
            return Verdict("none", reason=f"{domain} has no SPF record")
        run.trail.append(record)
        terms, redirect = parse(record)
        for term in terms:
            if await self._matches(run, term, domain):
                return Verdict(term.qualifier, record, term.text,
                               f"{term.text} matches {run.ip}" + ("" if top else f" (in {domain})"))
        if redirect is not None and not any(t.name == "all" for t in terms):
            self._count(run)
            target = self._expand(redirect, run, domain)
            inner = await self._evaluate(run, target)
            if inner.result == "none":
                raise SpfError("permerror", f"redirect={target} has no SPF record")
            return Verdict(inner.result, record, f"redirect={target}", inner.reason)
        return Verdict("neutral", record, None, f"no term matches {run.ip} (default neutral)")

    def _count(self, run: _Run) -> None:
        run.lookups += 1
        if run.lookups > MAX_LOOKUPS:
            raise SpfError("permerror", f"more than {MAX_LOOKUPS} DNS-querying terms (RFC 7208 4.6.4): receivers give permerror")

    def _void(self, run: _Run, empty: bool) -> None:
        if empty:
            run.void += 1
            if run.void > MAX_VOID:
                raise SpfError("permerror", f"more than {MAX_VOID} lookups found nothing (RFC 7208 4.6.4)")

    async def _matches(self, run: _Run, term: Term, domain: str) -> bool:
        name, value = term.name, term.value
        if name == "all":
            return True
        if name in ("ip4", "ip6"):
            return run.ip.version == int(name[2]) and run.ip in ipaddress.ip_network(value[1:], strict=False)
        self._count(run)
        if name == "include":
            inner = await self._evaluate(run, self._expand(value[1:], run, domain))
            if inner.result == "temperror":
                raise SpfError("temperror", inner.reason)
            if inner.result in ("permerror", "none"):
                raise SpfError("permerror", f"{term.text}: {inner.reason}")
            return inner.result == "pass"
        if name == "exists":
            ans = await self.lookup.a(self._expand(value[1:], run, domain), "A")
            if ans.status == "error":
                raise SpfError("temperror", ans.reason)
            self._void(run, ans.void)
            return bool(ans.values)
        m = _DUAL_CIDR_RE.match(value)
        assert m is not None  # checked by parse()
        target = self._expand(m.group("domain"), run, domain) if m.group("domain") else domain
        cidr = int(m.group("cidr4") or 32) if run.ip.version == 4 else int(m.group("cidr6") or 128)
        if name == "a":
            return await self._address_match(run, target, cidr)
        if name == "mx":
            ans = await self.lookup.mx(target)
            if ans.status == "error":
                raise SpfError("temperror", ans.reason)
            self._void(run, ans.void)
            hosts = [v.split(" ", 1)[1] for v in ans.values if v.split(" ", 1)[1] not in ("", ".")]
            if len(hosts) > MAX_NAMES:
                raise SpfError("permerror", f"{term.text}: {target} has more than {MAX_NAMES} MX hosts")
            for host in hosts:
                if await self._address_match(run, host, cidr, count_void=False):
                    return True
            return False
        return await self._ptr_match(run, target)

    async def _address_match(self, run: _Run, name: str, cidr: int, count_void: bool = True) -> bool:
        ans = await self.lookup.a(name, "A" if run.ip.version == 4 else "AAAA")
        if ans.status == "error":
            raise SpfError("temperror", ans.reason)
        if count_void:
            self._void(run, ans.void)
        return any(run.ip in ipaddress.ip_network(f"{a}/{cidr}", strict=False) for a in ans.values)

    async def _ptr_match(self, run: _Run, target: str) -> bool:
        """RFC 7208 5.5: a validated PTR name equal to or under ``target`` (DNS errors: no match)."""
        ans = await self.lookup.ptr(str(run.ip))
        for name in ans.values[:MAX_NAMES]:
            addrs = await self.lookup.a(name, "A" if run.ip.version == 4 else "AAAA")
            if str(run.ip) in addrs.values and (name == target or name.endswith("." + target)):
                return True
        return False

    def _expand(self, spec: str, run: _Run, domain: str) -> str:
        """Macro expansion of a domain-spec (RFC 7208 7); SpfError(permerror) on a bad macro."""
        if "%" not in spec:
            return spec.lower().rstrip(".")
        local, _, sender_domain = run.sender.rpartition("@")
        values = {
            "s": run.sender, "l": local or "postmaster", "o": sender_domain, "d": domain, "h": run.helo or "unknown",
            "i": str(run.ip) if run.ip.version == 4 else ".".join(run.ip.exploded.replace(":", "")),
            "p": "unknown", "v": "in-addr" if run.ip.version == 4 else "ip6",
        }
        pos, out = 0, []
        for m in _MACRO_RE.finditer(spec):
            if "%" in spec[pos:m.start()]:
                raise SpfError("permerror", f"bad macro in {spec!r}")
            out.append(spec[pos:m.start()])
            pos = m.end()
            if m.group("esc"):
                out.append({"%": "%", "_": " ", "-": "%20"}[m.group("esc")])
                continue
            letter = m.group("letter")
            if letter.lower() not in values:
                raise SpfError("permerror", f"macro letter {letter!r} is not allowed in a domain-spec: {spec!r}")
            parts = re.split("[" + re.escape(m.group("delims") or ".") + "]", values[letter.lower()])
            if m.group("reverse"):
                parts.reverse()
            if m.group("digits"):
                n = int(m.group("digits"))
                if n == 0:
                    raise SpfError("permerror", f"macro keeps 0 labels: {spec!r}")
                parts = parts[-n:]
            text = ".".join(parts)
            out.append(urllib.parse.quote(text, safe="") if letter.isupper() else text)
        if "%" in spec[pos:]:
            raise SpfError("permerror", f"bad macro in {spec!r}")
        out.append(spec[pos:])
        name = "".join(out).lower().rstrip(".")
        while len(name) > 253 and "." in name:  # RFC 7208 7.3: drop labels from the left
            name = name.split(".", 1)[1]
        return name
