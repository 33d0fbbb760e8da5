"""``engine dns check|route``: is a sending domain authenticated, and where would mail go.

``check [DOMAIN...]`` reports SPF, DKIM, DMARC, alignment and the bounce domain's MX of each
sending domain (every ``[[domains]]`` entry when none is named) and the reverse DNS of each
source address, through :mod:`engine.dnsauth.check` (the dashboard shows the same data); exit
status 1 when anything fails. ``route DOMAIN...`` asks the engine's own
:class:`engine.deliver.routing.Router` (static routes first, then MX, then implicit MX), so what
it prints is what delivery would do, one JSON line per domain. ``--nameserver`` and
``--timeout`` override the configured resolver for both.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
from typing import Any

from pydantic import ValidationError

from engine.commands import Subparsers
from engine.commands.output import add_json_flag, rows_out
from engine.deliver.routing import RouteError, Router, RoutingConfig
from engine.dnsauth.check import AuthChecker, AuthReport, Finding, SendingSetup
from engine.dnsauth.lookup import DnsLookup
from engine.errors import ConfigError


def _resolver_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nameserver", action="append", default=[], metavar="HOST:PORT",
        help="ask this DNS server instead of the configured/system one (repeatable)",
    )
    p.add_argument("--timeout", default=None, help="DNS timeout per lookup, e.g. '3s'")


def register(sub: Subparsers) -> None:
    """Add ``dns check [DOMAIN...]`` (authentication report) and ``dns route DOMAIN...`` (JSON lines)."""
    dns_parser = sub.add_parser("dns", help="DNS tools: authentication check, routes")
    dns_sub = dns_parser.add_subparsers(dest="dns_command", required=True)
    check = dns_sub.add_parser(
        "check", help="SPF, DKIM, DMARC, alignment, bounce MX of each sending domain; PTR of each source address",
    )
    check.add_argument("domains", nargs="*", metavar="DOMAIN", help="default: every [[domains]] entry")
    check.add_argument("--address", action="append", default=[], metavar="IP",
                       help="also check this source address (EHLO: [server] hostname); repeatable")
    check.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    _resolver_options(check)
    check.set_defaults(func=dns_check)
    route = dns_sub.add_parser("route", help="show where mail for each DOMAIN would go")
    route.add_argument("domains", nargs="+", metavar="DOMAIN")
    add_json_flag(route)
    _resolver_options(route)
    route.set_defaults(func=dns_route)


def _config_from_args(args: argparse.Namespace) -> RoutingConfig:
    settings = getattr(args, "settings", None)
    base = getattr(settings, "routing", None) or RoutingConfig()
    data = base.model_dump()
    if getattr(args, "nameserver", None):
        data["nameservers"] = args.nameserver
    if getattr(args, "timeout", None):
        data["timeout"] = args.timeout
    try:
        return RoutingConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
        )
        raise ConfigError(f"invalid dns check options: {problems}") from None


async def dns_check(args: argparse.Namespace) -> int:
    """Exit status 0 when nothing fails (warnings allowed), 1 otherwise."""
    for address in args.address:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(f"--address {address!r} is not an IP address") from None
    setup = SendingSetup.from_settings(args.settings, args.domains, args.address)
    if not setup.domains:
        raise ConfigError("no sending domain to check: name one (engine dns check example.com) or add [[domains]]")
    report = await AuthChecker(DnsLookup(_config_from_args(args))).run(setup)
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False), flush=True)
    else:
        print_report(report)
    return 0 if report.ok else 1


def _line(f: Finding) -> str:
    return f"  {f.status.upper():<5} {f.check:<16} {f.subject:<36} {f.detail}"


def print_report(report: AuthReport) -> None:
    for d in report.domains:
        print(f"{d.domain}: {'ok' if d.ok else 'PROBLEMS'}")
        for f in d.findings:
            print(_line(f))
            for s in f.data.get("sources", []) if f.check.startswith("spf") else []:
                print(f"  {'':<5} {'':<16} {'':<36}   {s['source']} {s['address']}: {s['result']}")
    print("sources:")
    for f in report.sources:
        print(_line(f))


async def dns_route(args: argparse.Namespace) -> int:
    """Exit status 0 when every domain has a route, 1 otherwise."""
    router = Router(_config_from_args(args))

    async def one(domain: str) -> dict[str, Any]:
        try:
            route = await router.resolve(domain)
        except RouteError as exc:
            return {"domain": exc.domain or domain, "ok": False, "permanent": exc.permanent, "reason": exc.reason}
        return {"ok": True, **route.to_dict()}

    results = await asyncio.gather(*(one(d) for d in args.domains))
    rows_out(args, results, [
        ("DOMAIN", "domain"), ("OK", lambda r: "yes" if r["ok"] else "NO"),
        ("HOPS", lambda r: " ".join(f"{h['mx_host']}={h['address']}:{h['port']}" for h in r.get("hops", [])) or "-"),
        ("REASON", lambda r: r.get("reason")),
    ])
    return 0 if all(r["ok"] for r in results) else 1
