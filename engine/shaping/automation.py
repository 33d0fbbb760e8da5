"""Traffic shaping automation: slow down or pause on the signals mailbox providers give.

Why: a provider that answers ``421 4.7.28`` (Gmail), ``[TSS04]`` (Yahoo) or
``S3150`` (Microsoft) is telling the sender to back off *before* it blocks it.
Rules in the shaping file (``[[provider.X.automation]]``, ``[[default.automation]]``)
say which replies count, how many make a trigger and what to do; this module
turns matching results into *decisions* stored in Postgres (``shaping_decisions``),
so every worker on every host obeys them, and lets limits come back gradually:

* :func:`evaluate_results` runs inside the outcome writer's flush transaction:
  it matches the flushed results against the provider's rules, counts matches
  per rule per period across workers (``shaping_rule_hits``), and starts or
  extends decisions; a new episode writes a ``shaping_decision`` event.
* :func:`evaluate_health` runs every ``[default.health] evaluate_every`` from
  :meth:`engine.shaping.gate.Gate.maintain`: one query for providers whose
  complaint rate is above the threshold (bulk streams pause), one for campaigns
  whose hard bounce rate is (the campaign is held).
* :class:`Decisions` is each worker's cache of the decisions in force (re-read
  every ``[default.health] refresh``), applied to effective limits by the Gate.

Recovery: a decision holds fully until ``expires_at`` (each new match pushes it
back), then limits come back in ``ramp_steps`` steps of ``ramp_step``: a rate
factor ``f`` goes ``f -> f + (1-f)/(n+1) -> ... -> 1``; a suspension resumes at
the rule's ``factor`` and ramps the same way; a connection cap doubles per step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog

from engine.db.pool import acquire
from engine.db.queries import q
from engine.errors import DatabaseUnavailable
from engine.events.store import Event, record_events
from engine.shaping.limits import EffectiveLimits, Shaping
from engine.shaping.rules import AutomationRule, HealthSettings, Rate

log = structlog.get_logger(__name__)

EVENT_TYPE = "shaping_decision"
ALL_SOURCES = "*"


@dataclass(frozen=True, slots=True)
class Signal:
    """One flushed SMTP result as automation sees it."""

    provider: str
    source: str
    reply: str
    category: str | None


@dataclass(frozen=True, slots=True)
class Decision:
    rule: str
    provider: str
    source: str
    campaign: str
    action: str
    params: dict[str, Any]
    reason: str
    started_at: datetime
    expires_at: datetime
    ramp_until: datetime

    @classmethod
    def from_row(cls, r: Any) -> Decision:
        params = r["params"]
        if isinstance(params, str):
            params = json.loads(params)
        return cls(r["rule"], r["provider"], r["source"], r["campaign"], r["action"], params or {}, r["reason"],
                   r["started_at"], r["expires_at"], r["ramp_until"])

    def state(self, now: datetime) -> tuple[str, float]:
        """('active', 0) while the action holds, ('ramping', fraction restored 0..1), or ('over', 1)."""
        if now < self.expires_at:
            return "active", 0.0
        if now >= self.ramp_until:
            return "over", 1.0
        steps = int(self.params.get("ramp_steps", 0))
        step_len = float(self.params.get("ramp_step", 0.0)) or 1.0
        k = min(steps, 1 + int((now - self.expires_at).total_seconds() // step_len))
        return "ramping", k / (steps + 1)

    def describe(self, now: datetime) -> dict[str, Any]:
        state, frac = self.state(now)
        out: dict[str, Any] = {
            "rule": self.rule, "provider": self.provider, "source": self.source, "campaign": self.campaign,
            "action": self.action, "reason": self.reason, "state": state, "started_at": str(self.started_at),
            "expires_at": str(self.expires_at), "ramp_until": str(self.ramp_until),
        }
        if self.action in ("reduce_rate", "suspend", "suspend_provider"):
            out["rate_factor"] = round(self.rate_factor(now), 4)
        if self.action == "cap_connections":
            out["connection_cap"] = self.connection_cap(now)
        return out

    def rate_factor(self, now: datetime) -> float:
        state, frac = self.state(now)
        base = float(self.params.get("factor", 0.5))
        if state == "active":
            return 0.0 if self.action in ("suspend", "suspend_provider") else base
        return base + (1 - base) * frac if state == "ramping" else 1.0

    def connection_cap(self, now: datetime) -> int | None:
        state, frac = self.state(now)
        if state == "over":
            return None
        limit = int(self.params.get("limit", 1))
        if state == "active":
            return limit
        steps = int(self.params.get("ramp_steps", 0))
        cap: int = limit * 2 ** max(1, round(frac * (steps + 1)))
        return cap


def _now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- reading and applying


@dataclass
class Verdict:
    limits: EffectiveLimits
    blocked: str = ""  # non-empty: do not send now (the reason)
    wait: float = 0.0


class Decisions:
    """One worker's cache of the decisions in force, re-read every ``refresh`` seconds."""

    def __init__(self, pool: asyncpg.Pool, refresh: float = 1.0) -> None:
        self.pool = pool
        self.refresh = refresh
        self.items: list[Decision] = []
        self._loaded = -math.inf
        self._loading: asyncio.Future[None] | None = None
        self._skew = 0.0  # database clock - local clock, seconds

    def now(self) -> datetime:
        return datetime.fromtimestamp(time.time() + self._skew, UTC)

    async def maybe_refresh(self) -> None:
        if time.monotonic() - self._loaded < self.refresh:
            return
        if self._loading is not None:
            await asyncio.shield(self._loading)
            return
        self._loading = asyncio.get_running_loop().create_future()
        try:
            async with acquire(self.pool) as conn:
                rows = await conn.fetch(*q("automation_active"))
            self.items = [Decision.from_row(r) for r in rows]
            if rows:
                self._skew = rows[0]["now"].timestamp() - time.time()
        except DatabaseUnavailable as exc:
            log.warning("automation_refresh_failed", error=str(exc))  # keep obeying what we knew
        finally:
            self._loaded = time.monotonic()
            self._loading.set_result(None)
            self._loading = None

    def add(self, d: Decision) -> None:
        """A decision this worker just made: obey it now, before the next refresh."""
        self.items = [x for x in self.items if (x.rule, x.provider, x.source, x.campaign)
                      != (d.rule, d.provider, d.source, d.campaign)] + [d]

    def apply(self, lim: EffectiveLimits, stream: str = "", campaign: str = "",
              bulk_streams: Sequence[str] = ()) -> Verdict:
        """Effective limits under the decisions in force for this destination, source, stream and campaign."""
        now = self.now()
        factor = 1.0
        cap: int | None = None
        floor: Rate | None = None
        for d in self.items:
            if d.action == "hold_campaign":
                if campaign and d.campaign == campaign and now < d.expires_at:
                    return Verdict(lim, f"campaign {campaign} held: {d.reason}", (d.expires_at - now).total_seconds())
                continue
            if d.provider != lim.group or d.source not in (ALL_SOURCES, lim.source):
                continue
            if d.action == "pause_bulk":
                streams = d.params.get("streams") or list(bulk_streams)
                if stream in streams and now < d.expires_at:
                    return Verdict(lim, f"bulk to {d.provider} paused: {d.reason}", (d.expires_at - now).total_seconds())
                continue
            if d.action in ("suspend", "suspend_provider", "reduce_rate"):
                f = d.rate_factor(now)
                if f == 0.0:
                    return Verdict(lim, f"{d.provider} suspended: {d.reason}", (d.expires_at - now).total_seconds())
                if f < factor:
                    factor = f
                    fl = d.params.get("floor")
                    floor = Rate(fl[0], fl[1]) if fl else None
            elif d.action == "cap_connections":
                c = d.connection_cap(now)
                if c is not None:
                    cap = c if cap is None else min(cap, c)
        if factor >= 1.0 and cap is None:
            return Verdict(lim)
        changes: dict[str, Any] = {}
        if factor < 1.0:
            floor_ps = floor.per_second if floor else 1.0
            for key in ("max_message_rate", "provider_max_message_rate"):
                r: Rate | None = getattr(lim, key)
                if r is not None:
                    ps = max(floor_ps, r.per_second * factor)
                    changes[key] = Rate(f"{ps:g}/s", ps)
            if not changes:  # nothing configured to reduce: the floor is the rate
                changes["max_message_rate"] = floor or Rate("1/s", 1.0)
        if cap is not None:
            changes["connection_limit"] = min(cap, lim.connection_limit or cap)
            if lim.provider_connection_limit:
                changes["provider_connection_limit"] = min(cap, lim.provider_connection_limit)
        return Verdict(dataclasses.replace(lim, **changes, layers=(*lim.layers, "automation")))

    def describe(self) -> list[dict[str, Any]]:
        now = self.now()
        return [d.describe(now) for d in self.items]


