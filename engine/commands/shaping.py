"""``engine shaping validate|show`` and ``engine reload``: the operator's view of traffic shaping.

``validate FILE`` checks a shaping file without touching anything (exit 0/1),
for CI and before a reload. ``show [DOMAIN]`` prints the effective limits of a
destination (its MX resolved by the engine's router, its provider matched) for
every egress source, with the live state every worker shares in Postgres:
tokens left in each bucket, open connection leases, warm-up steps and today's
counts, suspensions. ``reload`` validates the configured file and sends a
NOTIFY on ``engine_reload``: every worker on every host re-reads its file;
then it waits (``--wait``) until every live worker's row in ``workers`` carries
the sha256 of the file it validated, and says which did not. ``workers`` lists
the live and stale delivery workers.

Only the argparse side lives here: the reads, the NOTIFY and the reload
verdict per worker are :mod:`engine.shaping.status`, which ``engine run``'s
SIGHUP handler uses too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

from engine.audit import Actor, AuditLog
from engine.commands.output import add_json_flag
from engine.deliver.routing import RouteError, Router
from engine.errors import ConfigError
from engine.runtime import database, print_json, run_async
from engine.shaping.gate import read_shaping
from engine.shaping.limits import EffectiveLimits, Shaping
from engine.shaping.rules import ShapingError, load_shaping, resolve_path
from engine.shaping.status import live_state, notify_reload, reload_status
from engine.workers import WorkerRegistry

if TYPE_CHECKING:
    from engine.config import Settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sp = sub.add_parser("shaping", help="traffic shaping: validate a file, show effective limits and live state")
    ssub = sp.add_subparsers(dest="shaping_cmd", required=True)
    p = ssub.add_parser("validate", help="check a shaping file (unknown keys, bad rates, overlapping matches)")
    p.add_argument("file")
    p.set_defaults(func=cmd_validate)
    p = ssub.add_parser("show", help="effective limits for DOMAIN (or the whole file) and their live state")
    p.add_argument("domain", nargs="?")
    p.add_argument("--file", help="shaping file (default: [shaping] file of the config)")
    p.add_argument("--json", action="store_true", help="one JSON object on one line")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("reload", help="apply a changed shaping file to every running worker (validated first)")
    p.add_argument("--wait", type=float, default=10.0,
                   help="seconds to wait for every live worker to confirm (default 10; 0 = check once)")
    p.set_defaults(func=cmd_reload)
    p = sub.add_parser("workers", help="live and stale delivery workers and the shaping file each applied")
    add_json_flag(p)
    p.set_defaults(func=cmd_workers)


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        f = load_shaping(args.file)
    except ShapingError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"{args.file}: ok ({len(f.provider)} providers, {len(f.domain)} domains, {len(f.warmup)} warm-ups)")
    return 0


def _shaping_from(args: argparse.Namespace) -> Shaping:
    path = args.file if getattr(args, "file", None) else resolve_path(args.settings)
    if path is None:
        raise ConfigError("no shaping file: set [shaping] file in the config or pass --file")
    return Shaping(load_shaping(path), str(path))


def _sources(settings: Settings) -> list[str]:
    names = [s.name for p in settings.pools for s in p.sources]
    return names or ["default"]


def cmd_show(args: argparse.Namespace) -> int:
    return int(run_async(_show(args)))


async def _show(args: argparse.Namespace) -> int:
    shaping = _shaping_from(args)
    settings = args.settings
    out: dict[str, Any] = {"file": shaping.source}
    limits: list[EffectiveLimits] = []
    if args.domain:
        try:
            route = await Router(settings.routing).resolve(args.domain)
            out["route"] = {"site": route.site, "mx_hosts": list(route.mx_hosts), "kind": route.kind}
            site, mx = route.site, route.mx_hosts
        except RouteError as exc:
            out["route"] = {"error": exc.reason, "permanent": exc.permanent}
            site, mx = args.domain.lower(), ()
        limits = [shaping.limits(args.domain, site, mx, src) for src in _sources(settings)]
        out["limits"] = [lim.to_dict() for lim in limits]
    else:
        out["file_contents"] = shaping.file.model_dump(mode="json", exclude_none=True)
    async with database(settings) as pool:
        out["live"] = await live_state(pool, shaping, limits, args.domain)
    if args.json:
        print_json(out)
    else:
        print(json.dumps(out, default=str, indent=2))
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    return int(run_async(_reload(args)))


async def _reload(args: argparse.Namespace) -> int:
    path = resolve_path(args.settings)
    if path is None:
        print("reload refused: no shaping file, set [shaping] file in the config", file=sys.stderr)
        return 1
    try:
        shaping, digest = read_shaping(path)
    except ShapingError as exc:
        print(f"reload refused, the running engine keeps its current limits:\n{exc}", file=sys.stderr)
        return 1
    if args.wait < 0 or args.wait != args.wait:
        print("--wait must be a number of seconds >= 0", file=sys.stderr)
        return 1
    reload_id = uuid.uuid4().hex
    async with database(args.settings) as pool:
        await notify_reload(pool, json.dumps({"id": reload_id, "file": shaping.source, "digest": digest}))
        await AuditLog(pool).record(Actor.cli(), "shaping.reload", shaping.source, after={
            "sha256": digest, "providers": len(shaping.file.provider), "domains": len(shaping.file.domain),
            "reload_id": reload_id,
        })
        print(f"reload sent: workers re-read {shaping.source} "
              f"({len(shaping.file.provider)} providers, {len(shaping.file.domain)} domains, sha256 {digest[:12]})")
        deadline = time.monotonic() + min(args.wait, 3600.0)
        while True:
            live = [w for w in await WorkerRegistry(pool).list() if not w["stale"]]
            status = {w["owner"]: reload_status(w, digest, reload_id) for w in live}
            if all(s == "applied" for s in status.values()) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.2)
    if not live:
        print("no live workers: nothing to confirm (the next worker to start reads the file)")
        return 0
    for w in live:
        print(f"  {w['owner']:<32} {status[w['owner']]}")
    missing = [o for o, s in status.items() if s != "applied"]
    if missing:
        print(f"reload not confirmed by {len(missing)} of {len(live)} live worker(s): {', '.join(missing)}",
              file=sys.stderr)
        return 1
    print(f"reload applied by all {len(live)} live worker(s)")
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = run_async(_list_workers(args.settings))
    if args.json:
        for r in rows:
            r["state"] = "stale" if r["stale"] else "live"
            print_json(r)
        return 0
    if not rows:
        print("no workers", file=sys.stderr)
        return 0
    print(f"{'OWNER':<32} {'STATE':<6} {'SEEN':>7} {'STARTED':<19} {'DELIVERED':>9}  {'SHAPING':<12} {'APPLIED':<19} FILE")
    for r in rows:
        applied = f"{r['shaping_applied_at']:%Y-%m-%d %H:%M:%S}" if r["shaping_applied_at"] else ""
        digest = (r["shaping_digest"] or "off")[:12]
        note = f"  (last reload refused: {r['reload_error']})" if r["reload_error"] else ""
        print(f"{r['owner']:<32} {'stale' if r['stale'] else 'live':<6} {r['age_seconds']:>6.1f}s "
              f"{r['started_at']:%Y-%m-%d %H:%M:%S} {r['delivered']:>9}  {digest:<12} {applied:<19} "
              f"{r['shaping_source'] or ''}{note}")
    return 0


async def _list_workers(settings: Settings) -> list[dict[str, Any]]:
    async with database(settings) as pool:
        return await WorkerRegistry(pool).list()
