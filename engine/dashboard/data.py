"""What the dashboard shows, read through the modules that own the data.

Nothing here writes. The numbers come from the same places the API and ``/metrics`` read:
:func:`engine.api.metrics.database_families` (queue depth and age, warm-up, automation, complaint
and bounce rates, webhook backlog and lag, unsubscribe lag, database pool),
:func:`engine.shaping.status.live_state` (what ``engine shaping show`` prints: token buckets,
connection leases, warm-up state, suspensions, automation decisions), :meth:`Outbox.stats`,
:meth:`Suppressions.list` and :class:`~engine.consent.store.ConsentStore`. Rates come from the
database, so they are right across worker processes and hosts: the overview counts the events of
the last minute (``dashboard_event_counts``), the provider page sums the per-minute
``reputation_counters`` (``metrics_reputation``), the same rows the health pauses are decided from.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from fastapi import Request
from prometheus_client.core import Metric

from engine.api.metrics import database_families
from engine.consent.erasure import is_erased
from engine.db.pool import acquire
from engine.db.queries import q
from engine.shaping.limits import Shaping
from engine.shaping.rules import HealthSettings, Rate, ShapingError, load_shaping, resolve_path
from engine.shaping.status import live_state

if TYPE_CHECKING:
    from engine.api.deps import HttpContext
    from engine.config import Settings

log = structlog.get_logger(__name__)

RATE_WINDOW = 60.0
"""Overview rates: events of the last minute."""
PROVIDER_WINDOW = 300.0
"""Provider rates: the per-minute counters whose minute began in the last five minutes (the current one included)."""
DAY = 86400.0
MAX_PROVIDERS = 40
REPLIES_PER_PROVIDER = 5
WAITING = ("queued", "deferred", "leased", "held")


def samples(families: list[Metric]) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus families as ``{sample name: [(labels, value), ...]}``."""
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for fam in families:
        for s in fam.samples:
            out[s.name].append((dict(s.labels), float(s.value)))
    return out


def _max(values: list[tuple[dict[str, str], float]]) -> float:
    return max((v for _, v in values), default=0.0)


def _sum(values: list[tuple[dict[str, str], float]]) -> float:
    return sum(v for _, v in values)


@dataclass
class ShapingView:
    """The configured shaping file, re-read when it changes on disk; the last good one survives a bad edit."""

    settings: Settings
    shaping: Shaping | None = None
    error: str | None = None
    _stamp: tuple[str, float] | None = field(default=None, repr=False)

    def get(self) -> Shaping | None:
        path = resolve_path(self.settings)
        if path is None:
            self.shaping, self.error, self._stamp = None, None, None
            return None
        try:
            stamp = (str(path), os.stat(path).st_mtime)
        except OSError as exc:
            self.error = f"{path}: {exc.strerror}"
            return self.shaping
        if stamp != self._stamp:
            try:
                self.shaping, self.error = Shaping(load_shaping(path), str(path)), None
            except ShapingError as exc:
                self.error = str(exc)
            self._stamp = stamp
        return self.shaping


# --------------------------------------------------------------------------- overview


async def overview(request: Request, ctx: HttpContext) -> dict[str, Any]:
    cfg = ctx.settings.dashboard
    fam = samples(await database_families(request))
    async with acquire(ctx.outbox.pool) as conn:
        counts = {r["type"]: int(r["n"]) for r in await conn.fetch(*q("dashboard_event_counts", seconds=RATE_WINDOW))}
    by_stream: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(WAITING, 0))
    for labels, v in fam["engine_queue_depth"]:
        by_stream[labels["stream"]][labels["state"]] = int(v)
    ready = {labels["stream"]: int(v) for labels, v in fam["engine_queue_ready"]}
    oldest = _max(fam["engine_queue_oldest_age_seconds"])
    p95 = _max(fam.get("engine_webhook_event_lag_p95_seconds", []))
    oldest_event = _max(fam.get("engine_webhook_oldest_pending_seconds", []))
    unsub = _max(fam["engine_unsubscribe_lag_seconds"])
    pool = {labels["state"]: int(v) for labels, v in fam["engine_db_pool_connections"]}
    streams = [
        {"stream": s, **states, "ready": ready.get(s, 0), "waiting": sum(states.values())}
        for s, states in sorted(by_stream.items())
    ]
    return {
        "rates": {t: counts.get(t, 0) for t in ("accepted", "delivered", "deferred", "bounced", "suppressed", "complained")},
        "rate_window": int(RATE_WINDOW),
        "waiting": sum(s["waiting"] for s in streams),
        "ready": sum(ready.values()),
        "held": sum(s["held"] for s in streams),
        "streams": streams,
        "oldest": oldest, "oldest_level": cfg.level("queue_age", oldest),
        "webhooks": ctx.webhooks is not None,
        "events_pending": int(_sum(fam.get("engine_webhook_events_pending", []))),
        "events_dead": int(_sum(fam.get("engine_webhook_events_dead_lettered", []))),
        "event_lag_p95": p95, "event_lag_p95_level": cfg.level("event_lag", p95),
        "event_oldest": oldest_event, "event_oldest_level": cfg.level("event_lag", oldest_event),
        "unsubscribe_lag": unsub, "unsubscribe_lag_level": cfg.level("unsubscribe_lag", unsub),
        "decisions": int(_sum(fam["engine_automation_decisions_active"])),
        "pool": pool,
        "thresholds": cfg,
    }


