"""Traffic shaping end to end: real workers (2 processes), real receivers, real DNS, real Postgres.

Two "providers" live on loopback: ``bigmail`` (two sites, mx1/mx2.bigmail.test, both answered by
one receiver so its session count is provider-wide) with a small cap, and ``free.test`` with none.
Counts are sampled at the receivers; tolerances are generous (exact figures: benchmarks/bench_shaping.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys
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
from engine.shaping.gate import Gate
from engine.shaping.limits import load as load_shaping_for
from engine.shaping.rules import resolve_path
from engine.shaping.throttle import burst_for
from tests.receivers import Receiver, smtp_receiver, tls_ca  # noqa: F401

CAP = 20.0  # messages/s for the whole bigmail provider


def shaping_toml(rate: str = f"{CAP:g}/s", conns: int = 2, extra: str = "") -> str:
    return (
        "[default]\nconnection_limit = 10\n"
        "[provider.bigmail]\nmatch = [{MXSuffix = \".bigmail.test\"}]\n"
        f"provider_max_message_rate = \"{rate}\"\nprovider_connection_limit = {conns}\nconnection_limit = {conns}\n"
        + extra
    )


class World:
    def __init__(self, tmp_path: Path, db_dsn: str, capped: Receiver, free: Receiver, dns: Any) -> None:
        self.tmp, self.dsn, self.capped, self.free = tmp_path, db_dsn, capped, free
        self.shaping = tmp_path / "shaping.toml"
        self.cfg = tmp_path / "engine.toml"
        host, port = dns
        self.env = {**os.environ, "DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home")}
        self.cfg_text = (
            "[queue]\nlease_duration = \"30s\"\n"
            "[delivery]\nretry_schedule = [\"0.3s\"]\nretry_jitter = 0\npoll_interval = \"100ms\"\n"
            "flush_interval = \"20ms\"\n"
            "[delivery.smtp]\nconnect_timeout = 2\nbanner_timeout = 3\ndata_dot_timeout = 3\n"
            f"[routing]\nnameservers = [\"{host}:{port}\"]\nmx_port = {capped.port}\ntimeout = \"2s\"\n"
            "[shaping]\nfile = \"shaping.toml\"\nrecheck = \"0.3s\"\n"
        )
        self.cfg.write_text(self.cfg_text)
        self.settings = load_settings(self.cfg, env=self.env)

    async def enqueue(self, pool: asyncpg.Pool, domains: list[str], n: int) -> None:
        msgs = [
            NewMessage(id=uuid7(), source="smtp", mail_from="app@sender.test", stream="relay", priority=5,
                       recipients=[NewRecipient(f"u{i}@{d}", d)], raw=f"Subject: {i}\r\n\r\nbody\r\n".encode())
            for i in range(n) for d in domains
        ]
        await Outbox(pool, 3600).enqueue(msgs)


@pytest.fixture
def world(tmp_path: Path, db_dsn: str, smtp_receiver, dns_server) -> World:
    capped = smtp_receiver()
    free = smtp_receiver(port=capped.port)  # routing.mx_port is one port for every MX host
    zone = {
        "a1.test": {"MX": ["10 mx1.bigmail.test."]},
        "a2.test": {"MX": ["10 mx2.bigmail.test."]},
        "mx1.bigmail.test": {"A": capped.address},
        "mx2.bigmail.test": {"A": capped.address},
        "free.test": {"MX": ["10 mx.free.test."]},
        "mx.free.test": {"A": free.address},
    }
    return World(tmp_path, db_dsn, capped, free, dns_server(zone))


async def _sample(rxs: list[Receiver], until: Any, timeout: float) -> list[tuple[float, list[int]]]:
    """(time, delivered counts) every 20 ms until ``until(counts)`` or the timeout."""
    samples = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = [len(rx.messages) for rx in rxs]
        samples.append((time.monotonic(), counts))
        if until(counts):
            break
        await asyncio.sleep(0.02)
    return samples


def _worst_window_excess(samples: list[tuple[float, list[int]]], idx: int, rate: float) -> float:
    """Largest (count in a window) - (rate x window) over every window starting at the first delivery."""
    first = next((t for t, c in samples if c[idx] > 0), None)
    assert first is not None, "nothing was delivered"
    t0 = first - 0.02  # the first message arrived at most one sample period earlier
    return max(c[idx] - rate * (t - t0) for t, c in samples if t >= first)


async def test_two_workers_hold_provider_cap_and_connection_limit_without_slowing_others(world: World) -> None:
    world.shaping.write_text(shaping_toml())
    pool = await create_pool(world.dsn, world.settings)
    n_capped = 40  # per domain, two domains of the same provider: 80 messages at 20/s
    await world.enqueue(pool, ["a1.test", "a2.test"], n_capped)
    await world.enqueue(pool, ["free.test"], 60)
    cmd = [sys.executable, "-m", "engine", "--config", str(world.cfg), "worker"]
    logs = [(world.tmp / f"worker{i}.log").open("w") for i in range(2)]
    procs = [subprocess.Popen(cmd, env=world.env, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    try:
        samples = await _sample([world.capped, world.free], lambda c: c[0] >= 2 * n_capped and c[1] >= 60, 40)
        # While both workers ran: ask `engine shaping show` for the live state of a capped domain.
        show = subprocess.run([*cmd[:-1], "shaping", "show", "a1.test", "--json"], env=world.env,
                              capture_output=True, text=True, timeout=60)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
        for log in logs:
            log.close()
        await pool.close()
    t_end, counts = samples[-1]
    assert counts == [2 * n_capped, 60], (counts, (world.tmp / "worker0.log").read_text()[-3000:])
    # The cap held across the two processes (worst window from the first delivery, every window length).
    assert _worst_window_excess(samples, 0, CAP) <= burst_for(CAP) * 1.25 + 3
    # ... and the run was not trivially slow: 80 messages at 20/s take about 3 s after the first second.
    first = next(t for t, c in samples if c[0] > 0)
    assert t_end - first < 15
    # Provider-wide connection cap (2) held across both workers and both sites.
    assert world.capped.max_concurrent <= 2, world.capped.max_concurrent
    # The uncapped destination finished while the capped provider still had most of its queue.
    free_done = next(t for t, c in samples if c[1] >= 60)
    capped_then = next(c[0] for t, c in samples if t >= free_done)
    assert capped_then < 2 * n_capped, capped_then
    assert world.free.max_concurrent > 2  # not held to the other provider's connection cap
    assert show.returncode == 0, show.stderr
    import json

    info = json.loads(show.stdout)
    assert info["limits"][0]["provider"] == "bigmail" and info["limits"][0]["provider_max_message_rate"] == "20/s"
    assert "rate:group:bigmail" in info["live"]["tokens"]


async def test_reload_changes_the_live_rate_and_refuses_a_bad_file(world: World) -> None:
    world.shaping.write_text(shaping_toml(rate="10/s", conns=4))
    pool = await create_pool(world.dsn, world.settings)
    await world.enqueue(pool, ["a1.test"], 200)
    worker = DeliveryWorker(world.settings, pool, owner="reload-test", dsn=world.dsn)
    task = asyncio.create_task(worker.run())
    try:
        await _sample([world.capped], lambda c: c[0] > 0, 15)
        t0, c0 = time.monotonic(), len(world.capped.messages)
        await asyncio.sleep(2.0)
        slow = len(world.capped.messages) - c0
        slow_rate = slow / (time.monotonic() - t0)
        # Raise the cap and tell every worker through Postgres (what `engine reload` does).
        world.shaping.write_text(shaping_toml(rate="60/s", conns=4))
        await pool.execute("SELECT pg_notify('engine_reload', '')")
        deadline = time.monotonic() + 5
        while worker.gate.reloads < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert worker.gate.reloads == 1, "the NOTIFY did not reach the worker within 5 s"
        await asyncio.sleep(0.3)
        t1, c1 = time.monotonic(), len(world.capped.messages)
        await asyncio.sleep(2.0)
        fast_rate = (len(world.capped.messages) - c1) / (time.monotonic() - t1)
        # An invalid file is refused; the limits in force stay.
        world.shaping.write_text('[default]\nmax_message_rate = "10/fortnight"\n')
        assert worker.request_reload() is False
        assert worker.gate.shaping.file.provider["bigmail"].provider_max_message_rate.text == "60/s"
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
        await pool.close()
    assert slow_rate <= 10 * 1.3 + 2, slow_rate
    assert fast_rate >= 2 * max(slow_rate, 5), (slow_rate, fast_rate)
    assert world.capped.max_concurrent <= 4


class FakeClock:
    def __init__(self) -> None:
        self.now = dt.datetime(2030, 3, 1, 10, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


async def test_warmup_cap_keeps_the_rest_queued_then_advances_next_healthy_day(world: World) -> None:
    world.shaping.write_text(shaping_toml(extra=(
        "[warmup.new-ip]\nsources = [\"default\"]\nschedule = [5, 10]\nspread_over = \"1s\"\n"
    )))
    pool = await create_pool(world.dsn, world.settings)
    await world.enqueue(pool, ["free.test"], 30)
    clock = FakeClock()
    settings = world.settings
    gate = Gate(pool, "warm", load_shaping_for(settings), settings.shaping, path=resolve_path(settings), clock=clock)
    worker = DeliveryWorker(settings, pool, owner="warm", dsn=world.dsn, gate=gate)
    task = asyncio.create_task(worker.run())
    try:
        await _sample([world.free], lambda c: c[0] >= 5, 15)
        await asyncio.sleep(1.5)  # time for more, if the cap leaked
        day1 = len(world.free.messages)
        states = [r["state"] for r in await pool.fetch("SELECT state FROM recipients")]
        tried = await pool.fetchval("SELECT count(*) FROM recipients WHERE state <> 'delivered' AND attempts > 0")
        await gate.warmup.flush()
        clock.now += dt.timedelta(days=1)  # day 1 was healthy (5/5 delivered): step up to 10
        await _sample([world.free], lambda c: c[0] >= 15, 15)
        await asyncio.sleep(1.0)
        day2 = len(world.free.messages)
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
        await pool.close()
    assert day1 == 5
    assert states.count("delivered") == 5 and "bounced" not in states and "expired" not in states
    assert tried == 0  # held back without counting an attempt
    assert day2 == 15


def test_engine_reload_validates_first_then_notifies(world: World) -> None:
    cmd = [sys.executable, "-m", "engine", "--config", str(world.cfg)]
    world.shaping.write_text('[default]\nmax_message_rate = "10/fortnight"\n')
    bad = subprocess.run([*cmd, "reload"], env=world.env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "10/fortnight" in bad.stderr and "keeps its current limits" in bad.stderr
    world.shaping.write_text(shaping_toml())
    good = subprocess.run([*cmd, "reload"], env=world.env, capture_output=True, text=True, timeout=60)
    assert good.returncode == 0 and "reload sent" in good.stdout, good.stderr
    show = subprocess.run([*cmd, "shaping", "show"], env=world.env, capture_output=True, text=True, timeout=60)
    assert show.returncode == 0 and '"bigmail"' in show.stdout, show.stderr
