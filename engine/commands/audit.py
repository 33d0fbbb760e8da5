"""``engine audit``: the audit log, for people (a table) or a SIEM (``--json``: NDJSON).

Reads through :mod:`engine.audit` in commit order, like ``GET /v1/audit``: ``--after`` takes
the ``cursor`` of the last line a previous run printed, so a shipper resumes without gaps.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from engine.commands import Subparsers
from engine.commands.output import add_json_flag
from engine.configtypes import parse_duration
from engine.runtime import database, print_json, run_async


def _when(text: str) -> datetime:
    """An ISO time (UTC unless given) or a duration back from now (``24h``, ``7d``)."""
    try:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an ISO time (2026-11-30T12:00:00Z) nor a duration (24h)") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def register(sub: Subparsers) -> None:
    p = sub.add_parser("audit", help="the audit log of admin actions (--json: NDJSON for a SIEM)")
    p.add_argument("--since", type=_when, metavar="TIME", help="rows at or after TIME: ISO 8601, or a duration back (24h)")
    p.add_argument("--until", type=_when, metavar="TIME", help="rows before TIME")
    p.add_argument("--action", help="an action (apikey.rotate) or a family (queue.*)")
    p.add_argument("--actor", help="an API key name, or cli:<user>")
    p.add_argument("--target", help="what was acted on: a name, an id, or an email address (matched by its hash)")
    p.add_argument("--after", metavar="CURSOR", help="resume after this cursor (the 'cursor' of the last row printed)")
    p.add_argument("--limit", type=int, default=None, help="at most this many rows (default: all)")
    add_json_flag(p)
    p.set_defaults(func=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    from engine.audit import AuditLog, audit_target, check_action
    from engine.events.public import Cursor

    filters: dict[str, Any] = {
        "action": check_action(args.action, "--action"), "actor": args.actor, "target": audit_target(args.target, "--target"),
        "since": args.since, "until": args.until,
    }
    cursor = Cursor.decode(args.after, "--after") if args.after else Cursor()
    limit = args.limit

    async def go() -> int:
        n = 0
        async with database(args.settings) as pool:
            log = AuditLog(pool)
            pos = cursor
            if not args.json:
                print(f"{'AT':<19}  {'ACTOR':<24} {'FROM':<15} {'ACTION':<18} {'TARGET':<30} CHANGE")
            while limit is None or n < limit:
                page = await log.page(pos, limit=min(1000, limit - n) if limit is not None else 1000, **filters)
                for e in page.entries:
                    _print(e, args.json)
                n += len(page.entries)
                if not page.has_more:
                    break
                pos = page.next
        return n

    n = run_async(go())
    if not args.json and n == 0:
        print("(no audit rows)", file=sys.stderr)
    return 0


def _print(e: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(e)
        return
    change = json.dumps({k: e[k] for k in ("before", "after") if e[k] is not None}, default=str, separators=(",", ":"))
    at = datetime.fromisoformat(e["at"]).astimezone(UTC)
    print(f"{at:%Y-%m-%d %H:%M:%S}  {e['actor'][:24]:<24} {e['source_ip'] or '-':<15} {e['action']:<18} "
          f"{(e['target'] or '-')[:30]:<30} {change[:200]}")
