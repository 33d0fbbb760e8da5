"""``/healthz``: liveness plus database reachability, for load balancers and orchestrators (no API key)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from engine import __version__
from engine.api.deps import HttpContext, get_ctx
from engine.api.responses import RETRY_AFTER_SECONDS
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
