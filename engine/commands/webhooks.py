"""``engine webhooks add|list|rm|status|deliveries|replay|rotate|run``: endpoints from the command line.

Everything goes through the owners the API uses (:class:`engine.webhooks.endpoints.Endpoints`,
:class:`engine.webhooks.deliveries.Deliveries`), so a URL, type or stream is checked the same way.
The secret is printed once, at ``add`` and ``rotate``. ``run`` starts a dispatcher alone.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg

from engine.audit import Actor, AuditLog, replay_view, webhook_view
from engine.commands import Subparsers
from engine.commands.output import add_json_flag, rows_out
from engine.errors import ValidationFailed
from engine.events.public import PUBLIC_TYPES, event_id, parse_event_id
from engine.runtime import database, print_json, run_async
from engine.webhooks.deliveries import Deliveries
from engine.webhooks.endpoints import Endpoint, Endpoints

T = TypeVar("T")


def register(sub: Subparsers) -> None:
    grp = sub.add_parser("webhooks", help="webhook endpoints: signed events to your systems").add_subparsers(
        dest="webhooks_cmd", required=True
    )
    p = grp.add_parser("add", help="create an endpoint (prints its secret once)")
    p.add_argument("url")
    p.add_argument("--events", nargs="+", metavar="TYPE", help=f"only these types ({', '.join(sorted(PUBLIC_TYPES.values()))})")
    p.add_argument("--streams", nargs="+", metavar="STREAM", help="only these streams")
    p.add_argument("--batch", type=int, default=1, metavar="N", help="up to N events per request (default 1: unbatched)")
    p.add_argument("--batch-wait", type=float, default=1.0, metavar="SECONDS", help="wait this long for a full batch")
    p.add_argument("--description", default="")
    p.add_argument("--disabled", action="store_true", help="create it disabled")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_add)
    p = grp.add_parser("list", help="every endpoint")
    add_json_flag(p)
    p.set_defaults(func=cmd_list)
    p = grp.add_parser("rm", help="delete an endpoint and its deliveries")
    p.add_argument("id", type=uuid.UUID)
    p.set_defaults(func=cmd_rm)
    p = grp.add_parser("enable", help="enable an endpoint (also one a 410 disabled)")
    p.add_argument("id", type=uuid.UUID)
    p.set_defaults(func=cmd_enable)
    p = grp.add_parser("disable", help="stop sending to an endpoint")
    p.add_argument("id", type=uuid.UUID)
    p.set_defaults(func=cmd_disable)
    p = grp.add_parser("status", help="backlog, dead letters and lag per endpoint")
    p.add_argument("id", type=uuid.UUID, nargs="?")
    add_json_flag(p)
    p.set_defaults(func=cmd_status)
    p = grp.add_parser("deliveries", help="recent deliveries of an endpoint (--state failed: dead letters)")
    p.add_argument("id", type=uuid.UUID)
    p.add_argument("--state", choices=("pending", "sending", "delivered", "failed"))
    p.add_argument("--limit", type=int, default=50)
    add_json_flag(p)
    p.set_defaults(func=cmd_deliveries)
    p = grp.add_parser("replay", help="send again: dead letters, event ids, or a time range (same webhook-id)")
    p.add_argument("id", type=uuid.UUID)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--dead", action="store_true", help="every dead letter")
    what.add_argument("--event", nargs="+", metavar="EVT", help="event ids (evt_42)")
    what.add_argument("--since", type=_when, metavar="TIME", help="events at or after TIME (ISO 8601)")
    p.add_argument("--until", type=_when, metavar="TIME", help="with --since: events before TIME")
    p.set_defaults(func=cmd_replay)
    p = grp.add_parser("rotate", help="a new secret (printed once); the old one also signs for [webhooks] secret_overlap")
    p.add_argument("id", type=uuid.UUID)
    p.set_defaults(func=cmd_rotate)
    p = grp.add_parser("run", help="run a webhook dispatcher alone (engine run starts one too)")
    p.set_defaults(func=cmd_run)


def _when(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time like 2026-11-30T12:00:00Z") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _run(args: argparse.Namespace, work: Callable[[Endpoints, Deliveries], Awaitable[T]], *, wake: bool = False) -> T:
    """``work`` over the database; ``wake``: it changed endpoints or due deliveries, so running dispatchers look now."""

    async def go() -> T:
        async with database(args.settings) as pool:
            d = Deliveries(pool, args.settings.webhooks.transactional_streams)
            done = await work(Endpoints(pool, args.settings), d)
            if wake:
                await d.wake_dispatchers()
            return done

    result: T = run_async(go())
    return result


async def _audit(e: Endpoints, action: str, target: str, *, before: Endpoint | None = None,
                 after: Endpoint | dict[str, Any] | None = None) -> None:
    """Record a change made from the command line (right after it: the owner commits on its own)."""
    await AuditLog(e.pool).record(
        Actor.cli(), action, target,
        before=webhook_view(before.as_json()) if before is not None else None,
        after=webhook_view(after.as_json()) if isinstance(after, Endpoint) else after,
    )


def cmd_add(args: argparse.Namespace) -> int:
    async def add(e: Endpoints, d: Deliveries) -> tuple[Endpoint, str]:
        ep, secret = await e.create(
            args.url, events=args.events, streams=args.streams, description=args.description, enabled=not args.disabled,
            batch_max=args.batch, batch_wait=args.batch_wait,
        )
        await _audit(e, "webhook.create", str(ep.id), after=ep)
        return ep, secret

    ep, secret = _run(args, add, wake=True)
    if args.json:
        print_json({**ep.as_json(), "secret": secret})
    else:
        print(f"created webhook {ep.id} -> {ep.url}")
        print(f"secret (shown once, keep it): {secret}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    eps = _run(args, lambda e, d: e.list())
    rows_out(args, [ep.as_json() for ep in eps], [
        ("ID", "id"), ("URL", "url"),
        ("EVENTS", lambda r: r["events"] or "all"), ("STREAMS", lambda r: r["streams"] or "all"),
        ("BATCH", lambda r: r["batch"]["max_events"]),
        ("STATE", lambda r: "enabled" if r["enabled"] else f"disabled ({r.get('disabled_reason') or 'by an operator'})"),
    ], empty="no webhook endpoints")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    async def rm(e: Endpoints, d: Deliveries) -> None:
        before = await e.get(args.id)
        await e.delete(args.id)
        await _audit(e, "webhook.delete", str(args.id), before=before)

    _run(args, rm, wake=True)
    print(f"deleted webhook {args.id}")
    return 0


async def _set_enabled(e: Endpoints, endpoint_id: uuid.UUID, enabled: bool) -> None:
    before = await e.get(endpoint_id)
    after = await e.update(endpoint_id, enabled=enabled)
    await _audit(e, "webhook.update", str(endpoint_id), before=before, after=after)


def cmd_enable(args: argparse.Namespace) -> int:
    _run(args, lambda e, d: _set_enabled(e, args.id, True), wake=True)
    print(f"enabled webhook {args.id}")
    return 0


def cmd_disable(args: argparse.Namespace) -> int:
    _run(args, lambda e, d: _set_enabled(e, args.id, False), wake=True)
    print(f"disabled webhook {args.id}")
    return 0


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}s"


def cmd_status(args: argparse.Namespace) -> int:
    async def work(e: Endpoints, d: Deliveries) -> tuple[list[Any], list[dict[str, Any]]]:
        return await e.list(), await d.status(datetime.now(UTC), args.id)

    eps, rows = _run(args, work)
    urls = {ep.id: ep for ep in eps}
    if args.id is not None and args.id not in urls:
        raise ValidationFailed(f"no webhook endpoint {args.id}", field="id")

    def shown_url(r: Mapping[str, Any]) -> str:
        ep: Endpoint = urls[uuid.UUID(r["id"])]
        return ep.url + ("" if ep.enabled else f"  (disabled: {ep.disabled_reason or 'by an operator'})")

    rows_out(args, [{**r, "id": str(r["id"]), "url": urls[r["id"]].url} for r in rows], [
        ("ENDPOINT", "id"), ("PENDING", "pending"), ("RETRYING", "retrying"), ("DEAD", "failed"),
        ("OLDEST", lambda r: _secs(r["oldest_pending_seconds"])), ("P50", lambda r: _secs(r["lag_p50_seconds"])),
        ("P95", lambda r: _secs(r["lag_p95_seconds"])), ("URL", shown_url),
    ], empty="no webhook endpoints")
    return 0


def cmd_deliveries(args: argparse.Namespace) -> int:
    rows: list[asyncpg.Record] = _run(args, lambda e, d: d.list(args.id, state=args.state, limit=args.limit))
    rows_out(args, [{**dict(r), "event_id": event_id(r["event_id"])} for r in rows], [
        ("ID", "id"), ("EVENT", "event_id"), ("STATE", "state"), ("ATTEMPTS", "attempts"), ("LANE", "lane"),
        ("LAST", lambda r: f"{r['last_status'] or ''} {r['last_error'] or ''}".strip() or "-"),
    ], empty="no deliveries")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    ids = [parse_event_id(t, field="--event") for t in args.event] if args.event else None
    if args.until is not None and args.since is None:
        raise ValidationFailed("--until needs --since", field="--until")
    n = _run(args, lambda e, d: _replay(e, d, args, ids), wake=True)
    print(f"queued {n} deliveries for {args.id}")
    return 0


async def _replay(e: Endpoints, d: Deliveries, args: argparse.Namespace, ids: list[int] | None) -> int:
    await e.get(args.id)
    n = await d.replay(args.id, datetime.now(UTC), dead_letters=args.dead, event_ids=ids, since=args.since, until=args.until)
    await _audit(e, "webhook.replay", str(args.id), after=replay_view(args.dead, args.event, args.since, args.until, n))
    return n


def cmd_rotate(args: argparse.Namespace) -> int:
    async def rotate(e: Endpoints, d: Deliveries) -> tuple[Endpoint, str]:
        ep, secret = await e.rotate(args.id)
        await _audit(e, "webhook.rotate", str(ep.id), after={"secret_rotation_ends_at": ep.rotating_until})
        return ep, secret

    ep, secret = _run(args, rotate, wake=True)
    until = ep.rotating_until.isoformat() if ep.rotating_until else "-"
    print(f"new secret (shown once, keep it): {secret}")
    print(f"the previous secret also signs until {until}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from engine.app import run_dispatcher
    from engine.logging import configure

    configure(args.settings.logging)
    run_async(run_dispatcher(args.settings))
    return 0
