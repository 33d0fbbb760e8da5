"""``engine export run|status|backfill``: the analytics export from the command line."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from datetime import UTC, datetime
from typing import Any

from engine.commands import Subparsers
from engine.commands.output import add_json_flag
from engine.runtime import database, print_json, run_async


def register(sub: Subparsers) -> None:
    grp = sub.add_parser("export", help="events to Parquet for the warehouse").add_subparsers(dest="export_cmd", required=True)
    p = grp.add_parser("run", help="run the exporter alone (until SIGTERM); --once: one batch and exit")
    p.add_argument("--once", action="store_true")
    p.set_defaults(func=cmd_run)
    p = grp.add_parser("status", help="cursor position, lag and last file per destination")
    add_json_flag(p)
    p.set_defaults(func=cmd_status)
    p = grp.add_parser("backfill", help="rewrite the batches since DATE under the same names")
    p.add_argument("--since", required=True, type=_date, metavar="DATE", help="YYYY-MM-DD (UTC) or an ISO 8601 time")
    p.set_defaults(func=cmd_backfill)


def _date(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2026-11-30") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def cmd_run(args: argparse.Namespace) -> int:
    from engine.logging import configure

    configure()

    async def go() -> None:
        from engine.export.exporter import Exporter  # pyarrow: loaded by the export commands only

        async with database(args.settings) as pool:
            exporter = Exporter(args.settings, pool)
            if args.once:
                try:
                    while True:  # every batch that is there now
                        batch = await exporter.export_once()
                        if batch is None or batch.events < args.settings.export.batch_events:
                            return
                finally:
                    await exporter.close()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await exporter.run(stop)

    run_async(go())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    async def go() -> list[dict[str, Any]]:
        from engine.export.exporter import status

        async with database(args.settings) as pool:
            return await status(pool)

    rows: list[dict[str, Any]] = run_async(go())
    if args.json:
        for r in rows:
            print_json(r)
        return 0
    if not rows:
        print("nothing exported yet", file=sys.stderr)
    for r in rows:
        lag = "-" if r["lag_seconds"] is None else f"{r['lag_seconds']:.0f}s"
        print(f"{r['destination']}: exported {r['exported']} events; cursor at event {r['event_id']}; "
              f"{r['behind']} behind (oldest {lag}); last file {r['last_file'] or '-'}")
        if r["last_error"]:
            print(f"  last error at {r['last_error_at']:%Y-%m-%d %H:%M:%S}: {r['last_error']}")
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    async def go() -> tuple[int, int]:
        from engine.export.exporter import Exporter

        async with database(args.settings) as pool:
            return await Exporter(args.settings, pool).backfill(args.since)

    done, skipped = run_async(go())
    print(f"rewrote {done} batches" + (f"; skipped {skipped} whose events were purged since" if skipped else ""))
    return 0
