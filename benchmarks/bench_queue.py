"""A deep queue: delivery rate, CPU and worker RSS at 10k, 100k and 1M queued; claim, stats and GET latency.

For each depth D (own database on one embedded Postgres):

1. **Fill** to D queued single-recipient messages of ~1.2 KB through the engine's own writer,
   in process: :meth:`engine.outbox.Outbox.enqueue` (the statement REST and SMTP intake commit
   through, events and all), 2,000 messages per transaction, 3 in flight. Nothing is inserted
   behind the writer's back.
2. **Probe** with the engine stopped: the claim statement (``Outbox.claim`` of 200 rows, then
   ``release``) with no skipped domain and with the queue's only domain skipped (what a worker
   asks once its destination queue is full), ``Outbox.stats()`` in process, and the CLI
   ``engine queue stats`` as a subprocess (wall time, Python start included).
3. For 1 then 2 workers: top the queue up to D again, start ``engine run`` (HTTP + delivery
   workers, static route to a counting sink on 127.0.0.1), time ``GET /v1/messages/{id}``
   for random ids while it warms up, then measure a **window**: until ``--window`` seconds
   pass or D/2 messages are delivered, whichever comes first (the depth stays within
   [D/2, D] during the window). Reported: rate, engine CPU (listener + workers) and Postgres CPU
   per 1,000 messages, worker RSS (current and peak).

Run: ``.venv/bin/python -m benchmarks.bench_queue [--depths 10000,100000,1000000] [--workers 1,2]
[--window 30] [--warmup 5] [--explain]``. The full run fills ~1.1M rows and takes about
5-15 minutes on a loaded 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness import (
    OUT,
    create_database,
    create_key,
    engine_process,
    free_port,
    postgres,
    postgres_pid,
    tree_cpu_seconds,
    tree_pids,
    wait_http,
)
from benchmarks.sink import CountingSink

COMMAND = ".venv/bin/python -m benchmarks.bench_queue"
SENDER, RCPT_DOMAIN = "app@example.com", "example.net"
BODY = ("Your order 12345 ships tomorrow; track it in your account at any time.\r\n" * 15)
RAW_TEMPLATE = (
    "From: Shop <app@example.com>\r\nTo: {to}\r\nSubject: Your receipt {i}\r\n"
    "Message-ID: <{i}.bench@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    + BODY
)


# --------------------------------------------------------------------------- in-process engine parts


@dataclass
class Queue:
    """The engine's own outbox on one benchmark database (filling and probing go through it)."""

    settings: Any
    engine: Any
    outbox: Any
    sample_ids: list[uuid.UUID] = field(default_factory=list)
    seq: int = 0


async def open_queue(dsn: str, config: Path, home: Path) -> Queue:
    from engine.app import Engine
    from engine.config import load_settings
    from engine.outbox import Outbox

    settings = load_settings(config, env={**os.environ, "DATABASE_URL": dsn, "ENGINE_HOME": str(home)})
    engine = Engine(settings)
    await engine.connect(retry_for=30)
    return Queue(settings, engine, Outbox(engine.pool, settings.queue.max_age))


async def ready_count(q: Queue) -> int:
    """Exact count of waiting rows (a measurement of the benchmark, not an engine query)."""
    async with q.engine.pool.acquire() as conn:
        return int(await conn.fetchval("SELECT count(*) FROM recipients WHERE state IN ('queued', 'deferred')"))


async def fill(q: Queue, n: int, batch: int = 2000, concurrency: int = 3) -> float:
    """Enqueue ``n`` one-recipient messages through ``Outbox.enqueue``; returns the rows/s achieved."""
    from engine.ids import uuid7
    from engine.outbox import NewMessage, NewRecipient

    stream = q.settings.smtp.default_stream
    todo = list(range(0, n, batch))
    t0 = time.perf_counter()

    async def one(size: int) -> None:
        msgs = []
        for _ in range(size):
            q.seq += 1
            to = f"user{q.seq}@{RCPT_DOMAIN}"
            msgs.append(NewMessage(
                id=uuid7(), source="smtp", mail_from=SENDER, stream=stream, priority=5,
                recipients=[NewRecipient(address=to, domain=RCPT_DOMAIN, kind="envelope")],
                raw=RAW_TEMPLATE.format(to=to, i=q.seq).encode(),
            ))
        await q.outbox.enqueue(msgs)
        if len(q.sample_ids) < 5000 and random.random() < 0.5:
            q.sample_ids.append(msgs[random.randrange(len(msgs))].id)

    async def worker() -> None:
        while todo:
            base = todo.pop()
            await one(min(batch, n - base))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / max(time.perf_counter() - t0, 1e-9)


