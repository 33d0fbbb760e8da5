"""What shaping looks like from outside a worker: live state, reload notices, the workers' roll call.

Why a module of its own: ``engine shaping show``, ``engine reload`` and
``engine workers`` (in :mod:`engine.commands.shaping`) and the SIGHUP handler
of ``engine run`` (:func:`engine.app._reload`) need the same few reads and one
NOTIFY, and none of them should reach into argparse or into a worker's Gate.
The live state is what every worker shares in Postgres: tokens left in each
bucket, open connection leases, warm-up steps and today's counts, suspensions
and automation decisions. Each worker keeps its row in ``workers`` with the
sha256 of the shaping file it applied, so a reload can be confirmed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import asyncpg

from engine.db.pool import acquire
from engine.db.queries import q
from engine.errors import ConfigError
from engine.shaping.automation import Decision
from engine.shaping.limits import EffectiveLimits, Shaping
from engine.shaping.rules import load_shaping, resolve_path
from engine.shaping.warmup import units_for

if TYPE_CHECKING:
    from engine.config import Settings

RELOAD_CHANNEL = "engine_reload"


async def live_state(
    pool: asyncpg.Pool, shaping: Shaping, limits: list[EffectiveLimits], domain: str | None
) -> dict[str, Any]:
    """Buckets, leases, warm-ups and suspensions for these limits (all of them when ``limits`` is empty)."""
    every = not limits
    rate_keys = sorted({k for lim in limits for k in (lim.rate_key, lim.group_rate_key, lim.conn_rate_key)})
    conn_keys = sorted({k for lim in limits for k in (lim.conn_key, lim.group_conn_key)})
    warm_keys = sorted({u.key for lim in limits for d in _sending_domains(shaping)
                        for u in units_for(shaping, lim.source, d, lim.provider)})
    rate_keys += [f"warm:{k}" for k in warm_keys]
    async with acquire(pool) as conn:
        buckets = await conn.fetch(*q("throttle_state", keys=rate_keys, all=every))
        leases = await conn.fetch(*q("connection_lease_counts", keys=conn_keys, all=every))
        warm = await conn.fetch(*q("warmup_state", keys=warm_keys, all=every))
        susp = await conn.fetch(*q("suspension_list", domains=[domain.lower()] if domain else [], all=every))
        decided = await conn.fetch(*q("automation_active"))
    groups = {lim.group for lim in limits}
    automation: list[dict[str, Any]] = []
    if decided:
        now = decided[0]["now"]
        automation = [Decision.from_row(r).describe(now) for r in decided
                      if every or r["provider"] in groups or r["campaign"]]
    return {
        "tokens": {r["key"]: {"tokens": round(r["tokens"], 2), "rate_per_s": r["rate"], "burst": r["burst"]}
                   for r in buckets},
        "open_connections": {r["key"]: {"open": r["open"], "workers": r["owners"]} for r in leases},
        "warmup": {r["key"]: {"step": r["step"], "day": str(r["day"]), "sent_today": r["sent"],
                              "delivered": r["delivered"], "failed": r["failed"], "last_health": r["last_health"]}
                   for r in warm},
        "suspensions": {r["domain"]: {"until": str(r["until"]), "reason": r["reason"], "by": r["owner"]} for r in susp},
        # Automation decisions in force or ramping back: state active|ramping, current rate_factor / connection_cap.
        "automation": automation,
    }


def _sending_domains(shaping: Shaping) -> list[str]:
    return sorted({d for w in shaping.file.warmup.values() for d in w.sending_domains}) or [""]


async def notify_reload(pool: asyncpg.Pool, payload: str = "") -> None:
    async with acquire(pool) as conn:
        await conn.execute(*q("shaping_reload_notify", payload=payload))


def check_configured(settings: Settings) -> Shaping:
    """The configured shaping file, validated; raises ShapingError / ConfigError."""
    path = resolve_path(settings)
    if path is None:
        raise ConfigError("no shaping file to reload: set [shaping] file in the config")
    return Shaping(load_shaping(path), str(path))


def reload_status(worker: dict[str, Any], digest: str, reload_id: str) -> str:
    """applied | not yet | failed: <why> | shaping off, for one live worker and the file validated."""
    if worker["shaping_digest"] == digest:
        return "applied"
    if worker["shaping_digest"] is None:
        return "shaping off"
    if worker["reload_id"] == reload_id:
        return f"failed: {worker['reload_error']}" if worker["reload_error"] else "failed: its file differs"
    return "not yet"