# --------------------------------------------------------------------------- deciding


def _params(rule: AutomationRule) -> dict[str, Any]:
    return {"factor": rule.factor, "floor": [rule.floor.text, rule.floor.per_second], "limit": rule.limit,
            "ramp_step": rule.ramp_step, "ramp_steps": rule.ramp_steps}


async def decide(
    conn: asyncpg.Connection, *, rule: str, provider: str, source: str, campaign: str, action: str,
    params: dict[str, Any], reason: str, duration: float, extend: bool = True,
) -> Decision | None:
    """Start or extend a decision; a new episode also writes a ``shaping_decision`` event and a log line."""
    ramp = float(params.get("ramp_step", 0.0)) * int(params.get("ramp_steps", 0))
    row = await conn.fetchrow(*q("automation_decide", rule=rule, provider=provider, source=source, campaign=campaign,
                                 action=action, params=json.dumps(params), reason=reason[:500],
                                 duration=float(duration), ramp=ramp, extend=extend))
    if row is None:
        return None
    d = Decision(rule, provider, source, campaign, action, params, reason[:500], row["started_at"],
                 row["expires_at"], row["ramp_until"])
    if row["fresh"]:
        data = {"rule": rule, "provider": provider, "source": source, "campaign": campaign or None,
                "action": action, "params": params, "reason": reason[:500], "duration": duration,
                "expires_at": row["expires_at"].isoformat()}
        await record_events(conn, [Event(EVENT_TYPE, data=data)])
        log.warning("shaping_decision", **{k: v for k, v in data.items() if k != "params"})
    return d


