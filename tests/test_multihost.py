"""Three engine nodes as three hosts sharing one Postgres: an intake and two delivery workers.

Each node is its own process tree with its own ``ENGINE_HOME`` and its own copy of the config and
shaping file, as it would be on its own machine, and uses its own loopback address: the intake
listens (HTTP and SMTP) on 127.0.0.41 and delivers nothing (``engine run --workers 0``); the
workers (``engine worker``) send from 127.0.0.42 and 127.0.0.43 (an egress pool source each), so
the receiver's peer address tells which host delivered each message. Only the database is shared.

What a scaled-out deployment relies on, checked for real:

* a reload (``engine reload`` on the intake's host) reaches both workers: each re-reads its own
  file, and the workers table shows the same reload id and the new file's digest for both;
* mail submitted to the intake over HTTP and SMTP is delivered by the workers, each message once;
* a worker killed with SIGKILL in the middle of the run has its leases reclaimed by the other
  (short ``[queue] lease_duration``): every recipient it held is delivered from the other host,
  and the only duplicates are among those (a 250 the dead worker got but never recorded).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import asyncpg
import httpx
import pytest

from engine.apikeys import ApiKeys
from engine.config import load_settings
from engine.db.pool import create_pool
from tests.receivers import Behaviour, smtp_receiver, tls_ca  # noqa: F401

INTAKE, WORKER_A, WORKER_B = "127.0.0.41", "127.0.0.42", "127.0.0.43"
N_HTTP, N_SMTP = 160, 40
N = N_HTTP + N_SMTP
SHAPING = "[default]\nconnection_limit = 10\n"
LEASE = 3.0  # seconds: a dead worker's recipients are back in the queue this soon


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def _until(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        await asyncio.sleep(0.1)


class Host:
    """One node: a directory standing for its disk (config, shaping file, ENGINE_HOME) and its process."""

    def __init__(self, root: Path, name: str, config: str, db_dsn: str) -> None:
        self.dir = root / name
        self.dir.mkdir()
        self.config = self.dir / "engine.toml"
        self.config.write_text(config)
        self.shaping = self.dir / "shaping.toml"
        self.shaping.write_text(SHAPING)
        self.env = {**os.environ, "DATABASE_URL": db_dsn, "ENGINE_HOME": str(self.dir / "home")}
        self.log = self.dir / "engine.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "engine", "--config", str(self.config), *args]

    def start(self, *args: str) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(self.cli(*args), env=self.env, stdout=log, stderr=subprocess.STDOUT)

    @property
    def owner(self) -> str:
        """The worker's name in leases and in the workers table (host name and pid)."""
        assert self.proc is not None
        return f"{socket.gethostname()}:{self.proc.pid}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def terminate(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self) -> None:
        """After :meth:`terminate`: the graceful stop, or a kill if it takes too long."""
        if self.proc is None:
            return
        try:
            self.proc.wait(45)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _worker_config(source: str, rx: Any) -> str:
    """A worker host: sends from ``source``; holds at most 10 leases, so both workers share the run."""
    return (
        f'[queue]\nlease_duration = "{LEASE:g}s"\n'
        '[delivery]\npoll_interval = "100ms"\nflush_interval = "20ms"\nclaim_batch = 5\nmax_inflight = 10\n'
        'destination_concurrency = 4\nretry_schedule = ["0.3s"]\nretry_jitter = 0\n'
        '[delivery.smtp]\nconnect_timeout = 5\nbanner_timeout = 10\ndata_dot_timeout = 10\n'
        f'[routing.static]\n"example.net" = "{rx.address}:{rx.port}"\n'
        f'[[pools]]\nname = "default"\n[[pools.sources]]\nname = "src"\naddress = "{source}"\n'
        '[shaping]\nfile = "shaping.toml"\n'
    )


