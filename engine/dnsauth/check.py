"""Is each sending domain set up so receivers authenticate our mail? The report, as data.

For each sending domain (``[[domains]]``): its SPF record and whether every configured source
address (``[[pools.sources]] address``) passes it, and the same for the return-path (VERP)
domain (``[feedback] bounce_domain``) when VERP is on; each DKIM selector's published key
against the public half of the configured private key; the DMARC record and whether mail From
the domain aligns through DKIM (``d=``) or SPF (the return-path domain) under the record's
``adkim``/``aspf`` modes; the MX of the bounce domain. For each source address: its PTR, whether
that name resolves back to the address (forward-confirmed reverse DNS) and equals its EHLO name.

Each finding is a :class:`Finding` with a status: ``pass``, ``warn`` (works, but worth
fixing), ``fail`` (receivers will reject or mark the mail), ``error`` (DNS did not answer: try
again) or ``skip`` (nothing to check). ``engine dns check`` prints it; the dashboard can show
the same :meth:`AuthReport.to_dict`.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from engine.compose.dkim import DkimKeyConfig, DkimKeyError, load_private_key
from engine.dnsauth.lookup import DnsLookup
from engine.dnsauth.spf import SpfChecker, Verdict

if TYPE_CHECKING:
    from engine.config import Settings

Status = Literal["pass", "warn", "fail", "error", "skip"]
_BAD: frozenset[str] = frozenset({"fail", "error"})
# Second-level registries under a two-letter country TLD (co.uk, com.au, ...): without the Public
# Suffix List the organizational domain is the last two labels, or three under one of these.
_SECOND_LEVEL = frozenset({"ac", "co", "com", "edu", "gov", "ltd", "ne", "net", "or", "org", "plc"})


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    """spf, spf_return_path, dkim, dmarc, alignment, bounce_mx, ptr."""
    status: Status
    subject: str
    """What was checked: a domain, ``selector._domainkey.domain``, ``source 192.0.2.10``."""
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SourceAddress:
    """One egress source: where mail leaves from and the name it says in EHLO."""

    name: str
    address: str | None
    ehlo: str


@dataclass(frozen=True, slots=True)
class SendingDomain:
    name: str
    dkim: tuple[DkimKeyConfig, ...] = ()
    configured: bool = True
    """False: asked for by name, not in ``[[domains]]`` (no selectors are known)."""


@dataclass(slots=True)
class DomainReport:
    domain: str
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return not any(f.status in _BAD for f in self.findings)


@dataclass(slots=True)
class AuthReport:
    domains: list[DomainReport]
    sources: list[Finding]

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.domains) and not any(f.status in _BAD for f in self.sources)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "domains": [{"domain": d.domain, "ok": d.ok, "checks": [asdict(f) for f in d.findings]} for d in self.domains],
            "sources": [asdict(f) for f in self.sources],
        }


@dataclass(frozen=True, slots=True)
class SendingSetup:
    """What the checks compare DNS against: the sending domains, sources, bounce domain and key files."""

    domains: tuple[SendingDomain, ...]
    sources: tuple[SourceAddress, ...]
    bounce_domain: str | None = None
    key_dir: Path = Path(".")
    """Relative DKIM key files are read from here (the engine home)."""

    @classmethod
    def from_settings(cls, settings: Settings, names: Sequence[str] = (), addresses: Sequence[str] = ()) -> SendingSetup:
        """The configured setup; ``names`` picks domains (unknown ones are checked without DKIM
        selectors), ``addresses`` adds source addresses (EHLO ``[server] hostname``)."""
        configured = {d.name: SendingDomain(d.name, tuple(d.dkim)) for d in settings.domains}
        wanted = [n.strip().rstrip(".").lower() for n in names]
        domains = tuple(configured.get(n, SendingDomain(n, (), False)) for n in wanted) if wanted else tuple(configured.values())
        sources: list[SourceAddress] = []
        for pool in settings.pools:
            for s in pool.sources:
                sources.append(SourceAddress(s.name, s.address, s.ehlo or settings.server.hostname))
        if not settings.pools:
            sources.append(SourceAddress("default", None, settings.server.hostname))
        sources += [SourceAddress(f"address-{i + 1}", a, settings.server.hostname) for i, a in enumerate(addresses)]
        return cls(domains, tuple(sources), settings.feedback.bounce_domain, settings.home)


def organizational_domain(domain: str) -> str:
    """The registrable domain, by a heuristic (the last two labels, three under ``co.uk``-like registries)."""
    labels = domain.lower().rstrip(".").split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def aligned(a: str, b: str, mode: str) -> bool:
    """DMARC identifier alignment: strict is equality, relaxed the same organizational domain."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    return a == b if mode == "s" else organizational_domain(a) == organizational_domain(b)


