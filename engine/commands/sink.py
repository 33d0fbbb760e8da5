"""``engine sink list|show|clear``: what the development capture sink received (``[dev] capture_sink``).

Reads ``$ENGINE_HOME/sink/`` directly: no database, so it works while ``engine run`` is busy.
"""

from __future__ import annotations

import argparse
import sys
import time

from engine.commands import Subparsers
from engine.commands.output import add_json_flag, rows_out
from engine.devsink import Captured, captured, sink_dir
from engine.errors import EngineError


def register(sub: Subparsers) -> None:
    grp = sub.add_parser("sink", help="mail the development capture sink received ([dev] capture_sink)").add_subparsers(
        dest="sink_cmd", required=True)
    p = grp.add_parser("list", help="captured messages, oldest first")
    add_json_flag(p)
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for at least one message (delivery takes a moment)")
    p.set_defaults(func=cmd_sink_list)
    p = grp.add_parser("show", help="one captured message, exactly as received (ID, a unique prefix, or 'last')")
    p.add_argument("id")
    p.set_defaults(func=cmd_sink_show)
    p = grp.add_parser("clear", help="delete every captured message")
    p.set_defaults(func=cmd_sink_clear)


def cmd_sink_list(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.wait
    rows = captured(args.settings.home)
    while not rows and time.monotonic() < deadline:
        time.sleep(0.2)
        rows = captured(args.settings.home)
    rows_out(args, [c.as_json() for c in rows], [
        ("ID", "id"), ("RECEIVED", "received_at"), ("FROM", "mail_from"), ("TO", "rcpt_to"), ("SIZE", "size"),
        ("SUBJECT", "subject"),
    ], empty=f"no captured mail in {sink_dir(args.settings.home)}")
    return 0


def _find(rows: list[Captured], ident: str) -> Captured:
    if ident == "last" and rows:
        return rows[-1]
    hits = [c for c in rows if c.id.startswith(ident)]
    if len(hits) != 1:
        raise EngineError(f"{'no' if not hits else 'more than one'} captured message matches {ident!r} (see `engine sink list`)")
    return hits[0]


def cmd_sink_show(args: argparse.Namespace) -> int:
    msg = _find(captured(args.settings.home), args.id)
    sys.stdout.flush()
    sys.stdout.buffer.write(msg.path.read_bytes())
    sys.stdout.buffer.flush()
    return 0


def cmd_sink_clear(args: argparse.Namespace) -> int:
    rows = captured(args.settings.home)
    for c in rows:
        c.path.unlink(missing_ok=True)
        c.path.with_suffix(".json").unlink(missing_ok=True)
    print(f"deleted {len(rows)} captured message(s)")
    return 0