async def evaluate_results(conn: asyncpg.Connection, shaping: Shaping, signals: Sequence[Signal]) -> list[Decision]:
    """Match flushed results against automation rules; start/extend decisions (caller's transaction)."""
    hits: Counter[tuple[str, str, str]] = Counter()
    sample: dict[tuple[str, str, str], str] = {}
    rules: dict[str, AutomationRule] = {}
    cache: dict[str, list[tuple[str, AutomationRule]]] = {}
    for s in signals:
        if not s.provider:
            continue
        provider_rules = cache.get(s.provider)
        if provider_rules is None:
            provider_rules = cache[s.provider] = shaping.rules_for(s.provider)
        for rid, rule in provider_rules:
            if rule.matches(s.reply, s.category):
                key = (rid, s.provider, s.source)
                hits[key] += 1
                sample.setdefault(key, s.reply)
                rules[rid] = rule
    made: list[Decision] = []
    for key in sorted(hits):  # one order for every worker: no deadlocks between flushes
        rid, provider, source = key
        rule = rules[rid]
        need, period = rule.threshold
        n = hits[key]
        if need > 1:
            n = await conn.fetchval(*q("automation_hit", rule=rid, provider=provider, source=source, n=n,
                                       period=period))
            if n < need:
                continue
            await conn.execute(*q("automation_hit_reset", rule=rid, provider=provider, source=source))
        scope = ALL_SOURCES if rule.action == "suspend_provider" else source
        if rule.action == "hold_campaign":
            continue  # needs a campaign: see evaluate_campaign_signals
        reason = f"{rule.action} after {n} x {'/'.join(filter(None, [rule.regex, rule.category]))}: {sample[key][:300]}"
        d = await decide(conn, rule=rid, provider=provider, source=scope, campaign="", action=rule.action,
                         params=_params(rule), reason=reason, duration=rule.duration)
        if d is not None:
            made.append(d)
    return made


