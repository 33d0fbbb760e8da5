"""Benchmark plumbing: a private Postgres, an engine subprocess, bounded load loops.

Every server listens on loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextmanager
def postgres(name: str) -> Iterator[str]:
    """A fresh embedded Postgres (default durability settings: fsync on) for one benchmark."""
    import pgserver

    pgdata = OUT / f"pg-{name}"
    if pgdata.exists():
        shutil.rmtree(pgdata, ignore_errors=True)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(pgdata, cleanup_mode="delete")
    server.psql("CREATE DATABASE engine;")
    try:
        yield str(server.get_uri("engine"))
    finally:
        server.cleanup()


@contextmanager
def engine_process(dsn: str, config: str, home: Path) -> Iterator[subprocess.Popen[bytes]]:
    cfg = home / "bench.toml"
    home.mkdir(parents=True, exist_ok=True)
    cfg.write_text(config)
    env = {**os.environ, "DATABASE_URL": dsn, "ENGINE_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "--config", str(cfg), "run"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(home / "engine.log", "wb"),
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def create_key(dsn: str, home: Path, scopes: str = "send,read") -> str:
    env = {**os.environ, "DATABASE_URL": dsn, "ENGINE_HOME": str(home)}
    out = subprocess.run(
        [sys.executable, "-m", "engine", "apikey", "create", "--name", f"bench{time.time_ns()}", "--scopes", scopes],
        env=env, capture_output=True, text=True, check=True,
    )
    return out.stdout.strip().splitlines()[-1]


async def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as c:
        while time.monotonic() < deadline:
            try:
                if (await c.get(url + "/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"engine at {url} did not come up")


def child_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


# --------------------------------------------------------------------------- process trees, extra databases
# (added for bench_e2e: the engine runs its delivery workers as child processes, Postgres and
# Postfix are process trees too, so per-pid figures would miss most of the work)


def tree_pids(root: int) -> list[int]:
    """``root`` and all its live descendants, from the ppid field of /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def tree_cpu_seconds(root: int) -> float:
    """User+system CPU of a process tree, including its reaped children (cutime/cstime), so
    short-lived processes (Postfix's smtpd, cleanup...) are counted once their parent reaps them."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / ticks


def tree_peak_rss_mb(root: int) -> dict[int, float]:
    """Peak RSS (VmHWM) of each live process of a tree, by pid; sum it for the tree's upper bound."""
    out = {}
    for pid in tree_pids(root):
        try:
            out[pid] = proc_peak_rss_mb(pid)
        except OSError:
            continue
    return out


def postgres_pid(name: str) -> int | None:
    """The postmaster of the embedded Postgres started by :func:`postgres` (first line of postmaster.pid)."""
    try:
        return int((OUT / f"pg-{name}" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


async def create_database(dsn: str, name: str) -> str:
    """A new empty database on the server of ``dsn``; returns its DSN (one server, many fresh engines)."""
    from urllib.parse import urlsplit, urlunsplit

    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))