# --------------------------------------------------------------------------- providers


def _per_minute(rate: Rate | None) -> float | None:
    return None if rate is None else rate.per_second * 60.0


async def providers(request: Request, ctx: HttpContext, view: ShapingView) -> dict[str, Any]:
    shaping = view.get()
    pool = ctx.outbox.pool
    live = await live_state(pool, shaping or Shaping(), [], None)
    fam = samples(await database_families(request))
    async with acquire(pool) as conn:
        recent = await conn.fetch(*q("metrics_reputation", seconds=PROVIDER_WINDOW))
        day = await conn.fetch(*q("metrics_reputation", seconds=DAY))
        replies = await conn.fetch(*q("dashboard_recent_replies", seconds=3600.0, limit=500))
    # The counters are per minute: the window covers whole minutes from the first one that began inside it
    # until now, so the average divides by that span (4 to 5 minutes), not by a nominal five.
    now = time.time()
    minutes = (now - math.ceil((now - PROVIDER_WINDOW) / 60.0) * 60.0) / 60.0
    totals: dict[str, dict[str, dict[str, int]]] = {"5m": {}, "24h": {}}
    for window, rows in (("5m", recent), ("24h", day)):
        for r in rows:
            totals[window].setdefault(r["provider"], {})[r["outcome"]] = int(r["n"])
    complaint = {labels["provider"]: v for labels, v in fam["engine_complaint_rate"]}
    bounce = {labels["provider"]: v for labels, v in fam["engine_bounce_rate"]}
    last: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in replies:
        if len(last[r["provider"]]) < REPLIES_PER_PROVIDER:
            last[r["provider"]].append(dict(r))
    health = shaping.file.default.health if shaping else HealthSettings()
    configured = list(shaping.file.provider) if shaping else []
    busiest = sorted(totals["24h"], key=lambda p: -sum(totals["24h"][p].values()))
    names = list(dict.fromkeys([*configured, *busiest]))[:MAX_PROVIDERS]
    default = shaping.file.default if shaping else None
    out = []
    for name in names:
        block = shaping.file.provider.get(name) if shaping else None
        group_rate = (block.provider_max_message_rate if block else None) or (default.provider_max_message_rate if default else None)
        path_rate = (block.max_message_rate if block else None) or (default.max_message_rate if default else None)
        group_conns = (block.provider_connection_limit if block else None) or (default.provider_connection_limit if default else None)
        path_conns = (block.connection_limit if block else None) or (default.connection_limit if default else None)
        five, whole = totals["5m"].get(name, {}), totals["24h"].get(name, {})
        delivered_per_min = five.get("delivered", 0) / minutes
        cap = _per_minute(group_rate)
        leases = live["open_connections"]
        group_key = f"conn:group:{name}" if block else None
        bucket = live["tokens"].get(f"rate:group:{name}") if block else None
        out.append({
            "name": name,
            "configured": block is not None,
            "match": [str(m) for m in block.match] if block else [],
            "delivered_5m": five.get("delivered", 0), "deferred_5m": five.get("deferred", 0),
            "bounced_5m": five.get("bounced", 0),
            "delivered_per_min": delivered_per_min,
            "cap_per_min": cap, "cap_text": str(group_rate) if group_rate else None,
            "cap_use": (delivered_per_min / cap) if cap else None,
            "path_cap_text": str(path_rate) if path_rate else None,
            "connections": (leases.get(group_key, {}).get("open", 0) if group_key else None),
            "connection_limit": group_conns, "path_connection_limit": path_conns,
            "tokens": bucket,
            "complaint_rate": complaint.get(name, 0.0), "complaint_threshold": health.complaint_rate,
            "complaints_24h": whole.get("complained", 0), "delivered_24h": whole.get("delivered", 0),
            "bounce_rate": bounce.get(name, 0.0), "bounce_threshold": health.bounce_rate,
            "bounced_24h": whole.get("bounced", 0),
            "decisions": [d for d in live["automation"] if d["provider"] == name],
            "replies": last.get(name, []),
        })
    return {
        "providers": out,
        "window_minutes": minutes,
        "health": health,
        "suspensions": live["suspensions"],
        "other_decisions": [d for d in live["automation"] if d["provider"] not in names],
        "shaping_file": shaping.source if shaping else None,
        "shaping_error": view.error,
    }


