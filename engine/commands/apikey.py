"""``engine apikey create|list|revoke|rotate|allow``: API keys for the REST API and the SMTP relay.

A key's secret is printed once, at creation or rotation; ``list`` never shows it. Every change
is recorded in the audit log as ``cli:<os user>``.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

import asyncpg

from engine.audit import Actor
from engine.commands import Subparsers
from engine.commands.output import add_json_flag
from engine.configtypes import parse_duration
from engine.runtime import database, print_json, run_async


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _expiry_options(p: argparse.ArgumentParser) -> None:
    when = p.add_mutually_exclusive_group()
    when.add_argument("--expires", metavar="DATE", help="refused from then on: 2027-01-01 or an ISO time (UTC unless given)")
    when.add_argument("--ttl", type=_duration, metavar="DURATION", help="refused after this long: 90d, 12h")


def register(sub: Subparsers) -> None:
    apikey = sub.add_parser("apikey", help="manage API keys").add_subparsers(dest="apikey_cmd", required=True)
    p = apikey.add_parser("create", help="create a key (printed once)")
    p.add_argument("--name", required=True)
    p.add_argument("--scopes", default="send", help="comma-separated: send,read,consent,admin (default: send)")
    p.add_argument("--allow", nargs="+", metavar="CIDR", default=[],
                   help="only from these client networks (HTTP and SMTP AUTH), e.g. 10.0.0.0/8; default: any address")
    _expiry_options(p)
    p.set_defaults(func=cmd_apikey_create)
    p = apikey.add_parser("list", help="list keys (never the secret)")
    add_json_flag(p)
    p.set_defaults(func=cmd_apikey_list)
    p = apikey.add_parser("revoke", help="revoke a key by name (with any of its keys still in rotation grace)")
    p.add_argument("--name", required=True)
    p.set_defaults(func=cmd_apikey_revoke)
    p = apikey.add_parser("rotate", help="a new key under the same name (printed once); the old one works for --grace")
    p.add_argument("--name", required=True)
    p.add_argument("--grace", type=_duration, default=86400.0, metavar="DURATION",
                   help="how long the old key keeps working: 24h (default), 2s, 0 (at once)")
    _expiry_options(p)
    p.set_defaults(func=cmd_apikey_rotate)
    p = apikey.add_parser("allow", help="set the client networks a key may be used from (replaces the list)")
    p.add_argument("--name", required=True)
    p.add_argument("cidrs", nargs="*", metavar="CIDR")
    p.add_argument("--any", action="store_true", help="clear the allowlist: any address")
    p.set_defaults(func=cmd_apikey_allow)


def cmd_apikey_create(args: argparse.Namespace) -> int:
    from engine.apikeys import ApiKeys, parse_expiry, parse_scopes

    expires_at = parse_expiry(args.expires, args.ttl)

    async def go() -> tuple[str, int]:
        async with database(args.settings) as pool:
            return await ApiKeys(pool).create(
                args.name, parse_scopes(args.scopes), allow=args.allow, expires_at=expires_at, actor=Actor.cli(),
            )

    key, key_id = run_async(go())
    extra = f", allowed from {', '.join(args.allow)}" if args.allow else ""
    extra += f", expires {expires_at:%Y-%m-%d %H:%M:%S} UTC" if expires_at else ""
    print(f"created API key {args.name!r} (id {key_id}, scopes {args.scopes}{extra}).")
    print("Store it now; it is shown only once:")
    print(key)
    return 0


def _state(r: asyncpg.Record, now: datetime) -> str:
    """One word: revoked, expired, rotated (still in its grace) or active."""
    if r["revoked_at"]:
        return "revoked"
    if r["expires_at"] is not None and r["expires_at"] <= now:
        return "expired"
    return "rotated" if r["rotated_at"] else "active"


def _status(r: asyncpg.Record, now: datetime) -> str:
    if r["revoked_at"]:
        return f"revoked {r['revoked_at']:%Y-%m-%d}"
    if r["expires_at"] is not None and r["expires_at"] <= now:
        return f"{'rotated, ' if r['rotated_at'] else ''}expired {r['expires_at']:%Y-%m-%d %H:%M}"
    if r["rotated_at"]:
        return f"rotated, valid until {r['expires_at']:%Y-%m-%d %H:%M:%S}"
    if r["expires_at"] is not None:
        return f"active until {r['expires_at']:%Y-%m-%d %H:%M}"
    return "active"


def cmd_apikey_list(args: argparse.Namespace) -> int:
    from engine.apikeys import ApiKeys

    async def go() -> list[asyncpg.Record]:
        async with database(args.settings) as pool:
            return await ApiKeys(pool).list()

    rows = run_async(go())
    now = datetime.now(UTC)
    if args.json:
        for r in rows:
            d = dict(r)
            d["allow"] = [str(n) for n in d.pop("allow_cidrs") or []]
            d["status"] = _state(r, now)
            print_json(d)
        return 0
    print(f"{'ID':>4}  {'NAME':<20} {'PREFIX':<12} {'SCOPES':<18} {'CREATED':<19}  {'LAST USED':<19}  {'ALLOW':<18} STATUS")
    for r in rows:
        used = f"{r['last_used_at']:%Y-%m-%d %H:%M:%S}" if r["last_used_at"] else "never"
        allow = ",".join(str(n) for n in r["allow_cidrs"]) if r["allow_cidrs"] else "any"
        print(
            f"{r['id']:>4}  {r['name']:<20} {r['prefix'] + '…':<12} {','.join(r['scopes']):<18} "
            f"{r['created_at']:%Y-%m-%d %H:%M:%S}  {used:<19}  {allow:<18} {_status(r, now)}"
        )
    return 0


def cmd_apikey_revoke(args: argparse.Namespace) -> int:
    from engine.apikeys import ApiKeys

    async def go() -> bool:
        async with database(args.settings) as pool:
            return await ApiKeys(pool).revoke(args.name, actor=Actor.cli())

    if run_async(go()):
        print(f"revoked API key {args.name!r}")
        return 0
    print(f"no active API key named {args.name!r}", file=sys.stderr)
    return 1


def cmd_apikey_rotate(args: argparse.Namespace) -> int:
    from engine.apikeys import ApiKeys, Rotated, parse_expiry

    expires_at = parse_expiry(args.expires, args.ttl)

    async def go() -> Rotated:
        async with database(args.settings) as pool:
            return await ApiKeys(pool).rotate(args.name, args.grace, expires_at=expires_at, actor=Actor.cli())

    done = run_async(go())
    print(f"rotated API key {args.name!r}: new key id {done.id}; the old key (id {done.old_id}) "
          f"works until {done.old_valid_until:%Y-%m-%d %H:%M:%S} UTC.")
    print("Store it now; it is shown only once:")
    print(done.key)
    return 0


def cmd_apikey_allow(args: argparse.Namespace) -> int:
    from engine.apikeys import ApiKeys
    from engine.errors import ValidationFailed

    if bool(args.cidrs) == bool(args.any):
        raise ValidationFailed("give the networks (CIDR ...) or --any, one of the two", "cidrs")

    async def go() -> list[str]:
        async with database(args.settings) as pool:
            return await ApiKeys(pool).set_allow(args.name, args.cidrs, actor=Actor.cli())

    nets = run_async(go())
    print(f"API key {args.name!r} may be used from: {', '.join(nets) if nets else 'any address'}")
    return 0
