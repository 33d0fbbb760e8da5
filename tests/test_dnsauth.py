"""DNS authentication checks against the real loopback DNS server (tests/dnsserver.py).

One well-configured world where every check passes, then, for each check, records that break
it the way real zones break: a source outside SPF, too many lookups, two SPF records, a DNS
failure; a DKIM key that is not ours, missing or revoked; no or a monitoring-only DMARC; a
return path in another organization; a null-MX bounce domain; a PTR that is missing, not
forward-confirmed or not the EHLO name. Plus the SPF evaluator's mechanisms and macros one by one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.compose.dkim import keygen
from engine.config import load_settings
from engine.deliver.routing import RoutingConfig
from engine.dnsauth.check import AuthChecker, AuthReport, SendingSetup, aligned, organizational_domain
from engine.dnsauth.lookup import DnsLookup
from engine.dnsauth.spf import SpfChecker
from tests.dnsserver import DnsServer, dns_server  # noqa: F401  (fixture)

MTA1, MTA6 = "192.0.2.10", "2001:db8::10"


def _txt(value: str) -> str:
    """A TXT rdata in zone syntax, split in 255-byte strings like a real zone."""
    return " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))


def _dkim_value(record_line: str) -> str:
    """The value of the zone line `engine dkim keygen` prints, strings joined."""
    return "".join(part for part in record_line.split('"')[1::2])


@pytest.fixture
def world(tmp_path: Path, dns_server) -> dict[str, Any]:
    home = tmp_path / "home"
    _, rsa_line = keygen("good.test", "s1", "rsa", home / "dkim", bits=1024)
    _, ed_line = keygen("good.test", "e1", "ed25519", home / "dkim")
    _, other_line = keygen("good.test", "x1", "rsa", tmp_path / "other", bits=1024)  # a key that is not ours
    srv: DnsServer = dns_server({
        "good.test": {"TXT": _txt(f"v=spf1 ip4:{MTA1} include:_spf.good.test -all"), "MX": "10 mx.good.test."},
        "_spf.good.test": {"TXT": _txt("v=spf1 ip6:2001:db8::/64 -all")},
        "s1._domainkey.good.test": {"TXT": _txt(_dkim_value(rsa_line))},
        "e1._domainkey.good.test": {"TXT": _txt(_dkim_value(ed_line))},
        "_dmarc.good.test": {"TXT": _txt("v=DMARC1; p=reject; rua=mailto:dmarc@good.test")},
        "bounces.good.test": {"MX": "10 mx.good.test.", "TXT": _txt("v=spf1 redirect=good.test")},
        "mx.good.test": {"A": "192.0.2.25"},
        "mta1.good.test": {"A": MTA1},
        "mta6.good.test": {"AAAA": MTA6},
        "10.2.0.192.in-addr.arpa": {"PTR": "mta1.good.test."},
        "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa": {"PTR": "mta6.good.test."},
    })
    config = tmp_path / "engine.toml"
    config.write_text(
        f'[routing]\nnameservers = ["{srv.nameserver}"]\ntimeout = "2s"\n'
        '[feedback]\nbounce_domain = "bounces.good.test"\n[[feedback.keys]]\nid = 1\nsecret = "verp-test-secret-vvvvvvvvvvvvvvvvvvvvvvvvvvvvvv"\n'
        '[[pools]]\nname = "default"\n'
        f'[[pools.sources]]\nname = "mta1"\naddress = "{MTA1}"\nehlo = "mta1.good.test"\n'
        f'[[pools.sources]]\nname = "mta6"\naddress = "{MTA6}"\nehlo = "mta6.good.test"\n'
        '[[domains]]\nname = "good.test"\n'
        '[[domains.dkim]]\nselector = "s1"\nkey_file = "dkim/good.test.s1.rsa.pem"\n'
        '[[domains.dkim]]\nselector = "e1"\nalgorithm = "ed25519-sha256"\nkey_file = "dkim/good.test.e1.ed25519.pem"\n'
    )
    return {"srv": srv, "config": config, "home": home, "other": _dkim_value(other_line), "tmp": tmp_path}


def _settings(world: dict[str, Any], extra: str = "") -> Any:
    if extra:
        world["config"].write_text(world["config"].read_text() + extra)
    return load_settings(world["config"], env={"ENGINE_HOME": str(world["home"])})


async def _report(world: dict[str, Any], *names: str, extra: str = "", addresses: tuple[str, ...] = ()) -> AuthReport:
    settings = _settings(world, extra)
    lookup = DnsLookup(settings.routing)  # a fresh cache per run: records changed between runs are seen
    return await AuthChecker(lookup).run(SendingSetup.from_settings(settings, names, addresses))


def _by_check(report: AuthReport, domain: int = 0) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for f in report.domains[domain].findings:
        out.setdefault(f.check, []).append(f)
    return out


def _one(report: AuthReport, check: str) -> Any:
    [finding] = _by_check(report)[check]
    return finding


async def test_a_well_configured_domain_passes_every_check(world) -> None:
    report = await _report(world)
    assert report.ok, json.dumps(report.to_dict(), indent=1)
    checks = _by_check(report)
    assert [f.status for f in report.domains[0].findings] == ["pass"] * 7
    assert [f.subject for f in checks["dkim"]] == ["s1._domainkey.good.test", "e1._domainkey.good.test"]
    spf = checks["spf"][0].data["sources"]
    assert {s["source"]: (s["result"], s["matched"]) for s in spf} == {
        "mta1": ("pass", f"ip4:{MTA1}"), "mta6": ("pass", "include:_spf.good.test")}
    assert checks["spf_return_path"][0].subject == "bounces.good.test"
    assert checks["dmarc"][0].data["policy"] == "reject"
    assert checks["alignment"][0].data == {"dkim_aligned": True, "spf_aligned": True, "adkim": "r", "aspf": "r",
                                           "return_path_domain": "bounces.good.test"}
    assert checks["bounce_mx"][0].data["mx"] == [{"preference": 10, "host": "mx.good.test", "addresses": ["192.0.2.25"]}]
    assert [(f.subject, f.status) for f in report.sources] == [
        (f"source mta1 {MTA1}", "pass"), (f"source mta6 {MTA6}", "pass")]


async def test_spf_failures(world) -> None:
    srv = world["srv"]
    srv.set_records("good.test", "TXT", _txt("v=spf1 ip4:198.51.100.0/24 ~all"))
    report = await _report(world)
    spf = _one(report, "spf")
    assert spf.status == "fail" and "mta1 192.0.2.10: softfail" in spf.detail and "mta6" in spf.detail
    assert _one(report, "spf_return_path").status == "fail"  # redirect=good.test gives the same answer
    alignment = _one(report, "alignment")
    assert alignment.status == "warn" and "through DKIM only" in alignment.detail
    assert not report.ok

    srv.set_records("good.test", "TXT", [_txt(f"v=spf1 ip4:{MTA1} -all"), _txt("v=spf1 -all")])
    spf = _one(await _report(world), "spf")
    assert spf.status == "fail" and "2 SPF records" in spf.detail

    srv.delete("good.test")
    srv.set_records("good.test", "MX", "10 mx.good.test.")
    report = await _report(world)
    assert _one(report, "spf").status == "warn"  # VERP is on: the From domain's SPF is not what DMARC uses
    assert _one(report, "spf_return_path").status == "fail"  # but the redirect now points at nothing

    srv.set_records("good.test", "TXT", _txt(f"v=spf1 ip4:{MTA1} include:_spf.good.test -all"))
    srv.set_fault("_spf.good.test", "SERVFAIL")
    spf = _one(await _report(world), "spf")
    assert spf.status == "error"  # mta1 still passes before the include; mta6 meets the SERVFAIL (try again)
    assert {s["source"]: s["result"] for s in spf.data["sources"]} == {"mta1": "pass", "mta6": "temperror"}


async def test_spf_lookup_limits(world) -> None:
    srv = world["srv"]
    for i in range(11):
        srv.set_records(f"i{i}.good.test", "TXT", _txt(f"v=spf1 include:i{i + 1}.good.test -all" if i < 10 else "v=spf1 -all"))
    srv.set_records("deep.test", "TXT", _txt("v=spf1 include:i0.good.test -all"))
    checker = SpfChecker(DnsLookup(RoutingConfig.model_validate({"nameservers": [srv.nameserver]})))
    verdict = await checker.check(MTA1, "deep.test")
    assert verdict.result == "permerror" and "more than 10" in verdict.reason and verdict.lookups == 11
    srv.set_records("void.test", "TXT", _txt("v=spf1 a:n1.void.test a:n2.void.test a:n3.void.test -all"))
    verdict = await checker.check(MTA1, "void.test")
    assert verdict.result == "permerror" and "found nothing" in verdict.reason


async def test_spf_mechanisms_and_macros(world) -> None:
    srv = world["srv"]
    srv.set_records("m.test", "MX", ["10 mx1.m.test.", "20 mx2.m.test."])
    srv.set_records("mx2.m.test", "A", "192.0.2.20")
    srv.set_records("host.m.test", "A", "192.0.2.30")
    srv.set_records("cases.m.test", "TXT", _txt(
        "v=spf1 mx:m.test a:host.m.test/31 exists:%{ir}.%{v}._spf.m.test ptr:good.test ?ip4:192.0.2.200 -all"))
    srv.set_records("40.2.0.192.in-addr._spf.m.test", "A", "127.0.0.2")
    checker = SpfChecker(DnsLookup(RoutingConfig.model_validate({"nameservers": [srv.nameserver]})))
    cases = {
        "192.0.2.20": ("pass", "mx:m.test"),
        "192.0.2.31": ("pass", "a:host.m.test/31"),
        "192.0.2.40": ("pass", "exists:%{ir}.%{v}._spf.m.test"),
        MTA1: ("pass", "ptr:good.test"),  # PTR mta1.good.test, forward-confirmed, under good.test
        "192.0.2.200": ("neutral", "?ip4:192.0.2.200"),
        "192.0.2.201": ("fail", "-all"),
    }
    for ip, (result, matched) in cases.items():
        verdict = await checker.check(ip, "cases.m.test")
        assert (verdict.result, verdict.matched) == (result, matched), (ip, verdict)
    assert (await checker.check(MTA1, "nothing.test")).result == "none"
    srv.set_records("bad.test", "TXT", _txt("v=spf1 ip4:300.1.1.1 -all"))
    assert (await checker.check(MTA1, "bad.test")).result == "permerror"
    srv.set_records("bad2.test", "TXT", _txt("v=spf1 foo:bar -all"))
    assert (await checker.check(MTA1, "bad2.test")).result == "permerror"
    srv.set_records("red.test", "TXT", _txt("v=spf1 redirect=cases.m.test"))
    verdict = await checker.check("192.0.2.20", "red.test")
    assert verdict.result == "pass" and verdict.matched == "redirect=cases.m.test"


async def test_dkim_failures(world) -> None:
    srv = world["srv"]
    srv.set_records("s1._domainkey.good.test", "TXT", _txt(world["other"]))  # someone else's key
    srv.delete("e1._domainkey.good.test")
    report = await _report(world)
    s1, e1 = _by_check(report)["dkim"]
    assert s1.status == "fail" and "not the public half" in s1.detail
    assert e1.status == "fail" and "no DKIM key published" in e1.detail
    alignment = _one(report, "alignment")
    assert alignment.status == "warn" and "through SPF only" in alignment.detail  # SPF still carries DMARC

    srv.set_records("s1._domainkey.good.test", "TXT", _txt("v=DKIM1; k=rsa; p="))
    srv.set_records("e1._domainkey.good.test", "TXT", _txt("v=DKIM1; k=rsa; p=AAAA"))
    s1, e1 = _by_check(await _report(world))["dkim"]
    assert "revoked" in s1.detail and "k=rsa but the key file is ed25519" in e1.detail
    (world["home"] / "dkim" / "good.test.s1.rsa.pem").unlink()
    s1, _ = _by_check(await _report(world))["dkim"]
    assert s1.status == "fail" and "does not exist" in s1.detail


async def test_dmarc_and_alignment(world) -> None:
    srv = world["srv"]
    srv.set_records("_dmarc.good.test", "TXT", _txt("v=DMARC1; p=none"))
    assert _one(await _report(world), "dmarc").status == "warn"
    srv.set_records("_dmarc.good.test", "TXT", _txt("v=DMARC1; p=reject; aspf=s"))
    report = await _report(world)
    alignment = _one(report, "alignment")
    assert alignment.status == "warn" and "NOT aligned (strict)" in alignment.detail  # bounces.good.test != good.test
    srv.delete("_dmarc.good.test")
    report = await _report(world)
    dmarc = _one(report, "dmarc")
    assert dmarc.status == "fail" and "no DMARC record" in dmarc.detail and not report.ok
    # A subdomain without its own record uses the organizational domain's, with sp=.
    srv.set_records("_dmarc.good.test", "TXT", _txt("v=DMARC1; p=reject; sp=quarantine"))
    report = await _report(world, "news.good.test")
    dmarc = _one(report, "dmarc")
    assert dmarc.status == "pass" and dmarc.data["found_at"] == "_dmarc.good.test" and dmarc.data["subdomain_policy"] == "quarantine"
    dkim = _one(report, "dkim")
    assert dkim.status == "warn" and "not a configured sending domain" in dkim.detail


async def test_return_path_in_another_organization_is_not_aligned(world) -> None:
    srv = world["srv"]
    srv.set_records("bounces.other.test", "MX", "10 mx.good.test.")
    srv.set_records("bounces.other.test", "TXT", _txt(f"v=spf1 ip4:{MTA1} ip6:{MTA6} -all"))
    world["config"].write_text(world["config"].read_text().replace("bounces.good.test", "bounces.other.test"))
    report = await _report(world)
    assert _one(report, "spf_return_path").status == "pass"
    alignment = _one(report, "alignment")
    assert alignment.status == "warn" and "@bounces.other.test NOT aligned (relaxed)" in alignment.detail


async def test_bounce_domain_mx(world) -> None:
    srv = world["srv"]
    srv.set_records("bounces.good.test", "MX", "0 .")
    assert "null MX" in _one(await _report(world), "bounce_mx").detail
    srv.set_fault("bounces.good.test", "SERVFAIL")
    assert _one(await _report(world), "bounce_mx").status == "error"
    srv.delete("bounces.good.test")
    mx = _one(await _report(world), "bounce_mx")
    assert mx.status == "fail" and "does not exist" in mx.detail
    world["config"].write_text(world["config"].read_text().replace('bounce_domain = "bounces.good.test"\n', ""))
    report = await _report(world)
    assert _one(report, "bounce_mx").status == "skip"
    assert "spf_return_path" not in _by_check(report)
    assert "VERP off" in _one(report, "alignment").detail


async def test_reverse_dns_failures(world) -> None:
    srv = world["srv"]
    srv.set_records("mta1.good.test", "A", "192.0.2.99")  # PTR no longer forward-confirmed
    srv.set_records("0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa", "PTR", "other.good.test.")
    srv.set_records("other.good.test", "AAAA", MTA6)
    report = await _report(world, addresses=("192.0.2.77",))
    by_subject = {f.subject: f for f in report.sources}
    assert "does not resolve back" in by_subject[f"source mta1 {MTA1}"].detail
    assert "EHLO says mta6.good.test" in by_subject[f"source mta6 {MTA6}"].detail
    extra = by_subject["source address-1 192.0.2.77"]
    assert extra.status == "fail" and "no PTR record" in extra.detail
    assert not report.ok


def test_organizational_domain_and_alignment() -> None:
    assert organizational_domain("mail.news.example.com") == "example.com"
    assert organizational_domain("bounces.shop.co.uk") == "shop.co.uk"
    assert aligned("bounces.example.com", "example.com", "r") and not aligned("bounces.example.com", "example.com", "s")
    assert not aligned("example.net", "example.com", "r")


def test_dns_check_cli(world) -> None:
    env = {**os.environ, "ENGINE_HOME": str(world["home"]), "DATABASE_URL": "postgresql://unused@127.0.0.1:1/x"}
    cmd = [sys.executable, "-m", "engine", "--config", str(world["config"]), "dns", "check"]
    out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads(out.stdout)
    assert data["ok"] is True and [d["domain"] for d in data["domains"]] == ["good.test"]
    assert [c["check"] for c in data["domains"][0]["checks"]] == [
        "spf", "spf_return_path", "dkim", "dkim", "dmarc", "alignment", "bounce_mx"]
    world["srv"].delete("_dmarc.good.test")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1
    assert "good.test: PROBLEMS" in out.stdout and "FAIL  dmarc" in out.stdout and "PASS  ptr" in out.stdout
    bad = subprocess.run([*cmd, "--address", "nope"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "not an IP address" in bad.stderr