# --------------------------------------------------------------------------- warm-up


async def warmup(ctx: HttpContext, view: ShapingView) -> dict[str, Any]:
    shaping = view.get()
    live = await live_state(ctx.outbox.pool, shaping or Shaping(), [], None)
    ramps = shaping.file.warmup if shaping else {}
    rows = []
    seen = set()
    for key, st in sorted(live["warmup"].items()):
        parts = key.split(":")
        name = parts[0]
        block = ramps.get(name)
        seen.add(name)
        schedule = block.schedule if block else []
        cap = schedule[min(st["step"], len(schedule) - 1)] if schedule else None
        attempts = st["delivered"] + st["failed"]
        rows.append({
            "key": key, "ramp": name, "subject": parts[1] if len(parts) > 1 else "",
            "provider": parts[2] if len(parts) > 2 else "",
            "step": st["step"], "steps": len(schedule), "day": st["day"], "cap": cap, "sent": st["sent_today"],
            "use": (st["sent_today"] / cap) if cap else None,
            "delivered": st["delivered"], "failed": st["failed"],
            "delivered_ratio": (st["delivered"] / attempts) if attempts else None,
            "min_delivered_ratio": block.min_delivered_ratio if block else None,
            "last_health": st["last_health"], "configured": block is not None,
        })
    idle = [{"ramp": n, "sources": b.sources, "sending_domains": b.sending_domains, "first_cap": b.schedule[0]}
            for n, b in ramps.items() if n not in seen]
    return {"rows": rows, "idle": idle, "shaping_file": shaping.source if shaping else None, "shaping_error": view.error}


# --------------------------------------------------------------------------- queue


async def queue(ctx: HttpContext, domain: str | None = None, limit: int = 200) -> dict[str, Any]:
    """Waiting recipients by stream and domain (busiest first), plus totals of every state."""
    rows = await ctx.outbox.stats()
    by: dict[tuple[str, str], dict[str, Any]] = {}
    totals: dict[str, int] = defaultdict(int)
    for r in rows:
        totals[r["state"]] += r["n"]
        if r["state"] not in WAITING or (domain and r["domain"] != domain):
            continue
        row = by.setdefault((r["stream"], r["domain"]), {"stream": r["stream"], "domain": r["domain"], "next": None,
                                                          **dict.fromkeys(WAITING, 0)})
        row[r["state"]] += r["n"]
        if r["next_attempt_at"] is not None and (row["next"] is None or r["next_attempt_at"] < row["next"]):
            row["next"] = r["next_attempt_at"]
    lines = sorted(by.values(), key=lambda x: (-sum(x[s] for s in WAITING), x["domain"], x["stream"]))
    return {"rows": lines[:limit], "more": max(0, len(lines) - limit), "totals": dict(totals),
            "now": datetime.now(UTC), "domain": domain}


def affected(action: str, rows: list[dict[str, Any]]) -> int:
    """How many recipients a queue action on these rows would change (shown before it is confirmed)."""
    states = {"hold": ("queued", "deferred"), "retry": ("queued", "deferred"), "release": ("held",)}[action]
    return sum(int(r[s]) for r in rows for s in states)


# --------------------------------------------------------------------------- search


async def search(ctx: HttpContext, address: str) -> dict[str, Any]:
    """Suppressions and consent of one (normalized) address, as ``GET /v1/contacts/{address}`` reads them."""
    suppressions = ctx.acceptor.suppressions
    found: dict[str, Any] = {"address": address, "suppressions": [], "consent": [], "history": [], "erased": False,
                             "consent_enabled": ctx.consent is not None}
    if suppressions is not None:
        found["suppressions"] = await suppressions.list(address, 1000)
    if ctx.consent is not None:
        found["consent"] = await ctx.consent.store.current(address)
        found["history"] = await ctx.consent.store.history(address, 100)
        found["erased"] = await is_erased(ctx.consent.store.pool, address)
    return found
