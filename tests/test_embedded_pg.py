"""The embedded Postgres (no DATABASE_URL) is supervised by the engine that uses it, over real processes.

``engine run`` runs as a subprocess with its own ``ENGINE_HOME``, so pgserver starts a
Postgres of its own under ``$ENGINE_HOME/pg`` (not the suite's shared server). The tests
kill its postmaster, or an engine, with SIGKILL and look at what a user would see:
``/healthz``, submissions, deliveries at a real SMTP receiver, the server process and
pgserver's ``.handle_pids.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.receivers import Behaviour, Receiver, smtp_receiver, tls_ca  # noqa: F401

pytestmark = pytest.mark.timeout(420)


async def _until(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        await asyncio.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class EmbeddedHost:
    """A directory with a config and an ENGINE_HOME, and the ``engine`` processes started on it."""

    def __init__(self, root: Path, config: str) -> None:
        self.root = root
        self.config = root / "engine.toml"
        self.config.write_text(
            '[logging]\nformat = "json"\n[http]\nlisten = "127.0.0.1:0"\n'
            '[[smtp.listeners]]\nname = "local"\nlisten = "127.0.0.1:0"\ntrusted = true\n' + config
        )
        self.home = root / "home"
        self.pgdata = self.home / "pg"
        self.env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "ENGINE_CONFIG")}
        self.env["ENGINE_HOME"] = str(self.home)
        self.runs = 0

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "engine", "--config", str(self.config), *args]

    async def run(self, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        """``engine run`` until its ``engine_started`` line; returns the process and its log."""
        self.runs += 1
        log = self.root / f"run{self.runs}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(self.cli("run", *args), env=self.env, stdout=out, stderr=subprocess.STDOUT)

        async def started() -> dict[str, Any] | None:
            assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
            return next((r for r in _records(log) if r.get("event") == "engine_started"), None)

        self.started = await _until(started, 180, "engine_started")
        return proc, log

    @property
    def base_url(self) -> str:
        host, port = self.started["http"]
        return f"http://{host}:{port}"

    async def api_key(self) -> str:
        out = await asyncio.to_thread(subprocess.run, self.cli("apikey", "create", "--name", "t", "--scopes", "send,read"),
                                      env=self.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout.strip().splitlines()[-1]

    def postmaster_pid(self) -> int | None:
        pidfile = self.pgdata / "postmaster.pid"
        try:
            return int(pidfile.read_text().splitlines()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def handle_pids(self) -> list[int]:
        path = self.pgdata / ".handle_pids.json"
        return list(json.loads(path.read_text())) if path.exists() else []


def _records(log: Path) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(90)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def _cleanup(host: EmbeddedHost, *procs: subprocess.Popen[bytes]) -> None:
    """Whatever the outcome, leave no engine and no Postgres of this test behind."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    pid = host.postmaster_pid()
    if pid is not None and _alive(pid):
        os.kill(pid, signal.SIGKILL)


