"""``engine apikey create|list|revoke``: API keys for the REST API and the SMTP relay.

A key's secret is printed once, at creation; ``list`` never shows it.
"""

from __future__ import annotations

import argparse
import sys

import asyncpg

from engine.commands import Subparsers
from engine.runtime import database, print_json, run_async


def register(sub: Subparsers) -> None:
    apikey = sub.add_parser("apikey", help="manage API keys").add_subparsers(dest="apikey_cmd", required=True)
    p = apikey.add_parser("create", help="create a key (printed once)")
    p.add_argument("--name", required=True)
    p.add_argument("--scopes", default="send", help="comma-separated: send,read,admin (default: send)")
    p.set_defaults(func=cmd_apikey_create)
    p = apikey.add_parser("list", help="list keys (never the secret)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_apikey_list)
    p = apikey.add_parser("revoke", help="revoke a key by name")
    p.add_argument("--name", required=True)
    p.set_defaults(func=cmd_apikey_revoke)


def cmd_apikey_create(args: argparse.Namespace) -> int:
    from engine.apikeys import ApiKeys, parse_scopes

    async def go() -> tuple[str, int]:
        async with database(args.settings) as pool:
            return await ApiKeys(pool).create(args.name, parse_scopes(args.scopes))

    key, key_id = run_async(go())
    print(f"created API key {args.name!r} (id {key_id}, scopes {args.scopes}).")
    print("Store it now; it is shown only once:")
    print(key)
    return 0


def cmd_apikey_list(args: argparse.Namespace) -> int:
    from engine.apikeys import ApiKeys

    async def go() -> list[asyncpg.Record]:
        async with database(args.settings) as pool:
            return await ApiKeys(pool).list()

    rows = run_async(go())
    if args.json:
        for r in rows:
            print_json(dict(r))
        return 0
    print(f"{'ID':>4}  {'NAME':<24} {'PREFIX':<12} {'SCOPES':<18} {'CREATED':<20} STATUS")
    for r in rows:
        status = f"revoked {r['revoked_at']:%Y-%m-%d}" if r["revoked_at"] else "active"
        print(
            f"{r['id']:>4}  {r['name']:<24} {r['prefix'] + '…':<12} {','.join(r['scopes']):<18} "
            f"{r['created_at']:%Y-%m-%d %H:%M:%S}  {status}"
        )
    return 0


def cmd_apikey_revoke(args: argparse.Namespace) -> int:
    from engine.apikeys import ApiKeys

    async def go() -> bool:
        async with database(args.settings) as pool:
            return await ApiKeys(pool).revoke(args.name)

    if run_async(go()):
        print(f"revoked API key {args.name!r}")
        return 0
    print(f"no active API key named {args.name!r}", file=sys.stderr)
    return 1