async def timed(coro_fn: Any, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        await coro_fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"median {statistics.median(values):.1f} ms, max {max(values):.1f} ms (n={len(values)})"


async def probe(q: Queue, config: Path, home: Path, dsn: str, explain: bool) -> dict[str, str]:
    """Claim and stats latency with the engine stopped (nothing else competing for the rows)."""
    out: dict[str, str] = {}
    for label, skip in (("claim 200", []), ("claim 200, its domain skipped", [RCPT_DOMAIN])):
        async def claim_release(skip: list[str] = skip) -> None:
            rows = await q.outbox.claim("bench-probe", 200, 60, skip)
            await q.outbox.release("bench-probe", [r["id"] for r in rows])
        out[label] = ms(await timed(claim_release, 5))
    out["Outbox.stats() in process"] = ms(await timed(q.outbox.stats, 3))
    env = {**os.environ, "DATABASE_URL": dsn, "ENGINE_HOME": str(home)}
    walls = []
    for _ in range(2):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "engine", "--config", str(config), "queue", "stats"],
                           env=env, capture_output=True, text=True)
        walls.append((time.perf_counter() - t) * 1000)
        if r.returncode != 0:
            out["engine queue stats"] = f"failed: {r.stderr.strip()[-300:]}"
            break
        out["stats first line"] = r.stdout.splitlines()[0] if r.stdout else ""
    else:
        out["`engine queue stats` wall (process start included)"] = ms(walls)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "engine", "--help"], env=env, capture_output=True)
    out["`engine --help` wall (process start alone)"] = f"{(time.perf_counter() - t) * 1000:.0f} ms"
    if explain:
        out.update(await explain_plans(q))
    return out


async def explain_plans(q: Queue) -> dict[str, str]:
    """EXPLAIN (ANALYZE, BUFFERS) of the claim and stats statements, rolled back."""
    from engine.db.queries import QUERIES
    from engine.db.queries import q as named

    plans: dict[str, str] = {}
    stmts = {
        "claim": named("claim", owner="bench-explain", limit=200, lease_seconds=60, skip_domains=[],
                       rule_streams=[], rule_purposes=[], rule_kinds=[], require_reconfirm=False),
        "claim (domain skipped)": named("claim", owner="bench-explain", limit=200, lease_seconds=60,
                                        skip_domains=[RCPT_DOMAIN], rule_streams=[], rule_purposes=[],
                                        rule_kinds=[], require_reconfirm=False),
    }
    stmts["queue_stats"] = named("queue_stats")
    if "queue_stats_sampled" in QUERIES:  # (the sampled form exists from issue 14 on)
        stmts["queue_stats_sampled (5%)"] = named("queue_stats_sampled", percent=5.0)
    async with q.engine.pool.acquire() as conn:
        for label, (sql, *args) in stmts.items():
            tr = conn.transaction()
            await tr.start()
            try:
                rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *args)
                plans[f"EXPLAIN {label}"] = "\n    " + "\n    ".join(r[0] for r in rows)
            finally:
                await tr.rollback()
    return plans


# --------------------------------------------------------------------------- delivery windows


@dataclass
class Window:
    depth: int
    workers: int
    start_depth: int
    delivered: int
    seconds: float
    engine_cpu: float
    pg_cpu: float | None
    rss_now: list[float]
    rss_peak: list[float]
    get_ms: str
    note: str = ""

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else 0.0


def engine_config(http_port: int, smtp_port: int, sink_port: int, workers: int) -> str:
    return f"""\
[server]
hostname = "bench.localdomain"
[http]
listen = "127.0.0.1:{http_port}"
[database]
pool_max = 20
[delivery]
workers = {workers}
destination_concurrency = 20
[delivery.smtp]
connection_limit = 20
[routing.static]
"{RCPT_DOMAIN}" = "127.0.0.1:{sink_port}"
[[smtp.listeners]]
name = "local"
listen = "127.0.0.1:{smtp_port}"
trusted = true
"""


def rss_mb(pid: int, key: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def get_latency(url: str, key: str, ids: list[uuid.UUID], n: int = 40) -> list[float]:
    out = []
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=30) as c:
        for mid in random.sample(ids, min(n, len(ids))):
            t = time.perf_counter()
            r = await c.get(f"{url}/v1/messages/{mid}", headers=headers)
            out.append((time.perf_counter() - t) * 1000)
            if r.status_code != 200:
                raise RuntimeError(f"GET /v1/messages/{mid}: {r.status_code} {r.text[:200]}")
    return out


