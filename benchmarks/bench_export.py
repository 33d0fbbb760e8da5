"""Analytics export throughput: a backlog of N events to the local directory and to a loopback S3 server.

Run: .venv/bin/python -m benchmarks.bench_export [--events 1000000] [--batch 100000] [--no-s3] [--keep]

The backlog is made through the real outbox (accepted events of single-recipient messages, each
with its recipient and message rows, so the export's joins do real work). Making 1,000,000 takes
3-4 minutes on a loaded 2-core machine; ``--keep`` keeps that database (benchmarks/out/pg-export-kept)
and the next run with the same ``--events`` reuses it, only resetting the export's cursors. Each destination then
exports the whole backlog with `Exporter.export_once` in a loop, in this process; the figure is
events/s from the first batch to the last, and this process's peak RSS (the exporter's memory:
one batch of Arrow columns at a time). S3 is SeaweedFS's `weed` on 127.0.0.1 (tests/s3server.py).
Figures are printed and written to benchmarks/out/export.txt, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.bench_consent import pg_breakdown, pg_processes
from benchmarks.harness import OUT, postgres, postgres_pid
from engine.config import load_settings
from engine.db.migrate import migrate
from engine.db.pool import create_pool
from engine.export.exporter import Exporter
from engine.ids import uuid7
from engine.outbox import NewMessage, NewRecipient, Outbox

COMMAND = ".venv/bin/python -m benchmarks.bench_export"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def self_cpu() -> float:
    """This process's CPU seconds (every thread): the exporter's side of the work."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def pg_cpu(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> float:
    """CPU seconds the Postgres tree spent between two samples (backends, walwriter, checkpointer...)."""
    return sum(cpu - before.get(pid, (kind, 0.0))[1] for pid, (kind, cpu) in after.items())


async def fill(pool, n: int) -> float:
    """``n`` accepted events through the real outbox (about 20 s per 100,000 on a loaded 2-core machine)."""
    t0 = time.perf_counter()
    ob = Outbox(pool, 86400)
    chunk = 5000
    for start in range(0, n, chunk):
        msgs = [NewMessage(uuid7(), "http", "news@sender.example", "default", 5,
                           [NewRecipient(f"r{i}@example.net", "example.net", contact_id=f"crm-{i}")],
                           content={"subject": "s", "text": "t"}, metadata={"campaign": f"c{i % 7}"})
                for i in range(start, min(n, start + chunk))]
        await ob.enqueue(msgs)
    return time.perf_counter() - t0


@contextmanager
def database(keep: bool, events: int) -> Iterator[str]:
    """A fresh Postgres, or (``keep``) the kept one, emptied first unless it holds ``events`` events already."""
    if not keep:
        with postgres("export") as dsn:
            yield dsn
        return
    import pgserver

    pgdata = OUT / "pg-export-kept"
    stamp = pgdata.parent / "pg-export-kept.events"
    if pgdata.exists() and (not stamp.exists() or stamp.read_text() != str(events)):
        shutil.rmtree(pgdata)
    fresh = not pgdata.exists()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    if fresh:
        server.psql("CREATE DATABASE engine;")
    try:
        yield str(server.get_uri("engine"))
        stamp.write_text(str(events))
    finally:
        server.cleanup()


async def export_all(settings, pool, pg: str) -> tuple[float, int, int, str]:
    """Export the whole backlog; returns (seconds, events, files, CPU per event: exporter and Postgres)."""
    exp = Exporter(settings, pool)
    root = postgres_pid(pg)
    pg0 = pg_processes(root) if root else {}
    cpu0 = self_cpu()
    t0 = time.perf_counter()
    events = files = 0
    while True:
        batch = await exp.export_once()
        if batch is None:
            break
        events += batch.events
        files += len(batch.files)
    await exp.close()
    secs = time.perf_counter() - t0
    cpu = self_cpu() - cpu0
    pg1 = pg_processes(root) if root else {}
    per = max(events, 1) / 1e6
    cpu_line = (f"CPU per event: exporter process {cpu / per:.1f} us, Postgres {pg_cpu(pg0, pg1) / per:.1f} us "
                f"({pg_breakdown(pg0, pg1)} s)")
    return secs, events, files, cpu_line


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=100_000)
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the backlog's database for the next run (same --events)")
    args = ap.parse_args()
    pg = "export-kept" if args.keep else "export"
    lines = [f"# {COMMAND} --events {args.events} --batch {args.batch}", ""]
    home = OUT / "export-home"
    shutil.rmtree(home, ignore_errors=True)
    with database(args.keep, args.events) as dsn:
        cfg = OUT / "export.toml"
        target = OUT / "export-files"
        shutil.rmtree(target, ignore_errors=True)
        cfg.write_text(f'[export]\ndirectory = "{target}"\nbatch_events = {args.batch}\n')
        settings = load_settings(cfg, env={"DATABASE_URL": dsn, "ENGINE_HOME": str(home)})
        pool = await create_pool(dsn, settings, min_size=1, max_size=4)
        async with pool.acquire() as conn:
            await migrate(conn)
        async with pool.acquire() as conn:
            have = await conn.fetchval("SELECT count(*) FROM events")
            await conn.execute("DELETE FROM export_batches; DELETE FROM export_state")  # a kept database: start over
        if have == args.events:
            lines.append(f"backlog: {args.events:,} events kept from an earlier run (--keep)")
        else:
            took = await fill(pool, args.events)
            lines.append(f"backlog: {args.events:,} events made through the outbox in {took:.1f} s")
        rss0 = rss_mb()
        secs, n, files, cpu_line = await export_all(settings, pool, pg)
        size = sum(p.stat().st_size for p in Path(target).rglob("*") if p.is_file()) / 1e6
        lines.append(f"local directory: {n:,} events in {secs:.1f} s = {n / secs:,.0f} events/s; {files} files, "
                     f"{size:.1f} MB; peak RSS {rss_mb():.0f} MB (before the export: {rss0:.0f} MB)")
        lines.append(f"  {cpu_line}")
        if not args.no_s3:
            import sys

            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from tests.s3server import start_weed, stop_weed

            server = start_weed()
            try:
                bucket = server.new_bucket()
                s3cfg = OUT / "export-s3.toml"
                from tests.s3server import ACCESS, SECRET

                s3cfg.write_text(f'[export]\ndestination = "s3"\nbatch_events = {args.batch}\n[export.s3]\nbucket = "{bucket}"\n'
                                 f'endpoint = "{server.endpoint}"\nscheme = "http"\naccess_key = "{ACCESS}"\nsecret_key = "{SECRET}"\n')
                s3_settings = load_settings(s3cfg, env={"DATABASE_URL": dsn, "ENGINE_HOME": str(home)})
                secs, n, files, cpu_line = await export_all(s3_settings, pool, pg)
                lines.append(f"S3 (SeaweedFS on loopback): {n:,} events in {secs:.1f} s = {n / secs:,.0f} events/s; "
                             f"{files} files; peak RSS {rss_mb():.0f} MB")
                lines.append(f"  {cpu_line}")
            finally:
                stop_weed(server)
        await pool.close()
    text = "\n".join(lines)
    print(text)
    (OUT / "export.txt").write_text(text + "\n")


if __name__ == "__main__":
    asyncio.run(main())
