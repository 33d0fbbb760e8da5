"""The webhook dispatcher as a process: a supervised child of ``engine run``, woken by NOTIFY.

Real processes, a real Postgres and a real HTTP receiver: ``engine run`` starts one
``engine webhooks run`` child (``[webhooks] own_process``), restarts it after a kill -9
and takes it down on a clean stop; a replay made from the command line reaches a
dispatcher that polls only every ten minutes, because the CLI NOTIFYs it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.apikeys import ApiKeys
from engine.config import load_settings
from engine.db.pool import create_pool
from tests.test_intake import _alive, _children, _free_port, _healthy, _until
from tests.webhook_receiver import toml_section, webhook_receiver, webhook_stack  # noqa: F401


def _engine_config(tmp_path: Path, port: int) -> Path:
    cfg = tmp_path / "engine.toml"
    cfg.write_text(
        f'[server]\nintake_processes = 1\n[http]\nlisten = "127.0.0.1:{port}"\n'
        + toml_section("webhooks", {"allow_private_targets": True, "poll_interval": "50ms"})
    )
    return cfg


async def _post(c: httpx.AsyncClient, n: int, tag: str) -> None:
    for i in range(n):
        r = await c.post("/v1/messages", json={
            "from": "app@example.com", "to": [f"{tag}{i}@example.net"], "subject": "s", "text": "t",
        })
        assert r.status_code == 202, r.text


@pytest.mark.timeout(400)
async def test_engine_run_dispatches_from_a_child_it_restarts_and_stops(webhook_receiver, db_dsn, tmp_path) -> None:
    rx = await webhook_receiver()
    port = _free_port()
    cfg = _engine_config(tmp_path, port)
    env = {**os.environ, "DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home")}
    pool = await create_pool(db_dsn, load_settings(cfg, env=env))
    key, _ = await ApiKeys(pool).create("wh", ["send", "read", "admin"])
    await pool.close()
    proc = subprocess.Popen([sys.executable, "-m", "engine", "--config", str(cfg), "run", "--workers", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        first = await _until(lambda: len(c := _children(proc.pid, "webhooks")) == 1 and c, what="a dispatcher child")
        await _healthy(base)
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
            r = await c.post("/v1/webhooks", json={"url": rx.url, "events": ["email.accepted"]})
            assert r.status_code == 201, r.text
            rx.secrets.append(r.json()["secret"])
            await _post(c, 5, "before")
            await rx.wait_for(lambda: len(rx.accepted) >= 5, timeout=120)

            (victim,) = first
            os.kill(victim, signal.SIGKILL)
            await _until(lambda: not _alive(victim), what="the killed dispatcher to be gone")
            await _until(lambda: (c2 := _children(proc.pid, "webhooks")) and victim not in c2,
                         what="a replacement dispatcher")
            await _post(c, 5, "after")
            await rx.wait_for(lambda: len({e["data"]["address"] for e in rx.accepted}) >= 10, timeout=120)
        replaced = _children(proc.pid, "webhooks")
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
        assert not any(_alive(pid) for pid in replaced), "the dispatcher outlived a clean stop"
    finally:
        proc.kill()
        proc.wait(10)
    assert all(r.verified for r in rx.arrivals)
    addresses = {e["data"]["address"] for e in rx.accepted}
    assert addresses == {f"{t}{i}@example.net" for t in ("before", "after") for i in range(5)}


@pytest.mark.timeout(300)
async def test_a_cli_replay_wakes_a_dispatcher_that_polls_rarely(
    webhook_stack, webhook_receiver, db_dsn, tmp_path,  # noqa: F811
) -> None:
    rx = await webhook_receiver()
    st = await webhook_stack()
    ep = await st.endpoint(rx.url)
    rx.secrets.append(ep["secret"])
    since = datetime.now(UTC) - timedelta(minutes=1)
    await st.submit([f"r{i}@example.net" for i in range(3)])
    expected = set(await st.event_ids())

    cfg = tmp_path / "dispatcher.toml"
    # Idle lanes look again only every ten minutes: only a wake-up can bring the replay sooner.
    cfg.write_text(toml_section("webhooks", {"allow_private_targets": True, "poll_interval": "10m"}))
    env = {**os.environ, "DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home")}
    log = open(tmp_path / "dispatcher.log", "wb")  # noqa: SIM115 - closed below
    disp = subprocess.Popen([sys.executable, "-m", "engine", "--config", str(cfg), "webhooks", "run"],
                            env=env, stdout=log, stderr=log)
    try:
        await rx.wait_for(lambda: set(rx.accepted_ids()) == expected, timeout=120)
        await st.until(lambda: _delivered(st, ep["id"], len(expected)), timeout=60, what="the first round recorded")
        first = len(rx.arrivals)
        replay = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "engine", "--config", str(cfg), "webhooks", "replay", ep["id"],
             "--since", since.isoformat()],
            env=env, capture_output=True, timeout=120,
        )
        assert replay.returncode == 0, replay.stderr.decode(errors="replace")
        await rx.wait_for(lambda: len(rx.arrivals) >= first + len(expected), timeout=120)
    finally:
        disp.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(disp.wait, 30)
        except subprocess.TimeoutExpired:
            disp.kill()
        log.close()
    again = [r.events[0]["id"] for r in rx.arrivals[first:]]
    assert set(again) == expected, "a replay sends the same events under the same ids"


async def _delivered(st: Any, endpoint_id: str, n: int) -> bool:
    return len(await st.deliveries(endpoint_id, state="delivered")) >= n