async def test_killed_postmaster_is_restarted_and_nothing_accepted_is_lost(tmp_path: Path, smtp_receiver) -> None:
    rx: Receiver = smtp_receiver(Behaviour())
    host = EmbeddedHost(tmp_path, (
        '[queue]\nlease_duration = "3s"\n'
        '[delivery]\npoll_interval = "100ms"\nflush_interval = "20ms"\nretry_schedule = ["0.5s"]\nretry_jitter = 0\n'
        f'[routing.static]\n"example.net" = "{rx.address}:{rx.port}"\n'
    ))
    proc, log = await host.run("--workers", "1")
    try:
        key = await host.api_key()
        async with httpx.AsyncClient(base_url=host.base_url, timeout=30,
                                     headers={"Authorization": f"Bearer {key}"}) as c:

            async def submit(to: str) -> str:
                r = await c.post("/v1/messages", json={"from": "app@sender.test", "to": [to], "subject": to, "text": "t"})
                assert r.status_code == 202, r.text
                return str(r.json()["id"])

            async def states(message_id: str) -> list[str]:
                r = await c.get(f"/v1/messages/{message_id}")
                assert r.status_code == 200, r.text
                return [rcpt["state"] for rcpt in r.json()["recipients"]]

            def received(address: str) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    return any(address in m.rcpt_tos for m in rx.messages)
                return check

            delivered_id = await submit("delivered@example.net")
            await _until(received("delivered@example.net"), 120, "the first message at the receiver")
            await _until(lambda: _eq(states(delivered_id), ["delivered"]), 60, "its delivered state")
            accepted_id = await submit("accepted@example.net")  # accepted (committed) just before the crash

            postmaster = host.postmaster_pid()
            assert postmaster is not None and _alive(postmaster)
            os.kill(postmaster, signal.SIGKILL)

            async def server_down() -> bool:
                return not _alive(postmaster)

            await _until(server_down, 30, "the postmaster to die")

            async def healthy() -> bool:
                assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
                try:
                    return (await c.get("/healthz")).status_code == 200
                except httpx.TransportError:
                    return False

            await _until(healthy, 120, "/healthz to answer 200 again after the postmaster was killed")
            restarted = host.postmaster_pid()
            assert restarted is not None and restarted != postmaster and _alive(restarted)

            after_id = await submit("after@example.net")
            await _until(received("after@example.net"), 120, "the message submitted after the restart at the receiver")
            await _until(lambda: _eq(states(after_id), ["delivered"]), 60, "its delivered state")
            # What was committed before the crash survived crash recovery.
            assert await states(delivered_id) == ["delivered"]
            assert len(await states(accepted_id)) == 1
        assert _stop(proc) == 0, log.read_text(errors="replace")[-4000:]
    finally:
        _cleanup(host, proc)


async def _eq(value: Awaitable[Any], expected: Any) -> bool:
    return await value == expected


async def test_clean_stop_after_a_killed_engine_stops_postgres_and_prunes_stale_pids(tmp_path: Path) -> None:
    host = EmbeddedHost(tmp_path, "")
    killed, _ = await host.run("--workers", "0")
    survivor = None
    try:
        assert killed.pid in host.handle_pids()
        postmaster = host.postmaster_pid()
        assert postmaster is not None and _alive(postmaster)
        killed.kill()
        killed.wait(10)

        survivor, log = await host.run("--workers", "0")
        assert host.postmaster_pid() == postmaster, "the second engine attaches to the running server"
        assert killed.pid not in host.handle_pids(), "stale pid of the killed engine pruned at start"
        assert survivor.pid in host.handle_pids()

        assert _stop(survivor) == 0, log.read_text(errors="replace")[-4000:]

        async def postmaster_gone() -> bool:
            return not _alive(postmaster)

        await _until(postmaster_gone, 60, "the embedded Postgres to stop with the last engine using it")
        assert host.handle_pids() == []
    finally:
        _cleanup(host, killed, *([survivor] if survivor else []))


async def test_clean_stop_leaves_postgres_running_for_another_live_engine(tmp_path: Path) -> None:
    """Two processes share the server: the one stopping first must not take it away from the other."""
    host = EmbeddedHost(tmp_path, "")
    first, first_log = await host.run("--workers", "0")
    postmaster = host.postmaster_pid()
    # A second user of the same server: another engine process on the same ENGINE_HOME (its HTTP port differs).
    second, second_log = await host.run("--workers", "0")
    try:
        assert set(host.handle_pids()) == {first.pid, second.pid}
        assert _stop(first) == 0, first_log.read_text(errors="replace")[-4000:]
        assert postmaster is not None and _alive(postmaster), "stopped while another engine still used it"
        async with httpx.AsyncClient(base_url=host.base_url, timeout=30) as c:
            assert (await c.get("/healthz")).status_code == 200
        assert host.handle_pids() == [second.pid]
        assert _stop(second) == 0, second_log.read_text(errors="replace")[-4000:]

        async def postmaster_gone() -> bool:
            return not _alive(postmaster)

        await _until(postmaster_gone, 60, "the embedded Postgres to stop with the last engine using it")
    finally:
        _cleanup(host, first, second)