@pytest.mark.timeout(300)
async def test_intake_and_two_worker_hosts_share_one_postgres(db_dsn: str, tmp_path: Path, smtp_receiver) -> None:
    # A slow receiver (0.15 s per message, 4 sessions per worker): the run lasts long enough to
    # kill a worker while it holds leases.
    rx = smtp_receiver(Behaviour(delay={"data": 0.15}))
    http_port, smtp_port = _free_port(INTAKE), _free_port(INTAKE)
    intake = Host(tmp_path, "intake", (
        f'[http]\nlisten = "{INTAKE}:{http_port}"\n'
        f'[[smtp.listeners]]\nname = "local"\nlisten = "{INTAKE}:{smtp_port}"\ntrusted = true\n'
        f'[queue]\nlease_duration = "{LEASE:g}s"\n'
        '[webhooks]\nenabled = false\n[shaping]\nfile = "shaping.toml"\n'
    ), db_dsn)
    a = Host(tmp_path, "worker-a", _worker_config(WORKER_A, rx), db_dsn)
    b = Host(tmp_path, "worker-b", _worker_config(WORKER_B, rx), db_dsn)
    hosts = (intake, a, b)
    pool = await create_pool(db_dsn, load_settings(intake.config, env=intake.env))
    key, _ = await ApiKeys(pool).create("multihost", ["send", "read"])
    try:
        intake.start("run", "--workers", "0")
        a.start("worker")
        b.start("worker")

        # ---- all three up: the intake ready (database, schema, both listeners), both workers registered
        async with httpx.AsyncClient(base_url=f"http://{INTAKE}:{http_port}", timeout=20,
                                     headers={"Authorization": f"Bearer {key}"}) as c:

            async def intake_ready() -> bool:
                assert all(h.alive() for h in hosts), "\n---\n".join(h.tail() for h in hosts)
                try:
                    r = await c.get("/readyz")
                except httpx.TransportError:
                    return False
                return r.status_code == 200 and r.json()["listeners"] == {"http": "up", "smtp:local": "up"}

            await _until(intake_ready, 90, "the intake's /readyz")

            async def workers_rows() -> dict[str, asyncpg.Record]:
                assert all(h.alive() for h in hosts), "\n---\n".join(h.tail() for h in hosts)
                rows = {r["owner"]: r for r in await pool.fetch("SELECT * FROM workers")}
                return rows if {a.owner, b.owner} <= set(rows) else {}

            rows = await _until(workers_rows, 90, "both workers in the workers table")
            assert rows[a.owner]["shaping_digest"] == rows[b.owner]["shaping_digest"] == _digest(SHAPING)

            # ---- a reload from the intake's host reaches both workers (each re-reads its own copy)
            changed = SHAPING + '[provider.big]\nmatch = [{MXSuffix = ".big.test"}]\nconnection_limit = 2\n'
            for h in hosts:
                h.shaping.write_text(changed)
            out = await asyncio.to_thread(subprocess.run, intake.cli("reload", "--wait", "60"), env=intake.env,
                                          capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stdout + out.stderr
            assert f"{a.owner}" in out.stdout and f"{b.owner}" in out.stdout
            rows = {r["owner"]: r for r in await pool.fetch("SELECT * FROM workers")}
            assert rows[a.owner]["reload_id"] is not None
            assert rows[a.owner]["reload_id"] == rows[b.owner]["reload_id"], "both workers handled the same reload"
            assert rows[a.owner]["shaping_digest"] == rows[b.owner]["shaping_digest"] == _digest(changed)
            assert rows[a.owner]["reload_error"] is None and rows[b.owner]["reload_error"] is None

            # ---- submit to the intake: HTTP batches and SMTP
            for start in range(0, N_HTTP, 40):
                r = await c.post("/v1/messages/batch", json={"messages": [
                    {"from": "app@sender.test", "to": [f"h{i}@example.net"], "subject": f"h{i}", "text": "t"}
                    for i in range(start, start + 40)]})
                assert r.status_code == 202, r.text
        smtp = aiosmtplib.SMTP(hostname=INTAKE, port=smtp_port, timeout=30)
        await smtp.connect()
        for i in range(N_SMTP):
            errors, reply = await smtp.sendmail("app@sender.test", [f"s{i}@example.net"], f"Subject: s{i}\r\n\r\nbody\r\n".encode())
            assert not errors, errors
        await smtp.quit()

        # ---- kill -9 worker A while it holds leases (after it has delivered some)
        async def a_busy() -> int:
            assert a.alive() and b.alive(), a.tail() + b.tail()
            sent_by_a = sum(1 for m in rx.messages if m.peer[0] == WORKER_A)
            held = await pool.fetchval("SELECT count(*) FROM recipients WHERE state = 'leased' AND lease_owner = $1", a.owner)
            return int(held) if sent_by_a >= 5 and held else 0

        await _until(a_busy, 90, "worker A delivering with leases held")
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait(10)
        killed_at = len(rx.messages)
        held_by_a = {r["address"] for r in await pool.fetch(
            "SELECT address FROM recipients WHERE state = 'leased' AND lease_owner = $1", a.owner)}
        assert held_by_a, "worker A held no lease at the kill"
        assert killed_at < N, "everything was delivered before the kill: slow the receiver down"

        # ---- B reclaims A's leases and finishes the run
        async def all_delivered() -> bool:
            assert b.alive() and intake.alive(), b.tail() + intake.tail()
            return await pool.fetchval("SELECT count(*) FROM recipients WHERE state = 'delivered'") == N

        await _until(all_delivered, 120, f"all {N} recipients delivered")
        final = await pool.fetch("SELECT state, count(*) AS n FROM recipients GROUP BY state")
        assert {r["state"]: r["n"] for r in final} == {"delivered": N}
    finally:
        for h in hosts:  # all at once, as separate hosts would
            h.terminate()
        for h in hosts:
            await asyncio.to_thread(h.wait_stopped)
        await pool.close()

    expected = {f"h{i}@example.net" for i in range(N_HTTP)} | {f"s{i}@example.net" for i in range(N_SMTP)}
    received = Counter(m.rcpt_tos[0] for m in rx.messages)
    assert set(received) == expected
    # Only the workers deliver: nothing left from the intake's address.
    by_peer = Counter(m.peer[0] for m in rx.messages)
    assert set(by_peer) == {WORKER_A, WORKER_B}, by_peer
    # Every recipient A held when it died was delivered from B's host after the kill.
    from_b_after = {m.rcpt_tos[0] for m in rx.messages[killed_at:] if m.peer[0] == WORKER_B}
    assert held_by_a <= from_b_after, held_by_a - from_b_after
    # Exactly once, except among the recipients A held: a 250 it got and never recorded.
    duplicates = {addr for addr, n in received.items() if n > 1}
    assert duplicates <= held_by_a, duplicates - held_by_a
    # B stopped cleanly (its row removed); A died and its row stays, stale, for operators to see.
    conn = await asyncpg.connect(db_dsn)
    try:
        owners = {r["owner"] for r in await conn.fetch("SELECT owner FROM workers")}
    finally:
        await conn.close()
    assert b.owner not in owners and a.owner in owners