async def evaluate_campaign_signals(
    conn: asyncpg.Connection, shaping: Shaping, signals: Sequence[tuple[Signal, str]]
) -> list[Decision]:
    """``hold_campaign`` rules: (signal, campaign) pairs whose reply matches hold that campaign."""
    made: list[Decision] = []
    done: set[tuple[str, str]] = set()
    for s, campaign in sorted(signals, key=lambda x: x[1]):
        if not campaign or not s.provider:
            continue
        for rid, rule in shaping.rules_for(s.provider):
            if rule.action != "hold_campaign" or (rid, campaign) in done or not rule.matches(s.reply, s.category):
                continue
            done.add((rid, campaign))
            d = await decide(conn, rule=rid, provider="", source="", campaign=campaign, action="hold_campaign",
                             params=_params(rule), reason=f"hold_campaign after {s.reply[:300]}",
                             duration=rule.duration)
            if d is not None:
                made.append(d)
    return made


async def record_campaigns(conn: asyncpg.Connection, finals: Counter[str], hards: Counter[str]) -> None:
    """Add final outcomes / hard bounces per campaign (one statement, caller's transaction)."""
    names = sorted(set(finals) | set(hards))
    if names:
        await conn.execute(*q("automation_campaign_add", campaigns=names, finals=[finals[c] for c in names],
                              hards=[hards[c] for c in names]))


async def evaluate_health(pool: asyncpg.Pool, cfg: HealthSettings) -> list[Decision]:
    """Complaint rate per provider -> pause bulk; hard bounce rate per campaign -> hold. Two queries."""
    made: list[Decision] = []
    async with acquire(pool) as conn, conn.transaction():
        for r in await conn.fetch(*q("automation_complaint_breaches", seconds=cfg.complaint_window,
                                     rate=cfg.complaint_rate, min_delivered=cfg.complaint_min_delivered)):
            rate = r["complaints"] / r["delivered"]
            reason = (f"complaint rate {rate:.2%} ({r['complaints']}/{r['delivered']}) over "
                      f"{cfg.complaint_window:g}s above {cfg.complaint_rate:.2%}")
            d = await decide(conn, rule="health:complaint_rate", provider=r["provider"], source=ALL_SOURCES,
                             campaign="", action="pause_bulk", params={"streams": list(cfg.bulk_streams)},
                             reason=reason, duration=cfg.pause_duration, extend=False)
            if d is not None:
                made.append(d)
        for r in await conn.fetch(*q("automation_campaign_breaches", seconds=cfg.bounce_window, rate=cfg.bounce_rate,
                                     min_volume=cfg.bounce_min_volume)):
            rate = r["hard"] / r["final"]
            reason = (f"hard bounce rate {rate:.2%} ({r['hard']}/{r['final']}) over {cfg.bounce_window:g}s "
                      f"above {cfg.bounce_rate:.2%}")
            d = await decide(conn, rule="health:bounce_rate", provider="", source="", campaign=r["campaign"],
                             action="hold_campaign", params={}, reason=reason, duration=cfg.pause_duration,
                             extend=False)
            if d is not None:
                made.append(d)
    return made


async def prune(conn: asyncpg.Connection, keep_seconds: float) -> None:
    """Housekeeping: drop per-minute campaign counters and decisions whose ramp ended ``keep_seconds`` ago.

    Both only matter over their windows (a day at most); kept a while for ``engine shaping show``
    and audits, then dropped, so the tables stay as big as a week of traffic.
    """
    await conn.execute(*q("prune_campaign_counters", keep_seconds=keep_seconds))
    await conn.execute(*q("prune_decisions", keep_seconds=keep_seconds))
