"""``engine dns check DOMAIN...``: where mail for each domain would go, one JSON line per domain.

It asks the engine's own :class:`engine.deliver.routing.Router` (static routes
first, then MX, then implicit MX), so what it prints is what delivery would
do; ``--nameserver`` and ``--timeout`` override the configured resolver.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from pydantic import ValidationError

from engine.commands import Subparsers
from engine.deliver.routing import RouteError, Router, RoutingConfig
from engine.errors import ConfigError


def register(sub: Subparsers) -> None:
    """Add ``dns check DOMAIN...``: print each domain's route or failure as one JSON line."""
    dns_parser = sub.add_parser("dns", help="DNS routing tools")
    dns_sub = dns_parser.add_subparsers(dest="dns_command", required=True)
    check = dns_sub.add_parser("check", help="show where mail for each DOMAIN would go (JSON lines)")
    check.add_argument("domains", nargs="+", metavar="DOMAIN")
    check.add_argument(
        "--nameserver", action="append", default=[], metavar="HOST:PORT",
        help="ask this DNS server instead of the configured/system one (repeatable)",
    )
    check.add_argument("--timeout", default=None, help="DNS timeout per lookup, e.g. '3s'")
    check.set_defaults(func=dns_check)


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
    """Exit status 0 when every domain has a route, 1 otherwise."""
    router = Router(_config_from_args(args))

    async def one(domain: str) -> dict[str, Any]:
        try:
            route = await router.resolve(domain)
        except RouteError as exc:
            return {"domain": exc.domain or domain, "ok": False, "permanent": exc.permanent, "reason": exc.reason}
        return {"ok": True, **route.to_dict()}

    results = await asyncio.gather(*(one(d) for d in args.domains))
    for result in results:
        print(json.dumps(result, ensure_ascii=False), flush=True)
    return 0 if all(r["ok"] for r in results) else 1
