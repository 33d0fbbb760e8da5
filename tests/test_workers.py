"""``engine workers`` and a confirmed ``engine reload``: two real worker processes, real Postgres.

Each worker keeps a row in ``workers`` (its heartbeat) carrying the sha256 of the shaping file it
applied; ``engine reload`` validates the file, notifies, and waits for every live worker to carry
that digest. A worker killed with SIGKILL stops refreshing its row and shows as stale.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

SHAPING = "[default]\nconnection_limit = 10\n"
CONFIG = (
    "[queue]\nlease_duration = \"2s\"\n"  # heartbeat every 0.5 s: stale after 3 beats + 2 s
    "[delivery]\npoll_interval = \"100ms\"\n"
    "[shaping]\nfile = \"shaping.toml\"\n"
)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Cli:
    def __init__(self, cfg: Path, env: dict[str, str]) -> None:
        self.base = [sys.executable, "-m", "engine", "--config", str(cfg)]
        self.env = env

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.base, *args], env=self.env, capture_output=True, text=True, timeout=60)

    def workers(self) -> dict[str, dict[str, Any]]:
        out = self.run("workers", "--json")
        assert out.returncode == 0, out.stderr
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        return {r["owner"]: r for r in rows}


async def _until(check: Any, timeout: float) -> Any:
    """Poll ``check()`` (sync or async) until it returns something truthy, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value or time.monotonic() >= deadline:
            return value
        await asyncio.sleep(0.2)


async def test_workers_listed_reload_confirmed_refused_and_stale(db_dsn: str, tmp_path: Path) -> None:
    shaping = tmp_path / "shaping.toml"
    shaping.write_text(SHAPING)
    cfg = tmp_path / "engine.toml"
    cfg.write_text(CONFIG)
    env = {**os.environ, "DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home")}
    cli = Cli(cfg, env)
    logs = [(tmp_path / f"worker{i}.log").open("w") for i in range(2)]
    procs = [subprocess.Popen([*cli.base, "worker"], env=env, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    conn = await asyncpg.connect(db_dsn)
    try:
        owners = {f"{socket.gethostname()}:{p.pid}" for p in procs}

        async def both_seen() -> bool:
            rows = await conn.fetch("SELECT owner FROM workers")
            return owners <= {r["owner"] for r in rows}

        assert await _until(both_seen, 30), "workers never wrote their rows"
        listed = cli.workers()
        assert owners <= set(listed)
        first = _digest(shaping)
        for o in owners:
            assert listed[o]["state"] == "live"
            assert listed[o]["shaping_digest"] == first
            assert listed[o]["shaping_source"] == str(shaping)
        table = cli.run("workers")
        assert table.returncode == 0 and all(o in table.stdout for o in owners), table.stdout

        # A changed, valid file: every live worker confirms it.
        shaping.write_text(SHAPING + "[provider.big]\nmatch = [{MXSuffix = \".big.test\"}]\nconnection_limit = 2\n")
        second = _digest(shaping)
        out = cli.run("reload", "--wait", "15")
        assert out.returncode == 0, out.stdout + out.stderr
        for o in owners:
            assert f"{o}" in out.stdout and "applied" in out.stdout
        assert all(w["shaping_digest"] == second for o, w in cli.workers().items() if o in owners)

        # An invalid file: refused before any worker is told; the digests stay.
        shaping.write_text(SHAPING + "bogus_key = 1\n")
        out = cli.run("reload", "--wait", "1")
        assert out.returncode == 1
        assert "refused" in out.stderr and "bogus_key" in out.stderr
        assert all(w["shaping_digest"] == second for o, w in cli.workers().items() if o in owners)

        # A worker asked directly (SIGHUP) refuses the invalid file, keeps its digest and says why.
        victim = procs[0]
        victim_owner = f"{socket.gethostname()}:{victim.pid}"
        os.kill(victim.pid, signal.SIGHUP)

        async def refused() -> dict[str, Any] | None:
            row = await conn.fetchrow("SELECT * FROM workers WHERE owner = $1", victim_owner)
            return row if row is not None and row["reload_error"] else None

        row = await _until(refused, 15)
        assert row is not None, "the refusal was not reported"
        assert "bogus_key" in row["reload_error"] and row["shaping_digest"] == second
        # engine reload of a valid file now works again for both (the refusing worker recovers).
        shaping.write_text(SHAPING)
        out = cli.run("reload", "--wait", "15")
        assert out.returncode == 0, out.stdout + out.stderr
        assert cli.workers()[victim_owner]["reload_error"] is None

        # kill -9: the row stops being refreshed and shows as stale; reload only waits for live workers.
        victim.kill()
        victim.wait(10)

        def stale() -> bool:
            w = cli.workers().get(victim_owner)
            return w is not None and w["state"] == "stale"

        assert await _until(stale, 20), "a killed worker never became stale"
        out = cli.run("reload", "--wait", "15")
        assert out.returncode == 0, out.stdout + out.stderr
        assert victim_owner not in out.stdout

        # A clean stop removes the worker's row.
        survivor = procs[1]
        survivor_owner = f"{socket.gethostname()}:{survivor.pid}"
        survivor.send_signal(signal.SIGTERM)
        survivor.wait(30)
        assert survivor_owner not in cli.workers()
    finally:
        await conn.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for log in logs:
            log.close()


async def test_reload_reports_a_worker_that_did_not_confirm(db_dsn: str, tmp_path: Path) -> None:
    """A live worker that carries another digest (it refused, or never got the NOTIFY) fails the reload."""
    shaping = tmp_path / "shaping.toml"
    shaping.write_text(SHAPING)
    cfg = tmp_path / "engine.toml"
    cfg.write_text(CONFIG)
    env = {**os.environ, "DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home")}
    cli = Cli(cfg, env)
    # A worker on another host (its row only: it cannot hear this test's NOTIFY) still on an old file.
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute(
            "INSERT INTO workers (owner, host, pid, started_at, last_seen, heartbeat_seconds, shaping_source,"
            " shaping_digest, shaping_applied_at, delivered)"
            " VALUES ('elsewhere:1', 'elsewhere', 1, now(), now() + interval '1 hour', 10,"
            " '/etc/engine/shaping.toml', 'old', now(), 0)"
        )
        out = cli.run("reload", "--wait", "0.5")
        assert out.returncode == 1, out.stdout + out.stderr
        assert "elsewhere:1" in out.stdout and "not yet" in out.stdout
        assert "elsewhere:1" in out.stderr
    finally:
        await conn.close()
