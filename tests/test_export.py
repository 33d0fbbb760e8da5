"""Analytics export with real parts: real deliveries, a local directory and a real S3 server (SeaweedFS),
files read back with pyarrow and compared with Postgres; kill -9 mid-export; the store down, then up."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from engine.config import load_settings
from engine.db.pool import create_pool
from engine.deliver.scheduler import DeliveryWorker
from engine.events.public import PUBLIC_TYPES
from engine.export.exporter import Exporter, status
from engine.ids import uuid7
from engine.outbox import NewMessage, NewRecipient, Outbox
from tests.receivers import Behaviour, smtp_receiver, tls_ca  # noqa: F401
from tests.s3server import s3_server  # noqa: F401


def _read_local(root: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for f in sorted(root.glob("event_type=*/date=*/hour=*/*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


async def _db_events(pool) -> dict[int, str]:
    rows = await pool.fetch("SELECT id, type FROM events WHERE type = ANY($1::text[])", list(PUBLIC_TYPES))
    return {r["id"]: PUBLIC_TYPES[r["type"]] for r in rows}


async def _deliver_some(eng, mx) -> None:
    key, _ = await eng.apikeys.create("k", ["send"])
    import httpx

    async with httpx.AsyncClient(base_url=f"http://{eng.http_address[0]}:{eng.http_address[1]}",
                                 headers={"Authorization": f"Bearer {key}"}) as http:
        for i in range(5):
            r = await http.post("/v1/messages", json={
                "from": "app@sender.test", "subject": "s", "text": "t", "metadata": {"campaign": "c1"},
                "to": [{"email": f"u{i}@example.net", "contact_id": f"crm-{i}"}, "gone@example.net"]})
            assert r.status_code == 202, r.text
    w = DeliveryWorker(eng.settings, eng.pool, owner="w1", dsn=eng.dsn)
    t = asyncio.create_task(w.run())
    try:
        deadline = time.monotonic() + 30
        while await eng.pool.fetchval("SELECT count(*) FROM recipients WHERE state IN ('queued','deferred','leased')"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    finally:
        w.request_stop()
        await t


async def test_real_deliveries_land_in_local_and_s3_equal_to_postgres(engine_factory, smtp_receiver, s3_server, tmp_path) -> None:
    mx = smtp_receiver(Behaviour(reject_users={"gone@example.net"}))
    bucket = s3_server.new_bucket()
    eng = await engine_factory(
        f'[routing.static]\n"example.net" = "{mx.address}:{mx.port}"\n[webhooks]\nenabled = false\n'
        '[delivery]\nflush_interval = "20ms"\npoll_interval = "100ms"\n'
        f'[export]\ndirectory = "{tmp_path / "export"}"\nfacts = true\n' + s3_server.toml(bucket)
    )
    await _deliver_some(eng, mx)
    want = await _db_events(eng.pool)
    assert {"email.accepted", "email.delivered", "email.bounced"} <= set(want.values())

    local = Exporter(eng.settings, eng.pool)
    batch = await local.export_once()
    assert batch is not None and batch.events == len(want)
    assert await local.export_once() is None  # nothing new
    rows = _read_local(tmp_path / "export")
    assert {r["event_id"]: r["event_type"] for r in rows} == want
    delivered = [r for r in rows if r["event_type"] == "email.delivered"]
    assert len(delivered) == 5 and {r["contact_id"] for r in delivered} == {f"crm-{i}" for i in range(5)}
    assert all(r["smtp_code"] == 250 and r["attempt"] == 1 and r["campaign"] == "c1" for r in delivered)
    bounced = [r for r in rows if r["event_type"] == "email.bounced"]
    assert {(r["smtp_code"], r["category"], r["hard"]) for r in bounced} == {(550, "unknown_user", True)}
    # The layout and manifest the README documents.
    f = next((tmp_path / "export").glob("event_type=email.delivered/date=*/hour=*/*.parquet"))
    lo, hi = (int(x) for x in f.stem.split("-"))
    assert lo == min(r["event_id"] for r in delivered) and hi == max(r["event_id"] for r in delivered)
    [manifest] = list((tmp_path / "export" / "_manifests").glob("*.json"))
    m = json.loads(manifest.read_text())
    assert m["events"] == len(want) and sum(x["rows"] for x in m["files"] if x["path"].startswith("event_type=")) == len(want)
    facts = pq.read_table(next((tmp_path / "export").glob("facts/date=*/facts.parquet"))).to_pylist()
    assert sum(x["delivered"] for x in facts) == 5 and sum(x["bounced_hard"] for x in facts) == 5
    assert sum(x["sent"] for x in facts) == 10

    # The same events to the S3 bucket, read back with pyarrow's dataset reader (hive partitions).
    s3_settings = eng.settings.model_copy(update={"export": eng.settings.export.model_copy(update={"destination": "s3"})})
    remote = Exporter(s3_settings, eng.pool)
    assert (await remote.export_once()).events == len(want)
    data = ds.dataset(f"{bucket}/", filesystem=s3_server.filesystem(), format="parquet", partitioning="hive",
                      exclude_invalid_files=True)
    table = data.to_table(filter=ds.field("event_type") != "", columns=["event_id", "event_type"])
    got = {r["event_id"]: r["event_type"] for r in table.to_pylist()}
    assert got == want
    st = {r["destination"]: r for r in await status(eng.pool)}
    assert st["local"]["exported"] == st["s3"]["exported"] == len(want) and st["s3"]["behind"] == 0


async def _backlog(pool, n: int) -> None:
    ob = Outbox(pool, 3600)
    for start in range(0, n, 1000):
        msgs = [NewMessage(uuid7(), "http", "a@sender.test", "default", 5,
                           [NewRecipient(f"r{i}@example.net", "example.net")], content={"subject": "s", "text": "t"})
                for i in range(start, min(n, start + 1000))]
        await ob.enqueue(msgs)


@pytest.mark.timeout(300)
async def test_kill_9_mid_export_leaves_no_gap_and_no_duplicate(db_dsn, tmp_path) -> None:
    out = tmp_path / "export"
    cfg = tmp_path / "engine.toml"
    cfg.write_text(f'[export]\ndirectory = "{out}"\nbatch_events = 500\ninterval = "100ms"\nlease = "1s"\n'
                   '[webhooks]\nenabled = false\n')
    env = {**os.environ, "DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home")}
    settings = load_settings(cfg, env=env)
    pool = await create_pool(db_dsn, settings)
    try:
        await _backlog(pool, 6000)
        want = await _db_events(pool)
        rng = random.Random(7)
        deadline = time.monotonic() + 240
        kills = 0
        while True:
            before = await status(pool)
            mark = (before[0]["exported"], before[0]["pending_event_id"]) if before else None
            proc = subprocess.Popen([sys.executable, "-m", "engine", "--config", str(cfg), "export", "run"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # Let it start working (a loaded machine takes a while to import), then kill it at a random moment.
            until = time.monotonic() + 30
            while time.monotonic() < until:
                now = await status(pool)
                if now and (now[0]["exported"], now[0]["pending_event_id"]) != mark:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(rng.uniform(0.0, 0.4))
            proc.kill()  # SIGKILL, wherever it is: between files, between files and the cursor, anywhere
            proc.wait(10)
            kills += 1
            st = await status(pool)
            if st and st[0]["behind"] == 0 and st[0]["pending_event_id"] is None:
                break
            assert time.monotonic() < deadline, st
        rows = _read_local(out)
        ids = [r["event_id"] for r in rows]
        assert len(ids) == len(set(ids)), "an event was written twice"
        assert {r["event_id"]: r["event_type"] for r in rows} == want
        assert kills >= 2
        assert not list(out.rglob("*.tmp")) or all(p.name.startswith(".") for p in out.rglob("*.tmp"))
    finally:
        await pool.close()


async def test_store_down_then_up_loses_nothing(engine_factory, s3_server) -> None:
    bucket = s3_server.new_bucket()
    eng = await engine_factory('[webhooks]\nenabled = false\n[export]\ndestination = "s3"\n' + s3_server.toml(bucket))
    await _backlog(eng.pool, 50)
    # The store is down: nothing listens where the config points.
    down = eng.settings.export.s3.model_copy(update={"endpoint": "127.0.0.1:9"})
    broken = eng.settings.model_copy(update={"export": eng.settings.export.model_copy(update={"s3": down})})
    exp = Exporter(broken, eng.pool)
    # The events become visible to the stream once every older transaction on the server has ended
    # (other tests' too): until then there is nothing to export, after that the write must fail.
    deadline = time.monotonic() + 60
    failed = False
    while not failed:
        try:
            assert await exp.export_once() is None
        except OSError:
            failed = True
            break
        assert time.monotonic() < deadline, "the export should fail while the store is down"
        await asyncio.sleep(0.2)
    [st] = await status(eng.pool)
    assert st["exported"] == 0 and st["last_error"] and st["pending_event_id"] is not None
    # Up again: the pending batch is written (same boundaries), and nothing is lost.
    batch = await Exporter(eng.settings, eng.pool).export_once()
    assert batch is not None and batch.events == 50
    data = ds.dataset(f"{bucket}/", filesystem=s3_server.filesystem(), format="parquet", partitioning="hive",
                      exclude_invalid_files=True)
    assert sorted(data.to_table(columns=["event_id"]).column("event_id").to_pylist()) == sorted(await _db_events(eng.pool))
    [st] = await status(eng.pool)
    assert st["last_error"] is None and st["behind"] == 0
    assert uuid  # (imported for message ids in helpers)


async def _visible(pool, n: int) -> None:
    """Wait until ``n`` events are visible to the stream (other tests' open transactions hold it back a while)."""
    deadline = time.monotonic() + 120
    while await pool.fetchval("SELECT count(*) FROM events WHERE tx < pg_snapshot_xmin(pg_current_snapshot())") < n:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


@pytest.mark.timeout(240)
async def test_read_ahead_is_dropped_when_another_exporter_moved_the_cursor(db_dsn, tmp_path) -> None:
    """A backlog: exporter A reads the next batch ahead while writing one; exporter B then writes the
    batches after it. A's batch read ahead is stale and must not be written: every event once, no gap."""
    out = tmp_path / "export"
    cfg = tmp_path / "engine.toml"
    cfg.write_text(f'[export]\ndirectory = "{out}"\nbatch_events = 400\nlease = "60s"\n')
    settings = load_settings(cfg, env={"DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home")})
    pool = await create_pool(db_dsn, settings)
    a, b = Exporter(settings, pool, owner="a"), Exporter(settings, pool, owner="b")
    try:
        await _backlog(pool, 3000)
        want = await _db_events(pool)
        await _visible(pool, 3000)
        first = await a.export_once()
        assert first is not None and first.events == 400 and a.ahead is not None  # a full batch: A reads ahead
        assert (await b.export_once()).events == 400  # B takes the next two batches
        assert (await b.export_once()).events == 400
        while (batch := await a.export_once()) is not None:  # A goes on from where B left the cursor
            assert batch.start != first.end
        await a.close()
        rows = _read_local(out)
        ids = [r["event_id"] for r in rows]
        assert len(ids) == len(set(ids)), "an event was written twice"
        assert {r["event_id"]: r["event_type"] for r in rows} == want
        manifests = [json.loads(p.read_text()) for p in (out / "_manifests").glob("*.json")]
        assert sorted(m["events"] for m in manifests) == [200] + [400] * 7
    finally:
        await a.close()
        await pool.close()


@pytest.mark.timeout(240)
async def test_a_large_batch_read_in_two_halves_is_the_whole_batch_in_stream_order(db_dsn, tmp_path) -> None:
    from engine.export.exporter import SPLIT_AT

    n = 2 * SPLIT_AT + 1000
    out = tmp_path / "export"
    cfg = tmp_path / "engine.toml"
    cfg.write_text(f'[export]\ndirectory = "{out}"\nbatch_events = {n}\n')
    settings = load_settings(cfg, env={"DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home")})
    pool = await create_pool(db_dsn, settings)
    try:
        await _backlog(pool, n)
        await _visible(pool, n)
        exp = Exporter(settings, pool)
        batch = await exp.export_once()
        assert batch is not None and batch.events == n
        await exp.close()
        got = []  # one event type; one file per hour, in hour order
        for f in sorted(out.glob("event_type=*/date=*/hour=*/*.parquet")):
            got += pq.read_table(f).column("event_id").to_pylist()
        want = [r["id"] for r in await pool.fetch("SELECT id FROM events ORDER BY tx, id")]
        assert got == want  # both halves, each event once, in commit order
    finally:
        await pool.close()
