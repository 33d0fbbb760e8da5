"""The ``engine`` command line (also ``python -m engine``).

Subcommands live with the module that owns their concern and are registered
here through a ``register(subparsers)`` function, so this file stays a table of
contents. Every command loads the config once (``--config`` wins over
``ENGINE_CONFIG``) and exits with a clear message and status 2 on a bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Callable
from typing import Any

from engine.config import load_settings
from engine.errors import ConfigError, EngineError
from engine.runtime import database, run_async
from engine.runtime import print_json as _print_json

# Modules contributing subcommands through register(subparsers); optional ones may be absent.
COMMAND_MODULES: tuple[str, ...] = (
    "engine.deliver.routing",
    "engine.compose.dkim",
    "engine.compose.render",
    "engine.compose.tracking",
    "engine.feedback.commands",
    "engine.suppression",
    "engine.feedback.reputation",
    "engine.commands.shaping",
)


# -- commands -------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from engine.app import serve
    from engine.logging import configure

    configure()
    run_async(serve(args.settings, args.workers))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from engine.app import run_worker
    from engine.logging import configure

    configure()
    run_async(run_worker(args.settings))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    async def go() -> None:
        async with database(args.settings) as pool:
            rows = await pool.fetch("SELECT version, name, applied_at FROM schema_migrations ORDER BY version")
        for r in rows:
            print(f"{r['version']:04d} {r['name']} applied {r['applied_at']:%Y-%m-%d %H:%M:%S}")
        print("database is up to date")

    run_async(go())
    return 0


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

    async def go() -> list[Any]:
        async with database(args.settings) as pool:
            return await ApiKeys(pool).list()

    rows = run_async(go())
    if args.json:
        for r in rows:
            _print_json(dict(r))
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


def cmd_queue_stats(args: argparse.Namespace) -> int:
    from engine.outbox import Outbox

    async def go() -> list[Any]:
        async with database(args.settings) as pool:
            return await Outbox(pool, args.settings.queue.max_age).stats()

    rows = run_async(go())
    if args.json:
        for r in rows:
            _print_json(dict(r))
        return 0
    totals: dict[str, int] = {}
    for r in rows:
        totals[r["state"]] = totals.get(r["state"], 0) + r["n"]
    print("by state: " + (", ".join(f"{k}={v}" for k, v in sorted(totals.items())) or "queue is empty"))
    if rows:
        print(f"{'STATE':<11} {'STREAM':<14} {'DOMAIN':<32} {'COUNT':>8}  NEXT ATTEMPT")
        for r in rows:
            nxt = f"{r['next_attempt_at']:%Y-%m-%d %H:%M:%S}" if r["next_attempt_at"] else ""
            print(f"{r['state']:<11} {r['stream']:<14} {r['domain']:<32} {r['n']:>8}  {nxt}")
    return 0


def _selector(args: argparse.Namespace) -> dict[str, Any]:
    import uuid as _uuid

    from engine.addresses import normalize_domain

    sel: dict[str, Any] = {"domain": normalize_domain(args.domain) if args.domain else None, "message_id": None}
    if args.message:
        try:
            sel["message_id"] = _uuid.UUID(args.message)
        except ValueError:
            raise EngineError(f"--message {args.message!r} is not a message id (a UUID)") from None
    return sel


def cmd_queue_list(args: argparse.Namespace) -> int:
    from engine.outbox import STATES, Outbox

    if args.state and args.state not in STATES:
        raise EngineError(f"--state must be one of {', '.join(STATES)}")

    async def go() -> list[Any]:
        async with database(args.settings) as pool:
            return await Outbox(pool, 0).list(state=args.state, limit=args.limit, **_selector(args))

    for r in run_async(go()):
        _print_json(dict(r))
    return 0


def cmd_queue_action(args: argparse.Namespace) -> int:
    from engine.outbox import Outbox

    sel = _selector(args)
    if args.action in ("hold", "purge") and not (sel["domain"] or sel["message_id"] or args.all):
        raise EngineError(f"queue {args.action} needs --domain, --message or --all")
    extra: dict[str, Any] = {}
    if args.action == "purge":
        extra["states"] = args.states.split(",")

    async def go() -> int:
        async with database(args.settings) as pool:
            return await Outbox(pool, 0).manage(args.action, **sel, **extra)

    n = run_async(go())
    print(f"{args.action}: {n} recipient(s)")
    return 0


# -- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine", description="Self-hosted email sending engine.")
    parser.add_argument("--config", help="TOML config file (default: $ENGINE_CONFIG, else built-in defaults)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run the engine (HTTP API, SMTP relay, delivery)")
    p.add_argument("--workers", type=int, default=None, help="delivery processes (default [delivery] workers, else one per core; 0 = none)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("worker", help="run one delivery worker process (engine run starts these itself)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("migrate", help="apply database migrations")
    p.set_defaults(func=cmd_migrate)

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

    queue = sub.add_parser("queue", help="inspect and manage the outbox").add_subparsers(dest="queue_cmd", required=True)
    p = queue.add_parser("stats", help="recipient counts by state, stream and domain")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_queue_stats)
    p = queue.add_parser("list", help="list recipients (JSON lines)")
    p.add_argument("--state")
    p.add_argument("--domain")
    p.add_argument("--message", help="a message id")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=cmd_queue_list)
    for action, text in (
        ("retry", "make deferred recipients ready now"),
        ("hold", "hold queued/deferred recipients (not delivered until released)"),
        ("release", "release held recipients"),
        ("purge", "end queued/deferred/held recipients as bounced ('purged by operator')"),
    ):
        p = queue.add_parser(action, help=text)
        p.add_argument("--domain")
        p.add_argument("--message", help="a message id")
        p.add_argument("--all", action="store_true", help="every matching recipient (hold/purge need a filter or --all)")
        if action == "purge":
            p.add_argument("--states", default="held", help="comma-separated states to purge (default: held)")
        p.set_defaults(func=cmd_queue_action, action=action)

    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.settings = load_settings(args.config)
        func: Callable[[argparse.Namespace], Any] = args.func
        result = func(args)
        if asyncio.iscoroutine(result):
            result = run_async(result)
        return int(result or 0)
    except ConfigError as exc:
        print(f"engine: {exc}", file=sys.stderr)
        return 2
    except EngineError as exc:
        print(f"engine: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
