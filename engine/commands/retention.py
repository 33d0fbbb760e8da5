"""``engine retention show|run``: what is kept how long, how big each table is, what is due.

``show`` reads only (sizes via ``pg_total_relation_size``, rows due counted with the same
conditions the purge uses); ``run`` makes one purge pass now, in the same small batches the
background task of ``engine run`` uses (:class:`engine.retention.purge.Retention`).
"""

from __future__ import annotations

import argparse
from typing import Any

from engine.commands import Subparsers
from engine.retention.purge import Retention
from engine.runtime import database, print_json, run_async


def register(sub: Subparsers) -> None:
    grp = sub.add_parser("retention", help="data retention: policy, table sizes, purge").add_subparsers(
        dest="retention_cmd", required=True
    )
    p = grp.add_parser("show", help="the [retention] policy, table sizes and rows due now")
    p.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    p.set_defaults(func=cmd_show)
    p = grp.add_parser("run", help="purge what is due now (one pass, in batches), then exit")
    p.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    p.set_defaults(func=cmd_run)


def duration_text(seconds: float | None) -> str:
    """``604800`` -> ``7d``; None -> ``never`` (kept forever)."""
    if seconds is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def size_text(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"  # pragma: no cover - the loop returns at GB


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _export(args: argparse.Namespace) -> str | None:
    """The exporter's destination when [export] is on: the purge keeps events it has not written."""
    export = args.settings.export
    return str(export.destination) if export.enabled else None


def cmd_show(args: argparse.Namespace) -> int:
    async def go() -> dict[str, Any]:
        async with database(args.settings) as pool:
            return await Retention(pool, args.settings.retention, export_destination=_export(args)).show()

    report: dict[str, Any] = run_async(go())
    report["caveats"] = args.settings.retention.caveats(args.settings.tracking)
    if args.json:
        print_json(report)
        return 0
    state = "on" if report["enabled"] else "off (set [retention] enabled = true)"
    print(f"background purge: {state}, every {duration_text(report['interval_seconds'])}, "
          f"{report['batch_size']:,} rows per batch")
    print(f"\n{'kind':<16} {'keep':<8} {'due now':>12}  purges what is older than")
    for p in report["policy"]:
        due = report["due"].get(p["kind"])
        print(f"{p['kind']:<16} {duration_text(p['keep_seconds']):<8} {_count(due):>12}  {p['before'] or '-'}")
    if report["due"].get("attempts") is not None:
        print(f"{'  (attempts)':<16} {'':<8} {_count(report['due']['attempts']):>12}  go with their recipients")
    print(f"\n{'table':<20} {'size':>10} {'rows (estimate)':>16}")
    for t in report["tables"]:
        print(f"{t['table']:<20} {size_text(t['bytes']):>10} {_count(t['estimated_rows']):>16}")
    print(f"\n{'partitioned by day':<20} {'days':>5}  {'oldest':<10}  {'newest':<10} {'size':>10} {'in default':>12}")
    for p in report["partitions"]:
        print(f"{p['table']:<20} {p['days']:>5}  {p['oldest_day'] or '-':<10}  {p['newest_day'] or '-':<10} "
              f"{size_text(p['bytes']):>10} {_count(p['default_estimated_rows']):>12}")
    for note in report["caveats"]:
        print(f"\nnote: {note}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    async def go() -> dict[str, Any]:
        async with database(args.settings) as pool:
            report = await Retention(pool, args.settings.retention, export_destination=_export(args)).purge()
        return {**report.counts, "skipped": report.skipped}

    counts: dict[str, Any] = run_async(go())
    if args.json:
        print_json(counts)
        return 0
    for kind, n in counts.items():
        if kind != "skipped":
            print(f"{kind:<16} {n:>12,}")
    for why in counts["skipped"]:
        print(f"skipped: {why}")
    return 0
