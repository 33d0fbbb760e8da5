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
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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
