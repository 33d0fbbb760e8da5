"""``engine queue stats|list|retry|hold|release|purge``: the operator's view of the outbox.

Every change goes through :class:`engine.outbox.Outbox` (the only writer of
``recipients``); ``hold`` and ``purge`` refuse to run without a filter or
``--all`` so a typo cannot stop or end the whole queue.
"""

from __future__ import annotations

import argparse
import uuid
from typing import Any

import asyncpg

from engine.commands import Subparsers
from engine.commands.output import add_json_flag, rows_out
from engine.errors import EngineError
from engine.runtime import database, print_json, run_async

ACTIONS: tuple[tuple[str, str], ...] = (
    ("retry", "make deferred recipients ready now"),
    ("hold", "hold queued/deferred recipients (not delivered until released)"),
    ("release", "release held recipients"),
    ("purge", "end queued/deferred/held recipients as bounced ('purged by operator')"),
)


def register(sub: Subparsers) -> None:
    queue = sub.add_parser("queue", help="inspect and manage the outbox").add_subparsers(dest="queue_cmd", required=True)
    p = queue.add_parser("stats", help="recipient counts by state, stream and domain")
    add_json_flag(p)
    p.add_argument("--exact", action="store_true", help="count every row (a large queue is otherwise sampled)")
    p.set_defaults(func=cmd_queue_stats)
    p = queue.add_parser("list", help="list recipients")
    add_json_flag(p)
    p.add_argument("--state")
    p.add_argument("--domain")
    p.add_argument("--message", help="a message id")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=cmd_queue_list)
    for action, text in ACTIONS:
        p = queue.add_parser(action, help=text)
        p.add_argument("--domain")
        p.add_argument("--message", help="a message id")
        p.add_argument("--all", action="store_true", help="every matching recipient (hold/purge need a filter or --all)")
        if action == "purge":
            p.add_argument("--states", default="held", help="comma-separated states to purge (default: held)")
        p.set_defaults(func=cmd_queue_action, action=action)


def cmd_queue_stats(args: argparse.Namespace) -> int:
    from engine.outbox import Outbox

    async def go() -> list[asyncpg.Record]:
        async with database(args.settings) as pool:
            return await Outbox(pool, args.settings.queue.max_age).stats(exact=args.exact)

    rows = run_async(go())
    if args.json:
        for r in rows:
            print_json(dict(r))
        return 0
    totals: dict[str, int] = {}
    for r in rows:
        totals[r["state"]] = totals.get(r["state"], 0) + r["n"]
    estimate = " (estimate from a sample; --exact to count every row)" if any(r["estimate"] for r in rows) else ""
    print(f"by state{estimate}: " + (", ".join(f"{k}={v}" for k, v in sorted(totals.items())) or "queue is empty"))
    if rows:
        print(f"{'STATE':<11} {'STREAM':<14} {'DOMAIN':<32} {'COUNT':>8}  NEXT ATTEMPT")
        for r in rows:
            nxt = f"{r['next_attempt_at']:%Y-%m-%d %H:%M:%S}" if r["next_attempt_at"] else ""
            print(f"{r['state']:<11} {r['stream']:<14} {r['domain']:<32} {r['n']:>8}  {nxt}")
    return 0


def _selector(args: argparse.Namespace) -> dict[str, Any]:
    """``--domain`` and ``--message`` as the outbox's filter keywords."""
    from engine.addresses import normalize_domain

    sel: dict[str, Any] = {"domain": normalize_domain(args.domain) if args.domain else None, "message_id": None}
    if args.message:
        try:
            sel["message_id"] = uuid.UUID(args.message)
        except ValueError:
            raise EngineError(f"--message {args.message!r} is not a message id (a UUID)") from None
    return sel


def cmd_queue_list(args: argparse.Namespace) -> int:
    from engine.outbox import STATES, Outbox

    if args.state and args.state not in STATES:
        raise EngineError(f"--state must be one of {', '.join(STATES)}")

    async def go() -> list[asyncpg.Record]:
        async with database(args.settings) as pool:
            return await Outbox(pool, 0).list(state=args.state, limit=args.limit, **_selector(args))

    rows_out(args, [dict(r) for r in run_async(go())], [
        ("ID", "id"), ("MESSAGE", "message_id"), ("ADDRESS", "address"), ("STATE", "state"), ("STREAM", "stream"),
        ("ATTEMPTS", "attempts"), ("NEXT ATTEMPT", "next_attempt_at"), ("LAST", "last_reply"),
    ], empty="no recipients match")
    return 0


def cmd_queue_action(args: argparse.Namespace) -> int:
    from engine.audit import Actor, AuditLog
    from engine.outbox import Outbox

    sel = _selector(args)
    if args.action in ("hold", "purge") and not (sel["domain"] or sel["message_id"] or args.all):
        raise EngineError(f"queue {args.action} needs --domain, --message or --all")
    extra: dict[str, Any] = {}
    if args.action == "purge":
        extra["states"] = args.states.split(",")

    async def go() -> int:
        async with database(args.settings) as pool:
            n = await Outbox(pool, 0).manage(args.action, **sel, **extra)
            target = (f"domain={sel['domain']}" if sel["domain"] else "") + (
                f"{' ' if sel['domain'] else ''}message={sel['message_id']}" if sel["message_id"] else "")
            await AuditLog(pool).record(Actor.cli(), f"queue.{args.action}", target or "all", after={
                "recipients": n, "domain": sel["domain"], "message_id": sel["message_id"], **extra,
            })
            return n

    n = run_async(go())
    print(f"{args.action}: {n} recipient(s)")
    return 0
