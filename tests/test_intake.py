"""Intake on every core: ``engine run`` serves HTTP and SMTP from several ``engine intake`` children.

Real processes over real sockets: the supervisor binds, the children accept on the
inherited sockets; a child killed with -9 is replaced and the others keep serving;
a supervisor killed with -9 takes its children with it, so the next ``engine run``
binds the same ports at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import pytest

from engine.apikeys import ApiKeys
from engine.config import load_settings
from engine.db.pool import create_pool

MSG = {"from": "app@example.com", "to": ["a@example.net"], "subject": "Hi", "text": "Hello"}
RAW = b"From: app@example.com\r\nTo: s@example.net\r\nSubject: s\r\n\r\nbody\r\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int, role: str) -> set[int]:
    """Live child processes of ``pid`` running ``engine <role>`` (read from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z" and role.encode() in cmdline:
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _until(pred, timeout: float = 120.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def _healthy(base: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as c:
        while time.monotonic() < deadline:
            try:
                if (await c.get(f"{base}/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{base} never became healthy")


def _config(tmp_path: Path, port: int, smtp_port: int) -> Path:
    cfg = tmp_path / "engine.toml"
    cfg.write_text(
        f'[server]\nintake_processes = 2\n'
        f'[http]\nlisten = "127.0.0.1:{port}"\n'
        f'[[smtp.listeners]]\nname = "relay"\nlisten = "127.0.0.1:{smtp_port}"\ntrusted = true\n'
        f'trusted_networks = ["127.0.0.0/8"]\n'
    )
    return cfg


async def _setup(db_dsn: str, tmp_path: Path) -> tuple[int, int, Path, dict[str, str], Any, str]:
    """Free ports, a two-intake config, the engine's environment, a pool and a send key."""
    port, smtp_port = _free_port(), _free_port()
    cfg = _config(tmp_path, port, smtp_port)
    env = {**os.environ, "DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home")}
    pool = await create_pool(db_dsn, load_settings(cfg, env=env))
    key, _ = await ApiKeys(pool).create("k", ["send"])
    return port, smtp_port, cfg, env, pool, key


async def _submit_rest(base: str, key: str, n: int) -> list[str]:
    """``n`` submissions, each over a new connection (no keep-alive: every one is a fresh accept)."""
    ids = []
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=20, limits=limits) as c:
        for i in range(n):
            r = await c.post("/v1/messages", json={**MSG, "to": [f"u{i}@example.net"]},
                             headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
    return ids


async def _submit_smtp(port: int, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=20)
        await smtp.connect()
        errors, reply = await smtp.sendmail("app@example.com", ["s@example.net"], RAW)
        await smtp.quit()
        assert not errors and reply.startswith("2.0.0 Ok: queued as "), reply
        ids.append(reply.rsplit(" ", 1)[1])
    return ids


@pytest.mark.timeout(400)
async def test_intake_children_serve_the_listeners_and_one_killed_is_replaced(db_dsn, tmp_path) -> None:
    port, smtp_port, cfg, env, pool, key = await _setup(db_dsn, tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "engine", "--config", str(cfg), "run", "--workers", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        intake = await _until(lambda: len(_children(proc.pid, "intake")) == 2 and _children(proc.pid, "intake"),
                              what="two intake children")
        await _healthy(base)
        accepted = await _submit_rest(base, key, 20) + await _submit_smtp(smtp_port, 5)

        victim = min(intake)
        os.kill(victim, signal.SIGKILL)
        await _until(lambda: not _alive(victim), what="the killed child to be gone")
        # The other child keeps serving while the supervisor starts a replacement.
        accepted += await _submit_rest(base, key, 10) + await _submit_smtp(smtp_port, 3)
        replaced = await _until(
            lambda: (c := _children(proc.pid, "intake")) and len(c) == 2 and victim not in c and c,
            what="a replacement intake child",
        )
        accepted += await _submit_rest(base, key, 10)
        assert replaced != intake

        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
        assert not any(_alive(pid) for pid in replaced), "intake children outlived a clean stop"
    finally:
        proc.kill()
        proc.wait(10)
    rows = await pool.fetch("SELECT id FROM messages")
    await pool.close()
    assert {str(r["id"]) for r in rows} == set(accepted)


@pytest.mark.timeout(400)
async def test_kill_9_of_the_supervisor_frees_the_ports_for_the_next_engine(db_dsn, tmp_path) -> None:
    port, smtp_port, cfg, env, pool, key = await _setup(db_dsn, tmp_path)
    cmd = [sys.executable, "-m", "engine", "--config", str(cfg), "run", "--workers", "1"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = None
    base = f"http://127.0.0.1:{port}"
    try:
        orphans = await _until(lambda: len(c := _children(first.pid, "intake") | _children(first.pid, "worker")) == 3
                               and c, what="two intake children and a worker")
        await _healthy(base)
        accepted = await _submit_rest(base, key, 5)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        # Started right away: it binds the same ports once the orphans have let go of them.
        second = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        await _until(lambda: not any(_alive(p) for p in orphans), what="the orphans to stop")
        await _healthy(base)
        assert second.poll() is None, second.stderr.read().decode(errors="replace") if second.stderr else ""
        accepted += await _submit_rest(base, key, 5)
        accepted += await _submit_smtp(smtp_port, 2)
        second.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(second.communicate, timeout=60)
        assert second.returncode == 0, err.decode(errors="replace")[-2000:]
    finally:
        for p in (first, second):
            if p is not None:
                p.kill()
                p.wait(10)
    rows = await pool.fetch("SELECT id FROM messages")
    await pool.close()
    # Every accepted message is there (the worker may have added DSNs of its own for the unroutable test domain).
    assert set(accepted) <= {str(r["id"]) for r in rows}


def test_cpu_budget_follows_the_cgroup_quota(tmp_path) -> None:
    from engine.supervise import cpu_budget

    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert cpu_budget(cpu_max) == affinity
    cpu_max.write_text("50000 100000\n")  # docker --cpus 0.5
    assert cpu_budget(cpu_max) == 1
    cpu_max.write_text(f"{(affinity + 5) * 100000} 100000\n")  # a quota above the cores we have
    assert cpu_budget(cpu_max) == affinity
    assert cpu_budget(tmp_path / "absent") == affinity


def test_intake_default_is_every_core_without_delivery_and_half_beside_it(tmp_path) -> None:
    from engine.intake import intake_count
    from engine.supervise import cpu_budget

    cfg = tmp_path / "e.toml"
    cfg.write_text("")
    default = load_settings(cfg, env={"ENGINE_HOME": str(tmp_path)})
    assert intake_count(default, workers=0) == cpu_budget()
    assert intake_count(default, workers=2) == max(1, cpu_budget() // 2)
    cfg.write_text("[server]\nintake_processes = 3\n")
    assert intake_count(load_settings(cfg, env={"ENGINE_HOME": str(tmp_path)}), workers=2) == 3
