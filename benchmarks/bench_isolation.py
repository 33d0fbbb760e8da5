"""No head-of-line blocking, measured: a destination's delivery rate alone vs. beside one that
answers 421 at connect and one that hangs in its banner.

Run: .venv/bin/python -m benchmarks.bench_isolation [--messages 2000]
Prints both rates and their ratio (issue target: the accepting destination within 10% of alone).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from benchmarks.harness import create_database, postgres
from engine.config import load_settings
from engine.db.migrate import migrate
from engine.db.pool import create_pool
from engine.deliver.scheduler import DeliveryWorker
from engine.ids import uuid7
from engine.outbox import NewMessage, NewRecipient, Outbox
from tests.receivers import Behaviour, Receiver

COMMAND = ".venv/bin/python -m benchmarks.bench_isolation"


async def run(dsn: str, good: Receiver, neighbours: list[tuple[str, Receiver]], n: int, tmp: Path) -> float:
    routes = [f'"good.test" = "{good.address}:{good.port}"'] + [f'"{d}" = "{rx.address}:{rx.port}"' for d, rx in neighbours]
    cfg = tmp / f"iso{len(neighbours)}.toml"
    cfg.write_text(
        "[delivery]\npoll_interval = \"100ms\"\nsuspend_on_connection_failure = \"60s\"\n"
        "[delivery.smtp]\nconnect_timeout = 5\nbanner_timeout = 30\n"
        "[routing.static]\n" + "\n".join(routes) + "\n"
    )
    settings = load_settings(cfg, env={"DATABASE_URL": dsn})
    pool = await create_pool(dsn, settings)
    async with pool.acquire() as conn:
        await migrate(conn)
    ob = Outbox(pool, 3600)
    domains = ["good.test"] + [d for d, _ in neighbours]
    msgs = [NewMessage(id=uuid7(), source="smtp", mail_from="", stream="relay", priority=5,
                       recipients=[NewRecipient(f"u{i}@{d}", d)], raw=b"Subject: x\r\n\r\n" + (b"x" * 76 + b"\r\n") * 26)
            for i in range(n) for d in domains]
    await ob.enqueue(msgs)
    before = len(good.messages)
    worker = DeliveryWorker(settings, pool, owner=f"iso{len(neighbours)}")
    task = asyncio.create_task(worker.run())
    start = time.perf_counter()
    deadline = start + 120
    while len(good.messages) - before < n and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - start
    worker.request_stop()
    await asyncio.wait_for(task, 60)
    await pool.close()
    return (len(good.messages) - before) / elapsed


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=2000)
    args = ap.parse_args()
    good = Receiver(Behaviour()).start()
    refusing = Receiver(Behaviour(connect_reply="421 4.7.0 Try again later, closing connection")).start()
    hanging = Receiver(Behaviour(delay={"greeting": 600})).start()
    try:
        with postgres("isolation") as dsn, tempfile.TemporaryDirectory() as d:
            alone = await run(await create_database(dsn, "alone"), good, [], args.messages, Path(d))
            mixed = await run(await create_database(dsn, "mixed"), good, [("refuse.test", refusing), ("hang.test", hanging)],
                              args.messages, Path(d))
    finally:
        for rx in (good, refusing, hanging):
            rx.stop()
    print(f"accepting destination alone:                       {alone:8,.0f} messages/s")
    print(f"beside a 421-at-connect and a hanging destination: {mixed:8,.0f} messages/s  ({mixed / alone:.0%} of alone)")
    print(f"command: {COMMAND} --messages {args.messages}")


if __name__ == "__main__":
    asyncio.run(main())
