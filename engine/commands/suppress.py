"""``engine suppress add|remove|list``: the operator's hand on the suppression list.

Everything goes through :class:`engine.suppression.Suppressions`, the only
writer of the table; an operator's additions are recorded with source ``cli``.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import TypeVar

from engine.audit import Actor, AuditLog
from engine.commands import Subparsers
from engine.commands.output import add_json_flag, rows_out
from engine.runtime import database, run_async
from engine.suppression import GLOBAL, Suppression, Suppressions, configured_scope, normalize_address

T = TypeVar("T")


def register(sub: Subparsers) -> None:
    grp = sub.add_parser("suppress", help="manage the suppression list").add_subparsers(dest="suppress_cmd", required=True)
    p = grp.add_parser("add", help="stop mail to an address (for one stream, or '*' for all)")
    p.add_argument("address")
    p.add_argument("--scope", default=GLOBAL, help="a configured stream name, or '*' (default) for every stream")
    p.add_argument("--reason", default="manual")
    p.set_defaults(func=cmd_suppress_add)
    p = grp.add_parser("remove", help="lift a suppression")
    p.add_argument("address")
    p.add_argument("--scope", default=None, help="only this scope (default: every scope)")
    p.set_defaults(func=cmd_suppress_remove)
    p = grp.add_parser("list", help="recent suppressions")
    p.add_argument("--address", default=None)
    p.add_argument("--limit", type=int, default=100)
    add_json_flag(p)
    p.set_defaults(func=cmd_suppress_list)


def _run(args: argparse.Namespace, work: Callable[[Suppressions, AuditLog], Awaitable[T]]) -> T:
    """One piece of work against the suppression list (and the audit log) over a short-lived pool."""

    async def go() -> T:
        async with database(args.settings) as pool:
            return await work(Suppressions(pool), AuditLog(pool))

    result: T = run_async(go())
    return result


def cmd_suppress_add(args: argparse.Namespace) -> int:
    configured_scope(args.scope, args.settings.queue.streams)  # before any connection: a typo is exit 1

    async def add(s: Suppressions, audit: AuditLog) -> tuple[bool, int]:
        async with audit.transaction() as conn:  # the suppression and its audit row commit together
            new, moved = await s.suppress(args.address, args.scope, args.reason, "cli", conn=conn)
            await audit.record(
                Actor.cli(), "suppression.add", address=normalize_address(args.address),
                before={"suppressed": not new, "scope": args.scope},
                after={"scope": args.scope, "reason": args.reason, "created": new, "pending_suppressed": moved}, conn=conn,
            )
        return new, moved

    new, moved = _run(args, add)
    print(f"{'suppressed' if new else 'already suppressed'}: {args.address} ({args.scope})")
    if moved:
        print(f"{moved} queued recipient(s) will not be sent")
    return 0


def cmd_suppress_remove(args: argparse.Namespace) -> int:

    async def remove(s: Suppressions, audit: AuditLog) -> list[str]:
        scopes = await s.remove(args.address, args.scope)
        if scopes:
            await audit.record(Actor.cli(), "suppression.remove", address=normalize_address(args.address), before={"scopes": scopes})
        return scopes

    scopes = _run(args, remove)
    if not scopes:
        print(f"{args.address} was not suppressed")
        return 1
    print(f"removed {args.address} from: {', '.join(scopes)}")
    return 0


def cmd_suppress_list(args: argparse.Namespace) -> int:
    rows: list[Suppression] = _run(args, lambda s, _: s.list(args.address, args.limit))
    rows_out(args, [asdict(r) for r in rows], [
        ("CREATED", "created_at"), ("SCOPE", "scope"), ("ADDRESS", "address"), ("REASON", "reason"), ("SOURCE", "source"),
    ], empty="no suppressions")
    return 0
