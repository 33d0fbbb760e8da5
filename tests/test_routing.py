"""MX routing against a real authoritative DNS server on loopback (tests/dnsserver.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
from typing import Any

import pytest

from engine.commands.dns import register
from engine.deliver.hop import Hop
from engine.deliver.routing import NULL_MX_REASON, RouteError, Router, RoutingConfig
from tests.dnsserver import DnsServer, dns_server  # noqa: F401  (fixture)

MX_PORT = 2525

PROVIDER = {
    "mx1.provider.test": {"A": "127.0.0.11"},
    "mx2.provider.test": {"A": "127.0.0.12"},
    "mx3.provider.test": {"A": "127.0.0.13"},
}


def router_for(srv: DnsServer, **overrides: Any) -> Router:
    config = {"nameservers": [srv.nameserver], "timeout": "2s", "mx_port": MX_PORT, **overrides}
    return Router(RoutingConfig.model_validate(config))


async def fails(router: Router, domain: str) -> RouteError:
    with pytest.raises(RouteError) as info:
        await router.resolve(domain)
    return info.value


# ----------------------------------------------------------------------------- MX semantics


async def test_mx_preferences_are_honoured(dns_server):
    srv = dns_server({
        # listed out of order on purpose
        "example.test": {"MX": ["30 mx3.provider.test.", "10 mx1.provider.test.", "20 mx2.provider.test."]},
        **PROVIDER,
    })
    route = await router_for(srv).resolve("example.test")
    assert route.kind == "mx"
    assert route.mx_hosts == ("mx1.provider.test", "mx2.provider.test", "mx3.provider.test")
    assert route.hops == (
        Hop("mx1.provider.test", "127.0.0.11", MX_PORT, 10),
        Hop("mx2.provider.test", "127.0.0.12", MX_PORT, 20),
        Hop("mx3.provider.test", "127.0.0.13", MX_PORT, 30),
    )


async def test_equal_preferences_are_shuffled(dns_server):
    srv = dns_server({
        "example.test": {"MX": ["10 mx1.provider.test.", "10 mx2.provider.test.", "20 mx3.provider.test."]},
        **PROVIDER,
    })
    router = router_for(srv)
    orders = set()
    for _ in range(60):  # P(one order 60 times) = 2 * 2**-60
        route = await router.resolve("example.test")
        assert route.mx_hosts[2] == "mx3.provider.test"
        orders.add(route.mx_hosts[:2])
    assert orders == {("mx1.provider.test", "mx2.provider.test"), ("mx2.provider.test", "mx1.provider.test")}
    assert srv.count("example.test", "MX") == 1  # shuffled per resolution, fetched once


async def test_both_address_families_ipv4_first(dns_server):
    srv = dns_server({
        "example.test": {"MX": "10 mx.example.test."},
        "mx.example.test": {"AAAA": ["::1"], "A": ["127.0.0.21", "127.0.0.22"]},
    })
    route = await router_for(srv).resolve("example.test")
    addresses = [h.address for h in route.hops]
    assert set(addresses[:2]) == {"127.0.0.21", "127.0.0.22"}  # an RRset has no order
    assert addresses[2:] == ["::1"]
    route = await router_for(srv, ipv6=False).resolve("example.test")
    assert {h.address for h in route.hops} == {"127.0.0.21", "127.0.0.22"}
    assert srv.count("mx.example.test", "AAAA") == 1  # only the first router asked


async def test_mx_host_behind_cname(dns_server):
    srv = dns_server({
        "example.test": {"MX": "10 alias.example.test."},
        "alias.example.test": {"CNAME": "mx1.provider.test."},
        **PROVIDER,
    })
    route = await router_for(srv).resolve("example.test")
    assert route.hops == (Hop("alias.example.test", "127.0.0.11", MX_PORT, 10),)


async def test_unresolvable_mx_host_is_skipped(dns_server):
    srv = dns_server({
        "example.test": {"MX": ["10 gone.example.test.", "20 mx2.provider.test."]},
        **PROVIDER,
    })
    route = await router_for(srv).resolve("example.test")
    assert [h.mx_host for h in route.hops] == ["mx2.provider.test"]
    assert route.mx_hosts == ("gone.example.test", "mx2.provider.test")


async def test_mx_host_count_is_capped(dns_server):
    mx = [f"{i} mx{i}.big.test." for i in range(1, 16)]
    srv = dns_server({"big.test": {"MX": mx}, **{f"mx{i}.big.test": {"A": f"127.0.1.{i}"} for i in range(1, 16)}})
    route = await router_for(srv, max_mx_hosts=3).resolve("big.test")
    assert route.mx_hosts == ("mx1.big.test", "mx2.big.test", "mx3.big.test")


async def test_implicit_mx_via_a(dns_server):
    srv = dns_server({"plain.test": {"A": "127.0.0.31"}})
    route = await router_for(srv).resolve("plain.test")
    assert route.kind == "implicit"
    assert route.hops == (Hop("plain.test", "127.0.0.31", MX_PORT, 0),)
    assert route.site == "plain.test"


async def test_implicit_mx_via_aaaa(dns_server):
    srv = dns_server({"v6only.test": {"AAAA": "::1"}})
    route = await router_for(srv).resolve("v6only.test")
    assert route.hops == (Hop("v6only.test", "::1", MX_PORT, 0),)


async def test_null_mx_is_permanent(dns_server):
    srv = dns_server({"nomail.test": {"MX": "0 .", "A": "127.0.0.1"}})
    err = await fails(router_for(srv), "nomail.test")
    assert err.permanent is True
    assert err.reason == NULL_MX_REASON
    assert err.domain == "nomail.test"


async def test_nxdomain_is_permanent(dns_server):
    srv = dns_server({"example.test": {"MX": "10 mx1.provider.test."}})
    err = await fails(router_for(srv), "missing.test")
    assert err.permanent is True
    assert "NXDOMAIN" in err.reason


async def test_no_mx_and_no_address_is_permanent(dns_server):
    srv = dns_server({"textonly.test": {"TXT": '"v=spf1 -all"'}})
    err = await fails(router_for(srv), "textonly.test")
    assert err.permanent is True
    assert "no MX and no A/AAAA" in err.reason


async def test_mx_hosts_without_addresses_is_permanent(dns_server):
    srv = dns_server({"example.test": {"MX": ["10 gone1.example.test.", "20 gone2.example.test."]}})
    err = await fails(router_for(srv), "example.test")
    assert err.permanent is True
    assert "gone1.example.test" in err.reason


# ----------------------------------------------------------------------------- temporary failures


async def test_servfail_is_temporary(dns_server):
    srv = dns_server({"broken.test": "SERVFAIL"})
    err = await fails(router_for(srv), "broken.test")
    assert err.permanent is False
    assert "SERVFAIL" in err.reason


async def test_servfail_on_mx_host_is_temporary(dns_server):
    srv = dns_server({"example.test": {"MX": "10 mx.example.test."}, "mx.example.test": "SERVFAIL"})
    err = await fails(router_for(srv), "example.test")
    assert err.permanent is False


async def test_timeout_is_temporary(dns_server):
    srv = dns_server({"slow.test": "TIMEOUT"})
    err = await fails(router_for(srv, timeout="0.3s"), "slow.test")
    assert err.permanent is False
    assert "timed out" in err.reason
    assert srv.count("slow.test", "MX") >= 1


async def test_no_nameserver_listening_is_temporary():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    router = Router(RoutingConfig(nameservers=[f"127.0.0.1:{port}"], timeout="0.5s"))
    err = await fails(router, "example.test")
    assert err.permanent is False


async def test_temporary_failure_is_remembered_briefly(dns_server):
    srv = dns_server({"broken.test": "SERVFAIL"})
    router = router_for(srv, error_ttl="0.3s")
    await fails(router, "broken.test")
    await fails(router, "broken.test")
    assert srv.count("broken.test", "MX") == 1
    srv.set_fault("broken.test", None)
    srv.set_records("broken.test", "A", "127.0.0.41")
    await asyncio.sleep(0.5)
    route = await router.resolve("broken.test")
    assert route.hops[0].address == "127.0.0.41"


# ----------------------------------------------------------------------------- cache and single-flight


async def test_positive_answers_cached_for_their_ttl(dns_server):
    srv = dns_server({
        "example.test": {"MX": (1, ["10 mx1.provider.test."])},
        "mx1.provider.test": {"A": (1, ["127.0.0.11"])},
    })
    router = router_for(srv)
    first = await router.resolve("example.test")
    srv.set_records("mx1.provider.test", "A", "127.0.0.99", ttl=1)
    second = await router.resolve("example.test")
    assert second.hops == first.hops  # served from cache: the change is not seen yet
    assert srv.count("example.test", "MX") == 1
    assert srv.count("mx1.provider.test", "A") == 1
    await asyncio.sleep(1.2)
    third = await router.resolve("example.test")
    assert third.hops[0].address == "127.0.0.99"
    assert srv.count("example.test", "MX") == 2
    assert srv.count("mx1.provider.test", "A") == 2


async def test_negative_answers_cached_with_a_cap(dns_server):
    srv = dns_server(negative_ttl=3600)  # the zone asks for an hour; our cap says 0.5 s
    router = router_for(srv, negative_ttl="0.5s")
    await fails(router, "later.test")
    await fails(router, "later.test")
    assert srv.count("later.test", "MX") == 1
    srv.set_records("later.test", "MX", "10 mx1.provider.test.")
    srv.set_records("mx1.provider.test", "A", "127.0.0.11")
    await asyncio.sleep(0.7)
    route = await router.resolve("later.test")
    assert route.mx_hosts == ("mx1.provider.test",)
    assert srv.count("later.test", "MX") == 2


async def test_cache_is_bounded(dns_server):
    srv = dns_server({"example.test": {"MX": "10 mx1.provider.test."}, **PROVIDER})
    router = router_for(srv, cache_size=1)  # MX, A and AAAA do not all fit
    await router.resolve("example.test")
    await router.resolve("example.test")
    assert srv.count("example.test", "MX") == 2
    router = router_for(srv, cache_size=0)
    srv.reset_counts()
    await router.resolve("example.test")
    await router.resolve("example.test")
    assert srv.count("example.test", "MX") == 2


async def test_concurrent_resolutions_share_one_query(dns_server):
    srv = dns_server({"example.test": {"MX": ["10 mx1.provider.test.", "20 mx2.provider.test."]}, **PROVIDER})
    router = router_for(srv)
    routes = await asyncio.gather(*(router.resolve("example.test") for _ in range(10)))
    assert {r.mx_hosts for r in routes} == {("mx1.provider.test", "mx2.provider.test")}
    assert srv.count("example.test", "MX") == 1
    assert srv.count("mx1.provider.test", "A") == 1
    assert srv.count("mx2.provider.test", "AAAA") == 1


async def test_cancelled_caller_does_not_cancel_shared_lookup(dns_server):
    srv = dns_server({"example.test": "TIMEOUT", **PROVIDER})
    router = router_for(srv, timeout="5s", attempt_timeout="0.2s")
    first = asyncio.create_task(router.resolve("example.test"))
    second = asyncio.create_task(router.resolve("example.test"))
    await asyncio.sleep(0.05)
    first.cancel()
    srv.set_fault("example.test", None)
    srv.set_records("example.test", "MX", "10 mx1.provider.test.")  # the retry gets an answer
    route = await asyncio.wait_for(second, 5)
    assert route.mx_hosts == ("mx1.provider.test",)
    assert first.cancelled()


# ----------------------------------------------------------------------------- static routes


async def test_static_routes_exact_suffix_wildcard(dns_server):
    srv = dns_server({"relay.internal.test": {"A": "127.0.0.51", "AAAA": "::1"}, **PROVIDER})
    router = router_for(srv, static={
        "exact.test": "127.0.0.2:2600",
        ".corp.test": "relay.internal.test:2601",
        "*": "[::1]:2602",
    })
    exact = await router.resolve("Exact.Test")
    assert exact.kind == "static"
    assert exact.hops == (Hop("127.0.0.2", "127.0.0.2", 2600, 0),)

    sub = await router.resolve("a.b.corp.test")
    assert [(h.mx_host, h.address, h.port) for h in sub.hops] == [
        ("relay.internal.test", "127.0.0.51", 2601),
        ("relay.internal.test", "::1", 2601),
    ]
    assert srv.count("relay.internal.test", "A") == 1
    assert srv.count("a.b.corp.test") == 0  # no MX lookup for a static route

    other = await router.resolve("corp.test")  # '.corp.test' covers subdomains only
    assert other.hops == (Hop("::1", "::1", 2602, 0),)
    assert (await router.resolve("anything.test")).site == other.site


async def test_static_route_wins_over_dns(dns_server):
    srv = dns_server({"example.test": {"MX": "10 mx1.provider.test."}, **PROVIDER})
    router = router_for(srv, static={"example.test": "127.0.0.3"})
    route = await router.resolve("example.test")
    assert route.hops == (Hop("127.0.0.3", "127.0.0.3", MX_PORT, 0),)  # no port: mx_port
    assert srv.count() == 0


async def test_static_route_to_unknown_host_is_permanent(dns_server):
    srv = dns_server({})
    err = await fails(router_for(srv, static={"example.test": "nowhere.test:25"}), "example.test")
    assert err.permanent is True


def test_static_route_config_is_validated():
    with pytest.raises(ValueError, match="out of range"):
        RoutingConfig.model_validate({"static": {"example.test": "127.0.0.1:70000"}})
    with pytest.raises(ValueError, match="not a valid domain"):
        RoutingConfig.model_validate({"static": {"bad domain": "127.0.0.1:25"}})
    with pytest.raises(ValueError, match="IP address"):
        RoutingConfig.model_validate({"nameservers": ["dns.example.test"]})
    with pytest.raises(ValueError, match="unknown|extra"):
        RoutingConfig.model_validate({"statics": {}})


# ----------------------------------------------------------------------------- site key, names


async def test_domains_at_one_provider_share_a_site(dns_server):
    srv = dns_server({
        "one.test": {"MX": ["10 mx1.provider.test.", "20 mx2.provider.test."]},
        "two.test": {"MX": ["5 MX2.provider.test.", "5 mx1.provider.test."]},
        "three.test": {"MX": ["10 mx3.provider.test."]},
        **PROVIDER,
    })
    router = router_for(srv)
    one, two, three = [await router.resolve(d) for d in ("one.test", "two.test", "three.test")]
    assert one.site == two.site == "mx1.provider.test,mx2.provider.test"
    assert three.site != one.site


async def test_idna_domain_is_encoded(dns_server):
    srv = dns_server({"xn--bcher-kva.test": {"MX": "10 mx1.provider.test."}, **PROVIDER})
    route = await router_for(srv).resolve("Bücher.test")
    assert route.domain == "xn--bcher-kva.test"
    assert route.mx_hosts == ("mx1.provider.test",)
    assert srv.count("xn--bcher-kva.test", "MX") == 1


@pytest.mark.parametrize("bad", ["", "   ", "a b.test", "x" * 64 + ".test", "a..test", "bad\u200b\u0000.test"])
async def test_invalid_domain_is_a_clear_permanent_error(dns_server, bad):
    srv = dns_server({})
    err = await fails(router_for(srv), bad)
    assert err.permanent is True
    assert srv.count() == 0


async def test_address_literal(dns_server):
    srv = dns_server({})
    router = router_for(srv, allow_address_literals=True)
    route = await router.resolve("[8.8.4.4]")
    assert route.hops == (Hop("8.8.4.4", "8.8.4.4", MX_PORT, 0),)
    route = await router.resolve("[IPv6:2001:4860:4860::8888]")
    assert route.hops[0].address == "2001:4860:4860::8888"
    assert (await fails(router, "[999.1.1.1]")).permanent is True
    assert srv.count() == 0


async def test_address_literals_refused_by_default(dns_server):
    """A literal would bypass MX and static routes (even '*'): refused unless allowed."""
    srv = dns_server({})
    router = router_for(srv, static={"*": "127.0.0.1:2600"})
    err = await fails(router, "[8.8.4.4]")
    assert err.permanent is True and "allow_address_literals" in err.reason
    assert srv.count() == 0


@pytest.mark.parametrize(
    "literal",
    ["[127.0.0.1]", "[10.1.2.3]", "[192.168.0.1]", "[172.16.0.1]", "[169.254.1.1]", "[0.0.0.0]",
     "[100.64.0.1]", "[224.0.0.1]", "[IPv6:::1]", "[IPv6:fe80::1]", "[IPv6:fd00::1]", "[IPv6:::ffff:127.0.0.1]"],
)
async def test_private_address_literals_are_never_delivered_to(dns_server, literal):
    router = router_for(dns_server({}), allow_address_literals=True)
    err = await fails(router, literal)
    assert err.permanent is True and "not a public address" in err.reason


async def test_zone_text_and_tcp_fallback(dns_server):
    """A large MX set does not fit in one UDP answer (EDNS 1232 bytes); the TC bit sends the resolver to TCP."""
    lines = "\n".join(f"big 300 IN MX {i} mx{i}.provider.test." for i in range(1, 150))
    srv = dns_server(f"$ORIGIN test.\n{lines}\nmx1.provider 300 IN A 127.0.0.11\n")
    route = await router_for(srv).resolve("big.test")
    assert route.mx_hosts[0] == "mx1.provider.test"
    assert [q.transport for q in srv.queries if q.rdtype == "MX"] == ["udp", "tcp"]


# ----------------------------------------------------------------------------- CLI


async def test_dns_route_cli(dns_server, capsys):
    srv = dns_server({"example.test": {"MX": "10 mx1.provider.test."}, "nomail.test": {"MX": "0 ."}, **PROVIDER})
    parser = argparse.ArgumentParser(prog="engine")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dns", "route", "example.test", "nomail.test", "--nameserver", srv.nameserver, "--json"])
    status = await args.func(args)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert status == 1
    assert lines[0]["ok"] is True
    assert lines[0]["site"] == "mx1.provider.test"
    assert lines[0]["hops"][0] == {"mx_host": "mx1.provider.test", "address": "127.0.0.11", "port": 25, "preference": 10}
    assert lines[1] == {"domain": "nomail.test", "ok": False, "permanent": True, "reason": NULL_MX_REASON}
