"""Analytics export throughput: a backlog of N events to the local directory and to a loopback S3 server.

Run: .venv/bin/python -m benchmarks.bench_export [--events 1000000] [--batch 100000] [--no-s3]

The backlog is made through the real outbox (accepted events of single-recipient messages, each
with its recipient and message rows, so the export's joins do real work). Each destination then
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
from pathlib import Path

from benchmarks.harness import OUT, postgres
from engine.config import load_settings
from engine.db.migrate import migrate
from engine.db.pool import create_pool
from engine.export.exporter import Exporter
from engine.ids import uuid7
from engine.outbox import NewMessage, NewRecipient, Outbox

COMMAND = ".venv/bin/python -m benchmarks.bench_export"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def fill(pool, n: int) -> float:
    ob = Outbox(pool, 86400)
    t0 = time.perf_counter()
    chunk = 5000
    for start in range(0, n, chunk):
        msgs = [NewMessage(uuid7(), "http", "news@sender.example", "default", 5,
                           [NewRecipient(f"r{i}@example.net", "example.net", contact_id=f"crm-{i}")],
                           content={"subject": "s", "text": "t"}, metadata={"campaign": f"c{i % 7}"})
                for i in range(start, min(n, start + chunk))]
        await ob.enqueue(msgs)
    return time.perf_counter() - t0


async def export_all(settings, pool) -> tuple[float, int, int]:
    exp = Exporter(settings, pool)
    t0 = time.perf_counter()
    events = files = 0
    while True:
        batch = await exp.export_once()
        if batch is None:
            break
        events += batch.events
        files += len(batch.files)
    return time.perf_counter() - t0, events, files


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=100_000)
    ap.add_argument("--no-s3", action="store_true")
    args = ap.parse_args()
    lines = [f"# {COMMAND} --events {args.events} --batch {args.batch}", ""]
    home = OUT / "export-home"
    shutil.rmtree(home, ignore_errors=True)
    with postgres("export") as dsn:
        cfg = OUT / "export.toml"
        target = OUT / "export-files"
        shutil.rmtree(target, ignore_errors=True)
        cfg.write_text(f'[export]\ndirectory = "{target}"\nbatch_events = {args.batch}\n')
        settings = load_settings(cfg, env={"DATABASE_URL": dsn, "ENGINE_HOME": str(home)})
        pool = await create_pool(dsn, settings, min_size=1, max_size=4)
        async with pool.acquire() as conn:
            await migrate(conn)
        took = await fill(pool, args.events)
        lines.append(f"backlog: {args.events:,} events made through the outbox in {took:.1f} s")
        rss0 = rss_mb()
        secs, n, files = await export_all(settings, pool)
        size = sum(p.stat().st_size for p in Path(target).rglob("*") if p.is_file()) / 1e6
        lines.append(f"local directory: {n:,} events in {secs:.1f} s = {n / secs:,.0f} events/s; {files} files, "
                     f"{size:.1f} MB; peak RSS {rss_mb():.0f} MB (before the export: {rss0:.0f} MB)")
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
                secs, n, files = await export_all(s3_settings, pool)
                lines.append(f"S3 (SeaweedFS on loopback): {n:,} events in {secs:.1f} s = {n / secs:,.0f} events/s; "
                             f"{files} files; peak RSS {rss_mb():.0f} MB")
            finally:
                stop_weed(server)
        await pool.close()
    text = "\n".join(lines)
    print(text)
    (OUT / "export.txt").write_text(text + "\n")


if __name__ == "__main__":
    asyncio.run(main())
