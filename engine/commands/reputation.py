"""``engine reputation show``: delivery health per provider, source and sending domain.

A table for people, or one JSON object per line with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping

from engine.commands import Subparsers
from engine.commands.output import add_json_flag
from engine.configtypes import parse_duration
from engine.outcome.reputation import Counts, Reputation
from engine.runtime import database, run_async


def register(sub: Subparsers) -> None:
    """``engine reputation show [--provider P] [--window 24h] [--json]``."""
    grp = sub.add_parser("reputation", help="delivery health per provider, source and sending domain").add_subparsers(
        dest="reputation_cmd", required=True
    )
    p = grp.add_parser("show", help="delivered / deferred / bounced / complaints over a rolling window")
    p.add_argument("--provider", default=None, help="only this provider (shaping name, or recipient domain)")
    p.add_argument("--window", default="24h", type=_duration_arg, help="window length like 1h, 24h, 7d (default 24h)")
    add_json_flag(p)
    p.set_defaults(func=cmd_reputation_show)


def _duration_arg(text: str) -> str:
    """Reject a bad ``--window`` at parse time (usage error), keep the text for the message."""
    try:
        parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _fmt_pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def format_table(summary: Mapping[tuple[str, str, str], Counts]) -> list[str]:
    lines = [
        f"{'provider':<20} {'source':<14} {'domain':<24} {'deliv':>7} {'defer':>6} {'bounce':>6} {'hard':>5} "
        f"{'compl':>5} {'deliv%':>7} {'hard%':>6} {'compl%':>7}  top deferrals"
    ]
    for (provider, source, domain), c in sorted(summary.items()):
        top = ", ".join(f"{k or '-'}={v}" for k, v in sorted(c.deferred.items(), key=lambda kv: -kv[1])[:3])
        lines.append(
            f"{provider[:20]:<20} {(source or '-')[:14]:<14} {(domain or '-')[:24]:<24} {c.delivered:>7} "
            f"{c.deferred_total:>6} {c.bounced_total:>6} {c.hard_bounces:>5} {c.complaints:>5} "
            f"{_fmt_pct(c.delivered_ratio):>7} {_fmt_pct(c.hard_bounce_rate):>6} {_fmt_pct(c.complaint_rate):>7}  {top}"
        )
    return lines


def cmd_reputation_show(args: argparse.Namespace) -> int:
    seconds = parse_duration(args.window)

    async def go() -> dict[tuple[str, str, str], Counts]:
        async with database(args.settings) as pool:
            return await Reputation(pool).summary(args.provider, seconds)

    summary: dict[tuple[str, str, str], Counts] = run_async(go())
    if args.json:
        for (provider, source, domain), c in sorted(summary.items()):
            print(json.dumps({"provider": provider, "source": source, "sending_domain": domain, "window": seconds, **c.as_dict()}))
    elif not summary:
        print(f"(nothing recorded in the last {args.window})", file=sys.stderr)
    else:
        for line in format_table(summary):
            print(line)
    return 0
