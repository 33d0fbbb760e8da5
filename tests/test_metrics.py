"""/metrics across processes: `engine run` with two delivery workers, real deliveries to an aiosmtpd
receiver, then the scrape parsed with prometheus_client's parser: the counters of both workers add up."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from engine.apikeys import ApiKeys
from engine.config import load_settings
from engine.db.pool import create_pool
from tests.receivers import Behaviour, smtp_receiver, tls_ca  # noqa: F401

N = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _total(text: str, name: str, **match: str) -> float:
    n = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in match.items()):
                n += s.value
    return n


async def test_counters_add_up_across_two_worker_processes(db_dsn, tmp_path, smtp_receiver) -> None:
    # A slow receiver and small claims: both workers get a share of the mail.
    rx = smtp_receiver(Behaviour(delay={"data": 0.05}))
    port = _free_port()
    cfg = tmp_path / "engine.toml"
    cfg.write_text(
        f'[http]\nlisten = "127.0.0.1:{port}"\n[smtp]\nenabled = false\n[webhooks]\nenabled = false\n'
        f'[routing.static]\n"example.net" = "{rx.address}:{rx.port}"\n'
        '[delivery]\nclaim_batch = 2\npoll_interval = "50ms"\nflush_interval = "20ms"\n'
    )
    env = {**os.environ, "DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home")}
    settings = load_settings(cfg, env=env)
    pool = await create_pool(db_dsn, settings)
    key, _ = await ApiKeys(pool).create("k", ["send", "read"])
    log = (tmp_path / "engine.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "engine", "--config", str(cfg), "run", "--workers", "2"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10,
                                     headers={"Authorization": f"Bearer {key}"}) as c:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if (await c.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "engine did not start"
                await asyncio.sleep(0.1)
            # Both workers up (registered) before any mail, so each takes a share.
            while await pool.fetchval("SELECT count(*) FROM workers") < 2:
                assert time.monotonic() < deadline, "the two workers did not start"
                await asyncio.sleep(0.2)
            for i in range(N):
                r = await c.post("/v1/messages", json={"from": "app@sender.test", "to": [f"u{i}@example.net"],
                                                       "subject": "s", "text": "t"})
                assert r.status_code == 202, r.text
            deadline = time.monotonic() + 90
            while len(rx.messages) < N:
                assert time.monotonic() < deadline, f"only {len(rx.messages)} of {N} delivered"
                await asyncio.sleep(0.1)
            # The outcome flush commits right after the SMTP reply: wait until every row is final.
            while await pool.fetchval("SELECT count(*) FROM recipients WHERE state <> 'delivered'"):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            text = ""
            while time.monotonic() < deadline:
                text = (await c.get("/metrics")).text
                if _total(text, "engine_messages_delivered_total") >= N:
                    break
                await asyncio.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        await pool.close()
    # Each worker logs how many it delivered when it stops.
    lines = [json.loads(x) for x in (tmp_path / "engine.log").read_text().splitlines() if x.startswith("{")]
    per_worker = [x["delivered"] for x in lines if x.get("event") == "delivery_worker_stopped"]
    # Both processes delivered, and the scrape (in the listener process, which delivers nothing) sums them.
    assert len([n for n in per_worker if n > 0]) == 2, per_worker
    assert _total(text, "engine_messages_delivered_total", provider="other", stream="default") == N
    assert _total(text, "engine_messages_received_total", source="http") == N
    assert _total(text, "engine_queue_depth") == 0
    files = os.listdir(tmp_path / "home" / "metrics")
    assert len({f.rsplit("_", 1)[-1] for f in files if f.startswith("counter_")}) >= 3  # listener + 2 workers
