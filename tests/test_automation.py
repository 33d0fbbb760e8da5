"""Traffic shaping automation end to end: real receivers playing providers, real DNS, real Postgres.

``bigmail`` (a1.test -> mx1.bigmail.test) and ``freemail`` (free.test -> mx.free.test) are two
receivers on loopback answering with real provider reply texts; the worker runs in this process so
the test can read its gate's effective limits. Tolerances are generous.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from engine.config import load_settings
from engine.db.pool import create_pool
from engine.deliver.scheduler import DeliveryWorker
from engine.ids import uuid7
from engine.outbox import NewMessage, NewRecipient, Outbox
from engine.outcome.reputation import CounterRow, record_counters
from engine.shaping.rules import ShapingError, parse_shaping
from engine.shaping.status import live_state
from tests.configs import BULK_WITHOUT_CONSENT
from tests.receivers import Behaviour, Receiver, smtp_receiver, tls_ca  # noqa: F401

TSS04 = ("421 4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred due to unexpected volume or user "
         "complaints - 4.16.55.1; see https://help.yahoo.com/kb/postmaster/SLN3434.html")

PROVIDERS = (
    "[provider.bigmail]\nmatch = [{MXSuffix = \".bigmail.test\"}]\n"
    "[provider.freemail]\nmatch = [{MXSuffix = \".free.test\"}]\n"
)


class World:
    def __init__(self, tmp: Path, dsn: str, big: Receiver, free: Receiver, dns: Any) -> None:
        self.tmp, self.dsn, self.big, self.free = tmp, dsn, big, free
        host, port = dns
        self.shaping = tmp / "shaping.toml"
        cfg = tmp / "engine.toml"
        env = {"DATABASE_URL": dsn, "ENGINE_HOME": str(tmp / "home")}
        cfg.write_text(
            "[queue]\nlease_duration = \"30s\"\n"
            "[delivery]\nretry_schedule = [\"0.3s\"]\nretry_jitter = 0\npoll_interval = \"100ms\"\n"
            "flush_interval = \"20ms\"\n"
            "[delivery.smtp]\nconnect_timeout = 2\nbanner_timeout = 3\ndata_dot_timeout = 3\n"
            f"[routing]\nnameservers = [\"{host}:{port}\"]\nmx_port = {big.port}\ntimeout = \"2s\"\n"
            "[shaping]\nfile = \"shaping.toml\"\nrecheck = \"0.3s\"\n" + BULK_WITHOUT_CONSENT
        )
        self.cfg = cfg
        self.env = env

    def settings(self) -> Any:
        import os

        return load_settings(self.cfg, env={**os.environ, **self.env})

    async def enqueue(self, pool: asyncpg.Pool, domain: str, n: int, *, stream: str = "relay",
                      campaign: str | None = None, prefix: str = "u") -> None:
        msgs = [
            NewMessage(id=uuid7(), source="smtp", mail_from="app@sender.test", stream=stream, priority=5,
                       recipients=[NewRecipient(f"{prefix}{i}@{domain}", domain)],
                       raw=f"Subject: {stream} {i}\r\n\r\nbody\r\n".encode(),
                       metadata={"campaign": campaign} if campaign else {})
            for i in range(n)
        ]
        await Outbox(pool, 3600).enqueue(msgs)


@pytest.fixture
def world(tmp_path: Path, db_dsn: str, smtp_receiver, dns_server) -> World:
    big = smtp_receiver()
    free = smtp_receiver(port=big.port)
    zone = {
        "a1.test": {"MX": ["10 mx1.bigmail.test."]},
        "mx1.bigmail.test": {"A": big.address},
        "free.test": {"MX": ["10 mx.free.test."]},
        "mx.free.test": {"A": free.address},
    }
    return World(tmp_path, db_dsn, big, free, dns_server(zone))


async def _until(pred: Any, timeout: float, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred() if asyncio.iscoroutinefunction(pred) else pred():
            return True
        await asyncio.sleep(every)
    return False


async def _run(world: World, pool: asyncpg.Pool) -> tuple[DeliveryWorker, asyncio.Task[None]]:
    worker = DeliveryWorker(world.settings(), pool, owner="auto-test", dsn=world.dsn)
    return worker, asyncio.create_task(worker.run())


async def _stop(worker: DeliveryWorker, task: asyncio.Task[None]) -> None:
    worker.request_stop()
    await asyncio.wait_for(task, 30)


async def test_gmail_rate_limit_slows_down_then_ramps_back(world: World) -> None:
    world.shaping.write_text(
        "[default]\nconnection_limit = 4\n"
        + PROVIDERS.replace(".bigmail.test\"}]\n", ".bigmail.test\"}]\nprovider_max_message_rate = \"40/s\"\n")
        + "[[provider.bigmail.automation]]\nregex = '4\\.7\\.28'\naction = \"reduce_rate\"\nfactor = 0.25\n"
        "floor = \"1/s\"\nduration = \"2s\"\nramp_step = \"1s\"\nramp_steps = 2\n"
    )
    world.big.behaviour.rate_limit = (15, 1.0)
    pool = await create_pool(world.dsn, world.settings())
    await world.enqueue(pool, "a1.test", 250)
    worker, task = await _run(world, pool)
    try:
        assert await _until(lambda: len(world.big.messages) > 0, 15)
        t_first = time.monotonic()
        assert await _until(lambda: world.big.rate_limited > 0, 15), "the receiver never rate-limited"
        t_trig = time.monotonic()
        before = len(world.big.messages) / max(0.05, t_trig - t_first + 0.05)
        world.big.behaviour.rate_limit = None  # the provider calms down: the quiet period starts
        route = await worker.router.resolve("a1.test")
        rates: list[float] = []

        def lim_rate() -> float:
            lim = worker.gate.limits("a1.test", route.site, route.mx_hosts, "default")
            return lim.provider_max_message_rate.per_second

        assert await _until(lambda: lim_rate() < 40, 5), "no decision within 5 s"
        shown = [(await live_state(pool, worker.gate.shaping, [], None))["automation"]]
        await asyncio.sleep(0.3)
        c0, t0 = len(world.big.messages), time.monotonic()
        await asyncio.sleep(1.2)
        after = (len(world.big.messages) - c0) / (time.monotonic() - t0)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            rates.append(lim_rate())
            if 10 < rates[-1] < 40 and len(shown) == 1:  # what `engine shaping show` prints mid-ramp
                shown.append((await live_state(pool, worker.gate.shaping, [], None))["automation"])
            if rates[-1] >= 40:
                break
            await asyncio.sleep(0.05)
        events = await pool.fetch("SELECT data FROM events WHERE type = 'shaping_decision'")
    finally:
        await _stop(worker, task)
        await pool.close()
    assert after < before, (before, after)
    assert after <= 10 * 1.5 + 3, after
    assert rates[-1] == 40, rates[-10:]
    steps = sorted({round(r) for r in rates})
    assert any(10 < r < 40 for r in steps), steps  # came back in steps, not one jump
    assert rates == sorted(rates)  # never down again during the quiet ramp
    assert events and "reduce_rate" in str(events[0]["data"])
    assert shown[0][0]["state"] == "active" and shown[0][0]["rate_factor"] == 0.25, shown
    assert len(shown) == 2 and shown[1][0]["state"] == "ramping" and 0.25 < shown[1][0]["rate_factor"] < 1, shown


async def test_yahoo_tss04_suspends_that_provider_while_the_other_flows(world: World) -> None:
    world.shaping.write_text(
        PROVIDERS.replace("[provider.freemail]\nmatch = [{MXSuffix = \".free.test\"}]\n",
                          "[provider.freemail]\nmatch = [{MXSuffix = \".free.test\"}]\n"
                          "provider_max_message_rate = \"20/s\"\n")
        + "[[provider.bigmail.automation]]\nregex = 'TSS04'\naction = \"suspend_provider\"\nduration = \"3s\"\n"
        "ramp_steps = 0\n"
    )
    world.big.behaviour.replies["mail"] = TSS04
    pool = await create_pool(world.dsn, world.settings())
    await world.enqueue(pool, "a1.test", 20)
    await world.enqueue(pool, "free.test", 120)
    worker, task = await _run(world, pool)
    try:
        async def decided() -> bool:
            return bool(await pool.fetchval("SELECT count(*) FROM shaping_decisions WHERE provider = 'bigmail'"))

        assert await _until(decided, 15), "no suspension decided"
        await asyncio.sleep(0.5)  # transactions already under way end
        s0, f0 = world.big.sessions, len(world.free.messages)
        await asyncio.sleep(1.8)
        s1, f1 = world.big.sessions, len(world.free.messages)
        world.big.behaviour.replies.pop("mail")  # after the suspension, the provider accepts again
        assert await _until(lambda: len(world.big.messages) >= 1, 15), "bigmail never resumed"
        row = await pool.fetchrow("SELECT * FROM shaping_decisions WHERE provider = 'bigmail'")
        ev = await pool.fetchval("SELECT count(*) FROM events WHERE type = 'shaping_decision'")
    finally:
        await _stop(worker, task)
        await pool.close()
    assert s1 == s0, (s0, s1)  # no connection to the suspended provider during the suspension
    assert f1 > f0, (f0, f1)  # the other provider kept flowing meanwhile
    assert row["action"] == "suspend_provider" and row["source"] == "*" and "TSS04" in row["reason"]
    assert ev >= 1


async def test_complaint_rate_pauses_bulk_but_not_transactional(world: World) -> None:
    world.shaping.write_text(PROVIDERS + "[default.health]\nevaluate_every = \"0.2s\"\ncomplaint_min_delivered = 100\n"
                             "bulk_streams = [\"bulk\"]\npause_duration = \"1h\"\n")
    pool = await create_pool(world.dsn, world.settings())
    async with pool.acquire() as conn:  # 1% complaints on bigmail over the last 24 h (what the FBL path records)
        await record_counters(conn, [CounterRow("bigmail", "delivered", n=1000), CounterRow("bigmail", "complained",
                                                                                          "complaint", n=10)])
    await world.enqueue(pool, "a1.test", 10, stream="bulk", prefix="b")
    await world.enqueue(pool, "a1.test", 10, stream="transactional", prefix="t")
    worker, task = await _run(world, pool)
    try:
        assert await _until(lambda: len(world.big.messages) >= 10, 15)
        await asyncio.sleep(1.0)
        got = [m.rcpt_tos[0] for m in world.big.messages]
        bulk = await pool.fetch("SELECT r.state, r.attempts FROM recipients r JOIN messages m ON m.id = r.message_id "
                                "WHERE m.stream = 'bulk'")
        ev = await pool.fetch("SELECT data FROM events WHERE type = 'shaping_decision'")
    finally:
        await _stop(worker, task)
        await pool.close()
    assert sorted(got) == sorted(f"t{i}@a1.test" for i in range(10))
    assert all(r["state"] in ("queued", "deferred") and r["attempts"] == 0 for r in bulk), bulk
    assert len(ev) == 1 and "complaint rate 1.00%" in str(ev[0]["data"])


async def test_campaign_with_hard_bounces_is_held(world: World) -> None:
    world.shaping.write_text(PROVIDERS + "[default.health]\nevaluate_every = \"0.2s\"\nbounce_min_volume = 10\n")
    world.free.behaviour.reject_users = {f"c{i}@free.test" for i in range(5)}
    pool = await create_pool(world.dsn, world.settings())
    await world.enqueue(pool, "free.test", 20, campaign="c1", prefix="c")
    worker, task = await _run(world, pool)
    try:
        async def held() -> bool:
            return bool(await pool.fetchval(
                "SELECT count(*) FROM shaping_decisions WHERE campaign = 'c1' AND action = 'hold_campaign'"))

        assert await _until(held, 15), "campaign c1 was not held"
        await world.enqueue(pool, "free.test", 10, campaign="c1", prefix="later")
        await world.enqueue(pool, "free.test", 10, campaign="c2", prefix="other")
        assert await _until(lambda: sum(m.rcpt_tos[0].startswith("other") for m in world.free.messages) >= 10, 15)
        await asyncio.sleep(1.0)
        later = [m for m in world.free.messages if m.rcpt_tos[0].startswith("later")]
        rows = await pool.fetch("SELECT state, attempts FROM recipients WHERE address LIKE 'later%'")
        ev = await pool.fetchval("SELECT data FROM events WHERE type = 'shaping_decision'")
    finally:
        await _stop(worker, task)
        await pool.close()
    assert not later
    assert all(r["attempts"] == 0 for r in rows), rows
    assert "hard bounce rate 25.00%" in str(ev)


@pytest.mark.parametrize("rule, expect", [
    ({"regex": "(", "action": "suspend"}, "automation.0.regex: not a valid regular expression"),
    ({"regex": "x", "action": "explode"}, "automation.0.action"),
    ({"regex": "x", "action": "suspend", "trigger": "5/fortnight"}, "'5/fortnight'"),
    ({"action": "suspend"}, "needs regex and/or category"),
    ({"category": "rate_limted", "action": "suspend"}, "unknown category"),
    ({"regex": "x", "action": "reduce_rate", "factor": 1.5}, "automation.0.factor"),
    ({"regex": "x", "action": "reduce_rate", "floor": "1/fortnight"}, "'1/fortnight'"),
    ({"regex": "x", "action": "suspend", "duration": "soon"}, "automation.0.duration"),
    ({"regex": "x", "action": "suspend", "colour": "red"}, "unknown key (allowed: name, regex"),
])
def test_bad_automation_rules_are_refused_naming_key_and_value(rule: dict[str, Any], expect: str) -> None:
    with pytest.raises(ShapingError) as exc:
        parse_shaping({"provider": {"g": {"match": [{"MXSuffix": ".g.test"}], "automation": [rule]}}})
    assert expect in str(exc.value), str(exc.value)


def test_shipped_shaping_file_has_automation_defaults() -> None:
    from engine.shaping.limits import Shaping
    from engine.shaping.rules import load_shaping

    s = Shaping(load_shaping(Path(__file__).parent.parent / "deploy" / "shaping.toml"))
    google = [r for _, r in s.rules_for("google")]
    assert any(r.matches("421-4.7.28 unusual rate of unsolicited mail", None) and r.action == "reduce_rate"
               for r in google)
    assert any(r.matches(TSS04, None) for _, r in s.rules_for("yahoo"))
    assert any(r.matches("451 4.7.650 The mail server [1.2.3.4] has been temporarily rate limited", None)
               for _, r in s.rules_for("outlook"))
    assert any(r.action == "cap_connections" and r.matches("421 Too many connections from your IP", None)
               for _, r in s.rules_for("anything"))
