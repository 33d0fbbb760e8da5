"""``GET /metrics``: Prometheus text format.

Counters and histograms come from :mod:`engine.metrics` (summed across the worker processes
in multiprocess mode). What the database knows is read here at scrape time, so it is right
across processes and hosts: queue depth and readiness by stream, the oldest waiting message,
warm-up steps, active automation decisions, complaint and bounce rates per provider (24 h),
webhook backlogs, dead letters and lag per endpoint, unsubscribe lag, and this process's
database pool. Loopback (``[metrics] allow``) scrapes without a key; others need a key with
the ``metrics`` scope (or admin).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine import metrics
from engine.api.deps import context
from engine.api.responses import ApiError
from engine.db.pool import acquire
from engine.db.queries import q

router = APIRouter(tags=["operations"])
REPUTATION_WINDOW = 86400.0


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def _allowed(host: str | None, nets: list[str]) -> bool:
    if not host:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(n, strict=False) for n in nets)


async def _authorize(request: Request) -> None:
    ctx = context(request)
    if _allowed(request.client.host if request.client else None, ctx.settings.metrics.allow):
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "metrics from this address need an API key with the 'metrics' scope",
                       headers={"WWW-Authenticate": "Bearer"})
    key = await ctx.apikeys.verify(token.strip())
    if key is None:
        raise ApiError(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    if not key.allows("metrics"):
        raise ApiError(403, "this API key lacks the 'metrics' scope")


async def database_families(request: Request) -> list[Metric]:
    ctx = context(request)
    pool = ctx.outbox.pool
    out: list[Metric] = []
    async with acquire(pool) as conn:
        queue = await conn.fetch(*q("metrics_queue"))
        warm = await conn.fetch(*q("metrics_warmup"))
        decisions = await conn.fetch(*q("metrics_decisions"))
        rep = await conn.fetch(*q("metrics_reputation", seconds=REPUTATION_WINDOW))
        unsub = await conn.fetchval(*q("metrics_unsubscribe_lag"))
    depth = GaugeMetricFamily("engine_queue_depth", "Recipients waiting, by stream and state.", labels=["stream", "state"])
    ready = GaugeMetricFamily("engine_queue_ready", "Recipients due now, by stream.", labels=["stream"])
    ready_by: dict[str, int] = {}
    oldest = 0.0
    for r in queue:
        depth.add_metric([r["stream"], r["state"]], r["n"])
        ready_by[r["stream"]] = ready_by.get(r["stream"], 0) + r["ready"]
        oldest = max(oldest, r["oldest_seconds"] or 0.0)
    for stream, n in sorted(ready_by.items()):
        ready.add_metric([stream], n)
    out += [depth, ready, GaugeMetricFamily("engine_queue_oldest_age_seconds", "Age of the oldest waiting recipient.", value=oldest)]
    step = GaugeMetricFamily("engine_warmup_step", "Warm-up step per ramp (index into its schedule).", labels=["ramp"])
    sent = GaugeMetricFamily("engine_warmup_sent_today", "Warm-up units handed out today, per ramp.", labels=["ramp"])
    for r in warm:
        step.add_metric([r["key"]], r["step"])
        sent.add_metric([r["key"]], r["sent"])
    out += [step, sent]
    dec = GaugeMetricFamily("engine_automation_decisions_active", "Automation decisions in force.", labels=["action", "provider"])
    for r in decisions:
        dec.add_metric([r["action"], metrics.provider_label(r["provider"])], r["n"])
    out.append(dec)
    totals: dict[str, dict[str, int]] = {}
    for r in rep:
        totals.setdefault(r["provider"], {})[r["outcome"]] = int(r["n"])
    complaints = GaugeMetricFamily("engine_complaint_rate", "Complaints / delivered over 24 h, by provider.", labels=["provider"])
    bounces = GaugeMetricFamily("engine_bounce_rate", "Bounces / (delivered + bounced) over 24 h, by provider.", labels=["provider"])
    for provider, t in sorted(totals.items()):
        delivered, bounced = t.get("delivered", 0), t.get("bounced", 0)
        complaints.add_metric([provider], t.get("complained", 0) / delivered if delivered else 0.0)
        bounces.add_metric([provider], bounced / (delivered + bounced) if delivered + bounced else 0.0)
    out += [complaints, bounces]
    if ctx.webhooks is not None:
        rows = await ctx.webhooks.deliveries.status(datetime.now(UTC))
        pending = GaugeMetricFamily("engine_webhook_events_pending", "Events not yet delivered, per endpoint.", labels=["endpoint"])
        dead = GaugeMetricFamily("engine_webhook_events_dead_lettered", "Dead letters, per endpoint.", labels=["endpoint"])
        oldest_ev = GaugeMetricFamily("engine_webhook_oldest_pending_seconds", "Age of the oldest undelivered event.", labels=["endpoint"])
        p95 = GaugeMetricFamily("engine_webhook_event_lag_p95_seconds", "Event to 2xx, p95 over the last hour.", labels=["endpoint"])
        for w in rows:
            ep = str(w["id"])
            pending.add_metric([ep], w["pending"])
            dead.add_metric([ep], w["failed"])
            oldest_ev.add_metric([ep], w["oldest_pending_seconds"] or 0.0)
            p95.add_metric([ep], w["lag_p95_seconds"] or 0.0)
        out += [pending, dead, oldest_ev, p95]
    out.append(GaugeMetricFamily(
        "engine_unsubscribe_lag_seconds", "How long the oldest unsubscribe or consent change has waited for its webhook.",
        value=float(unsub or 0.0),
    ))
    db = GaugeMetricFamily("engine_db_pool_connections", "This process's database pool.", labels=["state"])
    db.add_metric(["open"], pool.get_size())
    db.add_metric(["idle"], pool.get_idle_size())
    db.add_metric(["max"], pool.get_max_size())
    out.append(db)
    return out


def _registry(families: list[Metric]) -> Any:
    directory = metrics.multiprocess_dir()
    if directory is None:
        metrics.get()  # the process's own counters exist even before the first increment
        registry = CollectorRegistry()
        registry.register(_Families([*families, *REGISTRY.collect()]))
        return registry
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    registry.register(_Families(families))
    return registry


@router.get("/metrics", include_in_schema=True, summary="Prometheus metrics (text exposition format)",
            response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def scrape(request: Request) -> Response:
    await _authorize(request)
    families = await database_families(request)
    return Response(generate_latest(_registry(families)), media_type=CONTENT_TYPE_LATEST)
