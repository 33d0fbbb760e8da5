"""Shared limits in a real Postgres: token buckets, connection leases, warm-up counters; the shaping file."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from engine.db.pool import create_pool
from engine.shaping.limits import Shaping
from engine.shaping.rules import ShapingError, load_shaping, parse_shaping
from engine.shaping.throttle import ConnectionSlots, TokenBuckets, burst_for
from engine.shaping.warmup import Unit, WarmupCounters

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- the shaping file


def test_shipped_file_is_valid_and_matches_providers_by_mx() -> None:
    s = Shaping(load_shaping(REPO / "deploy" / "shaping.toml"))
    cases = {
        ("gmail.com", "gmail-smtp-in.l.google.com"): "google",
        ("corp.example", "aspmx.l.google.com"): "google",
        ("hotmail.com", "hotmail-com.olc.protection.outlook.com"): "outlook",
        ("tenant.example", "tenant-example.mail.protection.outlook.com"): "office365",
        ("aol.com", "mx-aol.mail.gm0.yahoodns.net"): "yahoo",
        ("icloud.com", "mx01.mail.icloud.com"): "apple",
        ("web.de", "mx-ha03.web.de"): "united-internet",
        ("orange.fr", "smtp-in.orange.fr"): "orange",
        ("small.example", "mail.small.example"): None,
    }
    for (domain, mx), provider in cases.items():
        assert s.provider_for(domain, (mx,)) == provider, (domain, mx)
    lim = s.limits("corp.example", "aspmx.l.google.com", ("aspmx.l.google.com",), "default")
    assert lim.provider == "google" and lim.max_deliveries_per_connection == 50
    assert lim.provider_connection_limit == 20 and lim.max_connection_rate is not None  # inherited from default


def test_layers_provider_domain_and_source_overrides() -> None:
    s = Shaping(parse_shaping({
        "default": {"max_message_rate": "100/s", "connection_limit": 10, "sources": {"ip1": {"connection_limit": 7}}},
        "provider": {"big": {"match": [{"MXGlob": "mx*.big.test"}, {"DomainSuffix": "bigmail.test"}],
                             "max_message_rate": "2/min", "sources": {"ip1": {"max_message_rate": "1/h"}}}},
        "domain": {"vip.test": {"enable_tls": "Required"}},
    }))
    a = s.limits("vip.test", "site-a", ("mx1.big.test",), "ip1")
    assert a.provider == "big" and a.group == "big" and a.enable_tls == "required"
    assert a.max_message_rate.per_second == pytest.approx(1 / 3600) and a.connection_limit == 7
    assert a.layers == ("default", "default.sources.ip1", "provider.big", "provider.big.sources.ip1", "domain.vip.test")
    b = s.limits("x.bigmail.test", "site-b", ("mail.elsewhere.test",), "ip2")
    assert b.provider == "big" and b.max_message_rate.per_second == pytest.approx(2 / 60)
    c = s.limits("other.test", "site-c", ("mx.other.test",), "ip2")
    assert c.provider is None and c.group == "site:site-c" and c.max_message_rate.per_second == 100


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"default": {"max_mesage_rate": "1/s"}}, "default.max_mesage_rate: unknown key (allowed: max_message_rate"),
        ({"default": {"max_message_rate": "10/fortnight"}}, "'N/s', 'N/min', 'N/h' or 'N/day'"),
        ({"default": {"connection_limit": 0}}, "default.connection_limit: Input should be greater than or equal to 1"),
        ({"default": {"enable_tls": "sometimes"}}, "default.enable_tls: Input should be 'opportunistic', 'required' or 'disabled'"),
        ({"provider": {"g": {"match": [{"MXSuffix": ".google.com"}]}, "h": {"match": [{"MXSuffix": ".l.google.com"}]}}},
         "provider.g match {MXSuffix='.google.com'} overlaps provider.h match {MXSuffix='.l.google.com'}"),
        ({"provider": {"g": {"match": [{"MXGlob": "*.mx.example"}]}, "h": {"match": [{"MXSuffix": ".mx.example"}]}}},
         "overlaps provider.h"),
        ({"provider": {"g": {"match": [{"MXSuffix": ".a.test", "DomainSuffix": "a.test"}]}}}, "exactly one of"),
        ({"provider": {"g": {"max_message_rate": "1/s"}}}, "provider.g.match: Field required"),
        ({"warmup": {"w": {"sources": ["ip1"], "schedule": [10, 0]}}}, "every daily cap in schedule must be at least 1"),
        ({"warmup": {"w": {"sources": ["ip1"], "schedule": [1], "providers": ["nope"]}}}, "unknown providers ['nope']"),
        ({"bogus": {}}, "bogus: unknown key (allowed: default, provider, domain, warmup)"),
    ],
)
def test_validator_names_key_value_and_allowed(data: dict, expected: str) -> None:
    with pytest.raises(ShapingError) as err:
        parse_shaping(data)
    assert expected in str(err.value), str(err.value)


def test_non_overlapping_microsoft_edges_are_accepted() -> None:
    parse_shaping({"provider": {
        "outlook": {"match": [{"MXSuffix": ".olc.protection.outlook.com"}]},
        "office365": {"match": [{"MXSuffix": ".mail.protection.outlook.com"}]},
    }})


def test_cli_validate_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[default]\nmax_message_rate = "10/fortnight"\nconection_limit = 3\n')
    env = {**os.environ, "ENGINE_HOME": str(tmp_path)}
    good = subprocess.run([sys.executable, "-m", "engine", "shaping", "validate", str(REPO / "deploy" / "shaping.toml")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert good.returncode == 0 and "ok (10 providers" in good.stdout, good.stderr
    out = subprocess.run([sys.executable, "-m", "engine", "shaping", "validate", str(bad)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1
    assert "10/fortnight" in out.stderr and "conection_limit: unknown key" in out.stderr


# --------------------------------------------------------------------------- token buckets


async def test_buckets_hold_the_rate_across_two_pools(db_dsn: str, settings) -> None:
    """Two 'workers' (own pools, own local leases) hammer one bucket: the sum stays within the cap."""
    rate, seconds = 50.0, 2.0
    pools = [await create_pool(db_dsn, settings) for _ in range(2)]
    try:
        counts = [0, 0]

        async def worker(i: int, buckets: TokenBuckets, deadline: float) -> None:
            while time.monotonic() < deadline:
                wait = await buckets.take_all([("rate:test", rate)])
                if wait == 0:
                    counts[i] += 1
                else:
                    await asyncio.sleep(min(wait, 0.05))

        deadline = time.monotonic() + seconds
        buckets = [TokenBuckets(p, horizon=0.1) for p in pools]
        await asyncio.gather(*(worker(i, b, deadline) for i, b in enumerate(buckets) for _ in range(3)))
        total = sum(counts)
        assert total <= rate * seconds * 1.1 + burst_for(rate), counts
        assert total >= rate * seconds * 0.5, counts  # not trivially slow
        assert all(c > 0 for c in counts), counts  # both workers got a share
        assert sum(b.round_trips for b in buckets) < total  # tokens are leased in batches
    finally:
        for p in pools:
            await p.close()


# --------------------------------------------------------------------------- connection leases


async def test_connection_leases_cap_across_owners_and_expire(pool: asyncpg.Pool) -> None:
    a = ConnectionSlots(pool, "host-a:1", ttl=0.6)
    b = ConnectionSlots(pool, "host-b:2", ttl=0.6)
    keys = [("conn:site|src", 5), ("conn:group:big", 3)]  # the provider-wide limit is the tighter one
    path = ("site", "src")
    for slots in (a, b):
        for _ in range(4):
            await slots.ensure(path, keys, want_more=True)
            slots.begin(path)  # every slot is busy: the next ensure wants one more
    assert a.held(path) == 3 and b.held(path) == 0
    assert await pool.fetchval("SELECT count(*) FROM connection_leases WHERE key = 'conn:group:big'") == 3
    # host-a dies (no renewal): its slots free themselves after the TTL; host-b can take them.
    await asyncio.sleep(0.8)
    for _ in range(2):
        b.paths[path].retry_at = 0
        await b.ensure(path, keys, want_more=True)
    assert b.held(path) == 2
    # A reload lowering the provider limit to 1: the slot above it is not renewed and is given up.
    b.paths[path].keys = [("conn:site|src", 5), ("conn:group:big", 1)]
    await b.maintain(lambda p: 10)
    assert b.held(path) == 1
    assert await pool.fetchval("SELECT count(*) FROM connection_leases WHERE owner = 'host-b:2'") == 2
    await b.release_all()
    assert await pool.fetchval("SELECT count(*) FROM connection_leases WHERE owner = 'host-b:2'") == 0


# --------------------------------------------------------------------------- warm-up counters


class FakeClock:
    def __init__(self) -> None:
        self.now = dt.datetime(2030, 1, 1, 9, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def next_day(self) -> None:
        self.now += dt.timedelta(days=1)


async def _take_all(w: WarmupCounters, unit: Unit) -> int:
    n = 0
    for _ in range(1000):
        v = await w.ensure(unit)
        if not v.ok:
            return n
        w.spend(unit)
        n += 1
    return n


async def test_warmup_caps_hold_and_advance_only_on_healthy_days(pool: asyncpg.Pool) -> None:
    block = parse_shaping({"warmup": {"ip": {"sources": ["ip1"], "schedule": [5, 10, 20],
                                             "min_delivered_ratio": 0.8, "max_complaint_rate": 0.1}}}).warmup["ip"]
    unit = Unit("ip", "ip1", None, block)
    clock = FakeClock()
    w1, w2 = WarmupCounters(pool, clock, batch=2), WarmupCounters(pool, clock, batch=2)  # two workers
    got = await _take_all(w1, unit) + await _take_all(w2, unit)
    assert got == 5  # the day's cap holds across workers
    w1.record(unit, 5, 0)
    await w1.flush()
    clock.next_day()  # healthy day: one step up
    got = await _take_all(w1, unit) + await _take_all(w2, unit)
    assert got == 10
    w2.record(unit, 4, 6)  # 40% delivered: unhealthy
    await w2.flush()
    clock.next_day()
    assert await _take_all(w1, unit) + await _take_all(w2, unit) == 10  # held at step 1
    w1.record(unit, 10, 0)
    await w1.flush()
    # Complaints (events named after the source) above the bound also hold the step.
    day = clock.now.date()
    await pool.execute(
        "INSERT INTO events (type, data, created_at) SELECT 'complained', $1::jsonb, $2 FROM generate_series(1, 2)",
        {"source": "ip1"}, dt.datetime.combine(day, dt.time(12), dt.UTC),
    )
    clock.next_day()
    assert await _take_all(w1, unit) == 10
    row = await pool.fetchrow("SELECT step, last_health FROM warmup_state WHERE key = 'ip:ip1'")
    assert row["step"] == 1 and "held" in row["last_health"] and "complaints 2" in row["last_health"]
    w1.record(unit, 10, 0)
    await w1.flush()
    clock.next_day()
    assert await _take_all(w1, unit) == 20