async def window(
    q: Queue, dsn: str, home: Path, sink: CountingSink, depth: int, workers: int, key: str, args: argparse.Namespace,
) -> Window:
    missing = depth - await ready_count(q)
    if missing > 0:
        await fill(q, missing)
    start_depth = await ready_count(q)
    http_port, smtp_port = free_port(), free_port()
    config = engine_config(http_port, smtp_port, sink.port, workers)
    pg = postgres_pid("queue")
    note = ""
    with engine_process(dsn, config, home / f"run-{workers}w") as proc:
        url = f"http://127.0.0.1:{http_port}"
        await wait_http(url)
        get = await get_latency(url, key, q.sample_ids)
        # Worker processes take seconds to start on a loaded machine: the clock starts after the first
        # delivery plus --warmup seconds (connections open, caches fill).
        await asyncio.to_thread(sink.wait_for, sink.count + 1, time.perf_counter() + 300)
        await asyncio.to_thread(sink.wait_for, 10**12, time.perf_counter() + args.warmup)
        c0, t0 = sink.count, time.perf_counter()
        cpu0, pg0 = tree_cpu_seconds(proc.pid), (tree_cpu_seconds(pg) if pg else 0.0)
        count, last_at = await asyncio.to_thread(sink.wait_for, c0 + depth // 2, t0 + args.window)
        t1 = time.perf_counter() if count < c0 + depth // 2 else last_at
        cpu = tree_cpu_seconds(proc.pid) - cpu0
        pg_cpu = (tree_cpu_seconds(pg) - pg0) if pg else None
        kids = [p for p in tree_pids(proc.pid) if p != proc.pid]
        now, peak = [rss_mb(p, "VmRSS") for p in kids], [rss_mb(p, "VmHWM") for p in kids]
        if proc.poll() is not None:
            note = f"engine exited {proc.returncode}, see {home}/engine.log"
    return Window(depth, workers, start_depth, count - c0, t1 - t0, cpu, pg_cpu, now, peak, ms(get), note)


# --------------------------------------------------------------------------- report


def report(windows: list[Window], probes: dict[int, dict[str, str]], fills: dict[int, float],
           sink: CountingSink, argv: list[str], load: str) -> None:
    print(f"queue depth benchmark: 1-recipient ~1.2 KB messages to one domain, sink {sink.kind} on 127.0.0.1")
    print(f"machine: {os.cpu_count()} CPUs, 1-min load average {load} (other jobs share this machine)")
    for depth, rate in fills.items():
        print(f"fill {depth}: {rate:,.0f} recipients/s through Outbox.enqueue")
    for depth, pr in probes.items():
        print(f"\nat {depth:,} queued (engine stopped):")
        for k, v in pr.items():
            print(f"  {k}: {v}")
    print()
    head = (f"{'depth':>9} {'workers':>7} {'delivered':>9} {'seconds':>7} {'msg/s':>7} "
            f"{'engine CPU s/1k':>15} {'PG CPU s/1k':>11}  worker RSS MB now (peak)")
    print(head)
    print("-" * len(head))
    for w in windows:
        per_k = 1000 / w.delivered if w.delivered else 0.0
        pg = f"{w.pg_cpu * per_k:.2f}" if w.pg_cpu is not None and w.delivered else "-"
        rss = ", ".join(f"{a:.0f} ({b:.0f})" for a, b in zip(w.rss_now, w.rss_peak)) or "-"
        print(f"{w.depth:>9,} {w.workers:>7} {w.delivered:>9} {w.seconds:>7.1f} {w.rate:>7.0f} "
              f"{w.engine_cpu * per_k:>15.2f} {pg:>11}  {rss}")
        print(f"{'':>17} started at {w.start_depth:,} queued; GET /v1/messages/{{id}} {w.get_ms}"
              + (f"; note: {w.note}" if w.note else ""))
    by = {(w.depth, w.workers): w for w in windows}
    depths = sorted({w.depth for w in windows})
    if len(depths) > 1:
        for n in sorted({w.workers for w in windows}):
            lo, hi = by.get((depths[0], n)), by.get((depths[-1], n))
            if lo and hi and lo.rate:
                ratio = hi.rate / lo.rate
                print(f"{n} worker(s): rate at {depths[-1]:,} / rate at {depths[0]:,} = {ratio:.2f} "
                      f"(target >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'})")
    print("command: " + " ".join([COMMAND, *argv]))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="10000,100000,1000000", help="comma-separated queue depths")
    ap.add_argument("--workers", default="1,2", help="comma-separated delivery worker counts")
    ap.add_argument("--window", type=float, default=30.0, help="seconds measured per (depth, workers)")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of delivery before each window")
    ap.add_argument("--explain", action="store_true", help="print EXPLAIN (ANALYZE, BUFFERS) of claim and stats")
    argv = sys.argv[1:]
    args = ap.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    counts = [int(w) for w in args.workers.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    sink = CountingSink(free_port(), OUT / "queue-sink")
    windows: list[Window] = []
    probes: dict[int, dict[str, str]] = {}
    fills: dict[int, float] = {}
    try:
        sink.wait_ready()
        with postgres("queue") as pg_dsn:
            for depth in depths:
                dsn = await create_database(pg_dsn, f"q{depth}")
                home = OUT / f"queue-{depth}"
                home.mkdir(parents=True, exist_ok=True)
                cfg = home / "probe.toml"
                cfg.write_text(engine_config(free_port(), free_port(), sink.port, 0))
                q = await open_queue(dsn, cfg, home)
                try:
                    fills[depth] = await fill(q, depth)
                    probes[depth] = await probe(q, cfg, home, dsn, args.explain)
                    key = await asyncio.to_thread(create_key, dsn, home, "send,read")
                    for n in counts:
                        windows.append(await window(q, dsn, home, sink, depth, n, key, args))
                        print(f"[{depth} x {n}w] {windows[-1].rate:.0f} msg/s", file=sys.stderr, flush=True)
                finally:
                    await q.engine.close_pool()
    finally:
        sink.close()
    report(windows, probes, fills, sink, argv, f"{load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    asyncio.run(main())
