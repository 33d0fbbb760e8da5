"""``/healthz`` (alive) and ``/readyz`` (ready for traffic), for load balancers and orchestrators (no API key).

``/healthz`` answers whether this process works at all: the event loop runs and the database
answers a ping. ``/readyz`` answers whether this node should get traffic now: the database is
reachable, its schema is the one this code ships (no migration pending, none unknown: during a
rolling upgrade a node of the old release drops out of rotation as soon as the new release has
migrated, see :func:`engine.db.migrate.compare`), every configured listener of this process is
up, and the process is not shutting down. Orchestrators restart on a failing liveness probe and
only route to a passing readiness probe, so the two must not be the same check.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from engine import __version__
from engine.api.deps import HttpContext, get_ctx
from engine.api.responses import RETRY_AFTER_SECONDS
from engine.db import migrate
from engine.db.pool import acquire
from engine.db.queries import q
from engine.errors import DatabaseUnavailable

router = APIRouter()


@router.get("/healthz", summary="Liveness and database reachability")
async def healthz(ctx: HttpContext = Depends(get_ctx)) -> JSONResponse:
    try:
        async with acquire(ctx.outbox.pool) as conn:
            await conn.fetchval(*q("ping"), timeout=2)
    except (DatabaseUnavailable, TimeoutError) as exc:
        return JSONResponse(
            {"status": "degraded", "database": "unreachable", "error": str(exc)},
            status_code=503,
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )
    return JSONResponse({"status": "ok", "database": "ok", "version": __version__})


@router.get("/readyz", summary="Readiness: database reachable, schema current, listeners up")
async def readyz(ctx: HttpContext = Depends(get_ctx)) -> JSONResponse:
    """200 with ``status: ready``, else 503 with ``status: not ready`` and ``reasons`` (one line per failed check)."""
    reasons: list[str] = []
    body: dict[str, Any] = {"version": __version__}
    try:
        async with acquire(ctx.outbox.pool) as conn:
            rows = await conn.fetch(*q("schema_versions"), timeout=2)
        body["database"] = "ok"
        schema = migrate.compare([(r["version"], r["name"]) for r in rows])
        body["schema"] = {"code": schema.code_version, "database": schema.db_version}
        if schema.unknown:
            reasons.append(migrate.too_new_message(schema.unknown))
        elif schema.pending:
            reasons.append("migrations pending: " + ", ".join(f"{v:04d}" for v in schema.pending) + " (run engine migrate)")
    except (DatabaseUnavailable, TimeoutError) as exc:
        body["database"] = "unreachable"
        reasons.append(f"database unreachable: {exc}")
    listeners = ctx.listeners() if ctx.listeners is not None else {}
    body["listeners"] = {name: "up" if up else "down" for name, up in listeners.items()}
    down = sorted(name for name, up in listeners.items() if not up)
    if down:
        reasons.append("listeners not up: " + ", ".join(down))
    if ctx.stopping is not None and ctx.stopping():
        reasons.append("shutting down")
    if reasons:
        return JSONResponse({"status": "not ready", **body, "reasons": reasons}, status_code=503,
                            headers={"Retry-After": RETRY_AFTER_SECONDS})
    return JSONResponse({"status": "ready", **body})