def tags(record: str) -> dict[str, str]:
    """``k=v; k2=v2`` tag lists (DKIM, DMARC), names lower-cased, white space removed around values."""
    out: dict[str, str] = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            out.setdefault(name.strip().lower(), re.sub(r"\s+", "", value) if name.strip().lower() == "p" else value.strip())
    return out


class AuthChecker:
    """Runs every check of a :class:`SendingSetup` over one :class:`DnsLookup`."""

    def __init__(self, lookup: DnsLookup) -> None:
        self.lookup = lookup
        self.spf = SpfChecker(lookup)

    async def run(self, setup: SendingSetup) -> AuthReport:
        domains = await asyncio.gather(*(self.domain(d, setup) for d in setup.domains))
        sources = await asyncio.gather(*(self.reverse_dns(s) for s in setup.sources))
        return AuthReport(list(domains), list(sources))

    async def domain(self, domain: SendingDomain, setup: SendingSetup) -> DomainReport:
        name = domain.name
        addressed = [s for s in setup.sources if s.address]
        verp = setup.bounce_domain
        findings: list[Finding] = []
        spf = await self._spf("spf", name, addressed, f"postmaster@{name}", required=verp is None)
        findings.append(spf)
        rp_spf: Finding | None = None
        if verp is not None:
            rp_spf = await self._spf("spf_return_path", verp, addressed, f"b-check@{verp}", required=True)
            findings.append(rp_spf)
        dkim = [await self._dkim(name, key, setup.key_dir) for key in domain.dkim]
        if not dkim:
            why = "no [[domains.dkim]] keys configured" if domain.configured else "not a configured sending domain ([[domains]])"
            dkim = [Finding("dkim", "warn", name, f"{why}: mail From {name} is not DKIM-signed, DMARC rests on SPF alone")]
        findings += dkim
        dmarc = await self._dmarc(name)
        findings.append(dmarc)
        findings.append(self._alignment(name, verp, spf, rp_spf, dkim, dmarc))
        findings.append(await self._bounce_mx(verp))
        return DomainReport(name, findings)

    # ---- SPF ------------------------------------------------------------------------------------

    async def _spf(self, check: str, domain: str, sources: Sequence[SourceAddress], sender: str, required: bool) -> Finding:
        verdicts: list[tuple[SourceAddress, Verdict]] = []
        for s in sources:
            assert s.address is not None
            verdicts.append((s, await self.spf.check(s.address, domain, sender=sender, helo=s.ehlo)))
        record_ans = await self.lookup.txt(domain)
        records = [t for t in record_ans.values if t.lower().startswith("v=spf1")]
        record = records[0] if len(records) == 1 else None
        data: dict[str, Any] = {
            "record": record,
            "sources": [{"source": s.name, "address": s.address, "result": v.result, "matched": v.matched,
                         "reason": v.reason, "lookups": v.lookups} for s, v in verdicts],
        }
        role = "return-path (VERP) domain" if check == "spf_return_path" else "sending domain"
        if record_ans.status == "error":
            return Finding(check, "error", domain, record_ans.reason, data)
        if len(records) > 1:
            return Finding(check, "fail", domain, f"{len(records)} SPF records published: receivers give permerror", data)
        if record is None:
            status: Status = "fail" if required else "warn"
            hint = "" if required else " (the return path is the VERP domain, so DMARC does not need it)"
            return Finding(check, status, domain, f"no SPF record on the {role}{hint}", data)
        if not verdicts:
            return Finding(check, "warn", domain,
                           f"{record}: no source has a configured address ([[pools.sources]] address), "
                           "so whether your mail passes cannot be told (try --address)", data)
        bad = [(s, v) for s, v in verdicts if v.result != "pass"]
        if not bad:
            return Finding(check, "pass", domain, f"{record}: every source address passes", data)
        temp = [v for _, v in bad if v.result == "temperror"]
        listing = "; ".join(f"{s.name} {s.address}: {v.result} ({v.reason})" for s, v in bad)
        return Finding(check, "error" if len(temp) == len(bad) else "fail", domain, f"{record}: {listing}", data)

    # ---- DKIM -----------------------------------------------------------------------------------

    async def _dkim(self, domain: str, key: DkimKeyConfig, key_dir: Path) -> Finding:
        name = f"{key.selector}._domainkey.{domain}"
        path = key.key_file if key.key_file.is_absolute() else key_dir / key.key_file
        data: dict[str, Any] = {"selector": key.selector, "algorithm": key.algorithm, "key_file": str(path)}
        try:
            private = load_private_key(path, key.algorithm)
        except DkimKeyError as exc:
            return Finding("dkim", "fail", name, str(exc), data)
        ans = await self.lookup.txt(name)
        if ans.status == "error":
            return Finding("dkim", "error", name, ans.reason, data)
        records = [t for t in ans.values if "p=" in t]
        if not records:
            return Finding("dkim", "fail", name, f"no DKIM key published at {name}: publish the record `engine dkim keygen` printed", data)
        if len(records) > 1:
            return Finding("dkim", "fail", name, f"{len(records)} TXT records at {name}: verifiers may pick either", data)
        published = tags(records[0])
        data["record"] = records[0]
        if published.get("v", "DKIM1") != "DKIM1":
            return Finding("dkim", "fail", name, f"v={published['v']}: not a DKIM1 key record", data)
        if not published.get("p"):
            return Finding("dkim", "fail", name, "p= is empty: the published key is revoked", data)
        want_k = "rsa" if key.algorithm == "rsa-sha256" else "ed25519"
        if published.get("k", "rsa").lower() != want_k:
            return Finding("dkim", "fail", name, f"published k={published.get('k', 'rsa')} but the key file is {want_k}", data)
        if not _same_public_key(published["p"], private):
            return Finding("dkim", "fail", name, f"the published key is not the public half of {path}", data)
        if "y" in published.get("t", "").lower().split(":"):
            return Finding("dkim", "warn", name, "key matches, but t=y (testing): receivers may treat failures as unsigned", data)
        return Finding("dkim", "pass", name, f"published key matches {path.name} ({key.algorithm})", data)

    # ---- DMARC ----------------------------------------------------------------------------------

    async def _dmarc(self, domain: str) -> Finding:
        org = organizational_domain(domain)
        for where in dict.fromkeys([domain, org]):
            name = f"_dmarc.{where}"
            ans = await self.lookup.txt(name)
            if ans.status == "error":
                return Finding("dmarc", "error", name, ans.reason)
            records = [t for t in ans.values if re.match(r"^v\s*=\s*DMARC1\s*(;|$)", t, re.IGNORECASE)]
            if len(records) > 1:
                return Finding("dmarc", "fail", name, f"{len(records)} DMARC records: receivers ignore them all")
            if not records:
                continue
            t = tags(records[0])
            policy = t.get("p", "").lower()
            data = {"record": records[0], "policy": policy, "adkim": t.get("adkim", "r").lower(),
                    "aspf": t.get("aspf", "r").lower(), "found_at": name, "pct": t.get("pct", "100")}
            if where != domain:
                data["subdomain_policy"] = t.get("sp", policy).lower()
            if policy not in ("none", "quarantine", "reject"):
                return Finding("dmarc", "fail", name, f"p={policy or '(missing)'}: a DMARC record needs p=none|quarantine|reject", data)
            effective = data.get("subdomain_policy", policy)
            if effective == "none":
                return Finding("dmarc", "warn", name, f"{records[0]} (policy none: reports only, nothing is enforced)", data)
            return Finding("dmarc", "pass", name, f"{records[0]} (policy {effective})", data)
        return Finding("dmarc", "fail", f"_dmarc.{domain}", f"no DMARC record at _dmarc.{domain}"
                       + (f" or _dmarc.{org}" if org != domain else "") + ": big mailbox providers require one of bulk senders")

    def _alignment(
        self, domain: str, verp: str | None, spf: Finding, rp_spf: Finding | None, dkim: list[Finding], dmarc: Finding,
    ) -> Finding:
        adkim = str(dmarc.data.get("adkim", "r"))
        aspf = str(dmarc.data.get("aspf", "r"))
        dkim_ok = any(f.status == "pass" for f in dkim)
        dkim_text = (f"DKIM d={domain} aligned ({'strict' if adkim == 's' else 'relaxed'}), key published"
                     if dkim_ok else f"no DKIM signature of {domain} verifies")
        if verp is not None:
            rp_aligned = aligned(verp, domain, aspf)
            spf_ok = rp_aligned and rp_spf is not None and rp_spf.status == "pass"
            spf_text = (f"return path @{verp} {'aligned' if rp_aligned else 'NOT aligned'} "
                        f"({'strict' if aspf == 's' else 'relaxed'}) and SPF {rp_spf.status if rp_spf else '-'}")
        else:
            spf_ok = spf.status == "pass"
            spf_text = (f"VERP off: the return path is each message's envelope sender; aligned when it is @{domain}"
                        + (" (relaxed: or a subdomain)" if aspf != "s" else "") + f", SPF {spf.status}")
        data = {"dkim_aligned": dkim_ok, "spf_aligned": spf_ok, "adkim": adkim, "aspf": aspf, "return_path_domain": verp}
        detail = f"{dkim_text}; {spf_text}"
        if dkim_ok and spf_ok:
            return Finding("alignment", "pass", domain, detail, data)
        if dkim_ok or spf_ok:  # DMARC passes, through one identifier only
            return Finding("alignment", "warn", domain, f"{detail}: DMARC passes through {'DKIM' if dkim_ok else 'SPF'} only", data)
        return Finding("alignment", "fail", domain, f"{detail}: DMARC fails for mail From {domain}", data)

    # ---- bounce domain MX -----------------------------------------------------------------------

    async def _bounce_mx(self, verp: str | None) -> Finding:
        if verp is None:
            return Finding("bounce_mx", "skip", "-", "VERP off ([feedback] bounce_domain unset): bounces go to each envelope sender")
        ans = await self.lookup.mx(verp)
        if ans.status == "error":
            return Finding("bounce_mx", "error", verp, ans.reason)
        if ans.status == "nxdomain":
            return Finding("bounce_mx", "fail", verp, f"{verp} does not exist: bounces and FBL reports cannot reach the engine")
        pairs = sorted((int(v.split(" ", 1)[0]), v.split(" ", 1)[1]) for v in ans.values)
        hosts = [h for _, h in pairs if h not in ("", ".", "@")]
        if ans.status == "ok" and not hosts:
            return Finding("bounce_mx", "fail", verp, f"{verp} has a null MX: it refuses the bounces it should receive")
        if not hosts:  # no MX: implicit MX, the domain's own address
            found, errors = await self.lookup.addresses(verp)
            if found:
                return Finding("bounce_mx", "warn", verp, f"no MX; mail goes to {verp}'s own address {', '.join(found)}",
                               {"mx": [], "addresses": found})
            return Finding("bounce_mx", "error" if errors else "fail", verp,
                           errors[0] if errors else f"{verp} has no MX and no address: bounces cannot reach the engine")
        resolved = {h: (await self.lookup.addresses(h)) for h in hosts}
        listing = ", ".join(f"{h} [{', '.join(found) or 'no address'}]" for h, (found, _) in resolved.items())
        data = {"mx": [{"preference": p, "host": h, "addresses": resolved[h][0]} for p, h in pairs if h in resolved]}
        if not any(found for found, _ in resolved.values()):
            errors = [e for _, errs in resolved.values() for e in errs]
            return Finding("bounce_mx", "error" if errors else "fail", verp, f"no MX host of {verp} resolves: {listing}", data)
        return Finding("bounce_mx", "pass", verp, f"MX {listing}", data)

    # ---- reverse DNS ----------------------------------------------------------------------------

    async def reverse_dns(self, source: SourceAddress) -> Finding:
        if source.address is None:
            return Finding("ptr", "skip", f"source {source.name}",
                           "no configured address (the OS picks one): set [[pools.sources]] address to check its PTR")
        subject = f"source {source.name} {source.address}"
        data: dict[str, Any] = {"source": source.name, "address": source.address, "ehlo": source.ehlo}
        ans = await self.lookup.ptr(source.address)
        if ans.status == "error":
            return Finding("ptr", "error", subject, ans.reason, data)
        if not ans.values:
            return Finding("ptr", "fail", subject, f"no PTR record for {source.address}: many receivers refuse such mail", data)
        confirmed = []
        for name in ans.values:
            found, _ = await self.lookup.addresses(name)
            if source.address in found:
                confirmed.append(name)
        data["ptr"], data["confirmed"] = list(ans.values), confirmed
        if not confirmed:
            return Finding("ptr", "fail", subject,
                           f"PTR {', '.join(ans.values)} does not resolve back to {source.address} (no forward-confirmed reverse DNS)", data)
        if source.ehlo.lower().rstrip(".") not in confirmed:
            return Finding("ptr", "fail", subject,
                           f"PTR {', '.join(confirmed)} is forward-confirmed but EHLO says {source.ehlo}: make them the same", data)
        return Finding("ptr", "pass", subject, f"PTR {source.ehlo}, forward-confirmed, matches EHLO", data)


def _same_public_key(published_b64: str, private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bool:
    """Whether the base64 ``p=`` value is the public half of ``private`` (SPKI or PKCS#1 for RSA, raw for Ed25519)."""
    try:
        raw = base64.b64decode(published_b64, validate=True)
    except ValueError:
        return False
    if isinstance(private, ed25519.Ed25519PrivateKey):
        mine = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return raw == mine
    try:
        theirs = serialization.load_der_public_key(raw)
    except (ValueError, UnsupportedAlgorithm):
        return False
    return isinstance(theirs, rsa.RSAPublicKey) and theirs.public_numbers() == private.public_key().public_numbers()
