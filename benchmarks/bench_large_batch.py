"""Memory and time of one REST batch at the recipient cap (issue 16, adversarial item 6).

An engine (delivery off, one intake process) receives a batch of ``--messages`` messages
of ``--per-message`` recipients each (default 50 x 1,000 = the default
``[api] max_recipients_per_request``), with an Idempotency-Key, and then its replay.
Reported: the growth of the engine's peak RSS (VmHWM of the process that served it, after a
small warm-up request), seconds, and CPU of the engine and of Postgres per recipient.

Run: ``.venv/bin/python -m benchmarks.bench_large_batch [--messages 50] [--per-message 1000]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid

import httpx
import orjson

from benchmarks.harness import (
    OUT,
    create_key,
    engine_process,
    free_port,
    postgres,
    postgres_pid,
    tree_cpu_seconds,
    tree_peak_rss_mb,
    wait_http,
)

COMMAND = ".venv/bin/python -m benchmarks.bench_large_batch"


def batch_body(messages: int, per_message: int) -> bytes:
    return orjson.dumps({"messages": [
        {"from": "news@example.com", "to": [f"user{m}x{i}@d{i % 50}.example.net" for i in range(per_message)],
         "subject": "Digest", "text": "Hello " * 50, "metadata": {"campaign": "c1"}}
        for m in range(messages)
    ]})


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=50)
    ap.add_argument("--per-message", type=int, default=1000)
    args = ap.parse_args()
    port = free_port()
    config = (
        f'[server]\nintake_processes = 1\n[http]\nlisten = "127.0.0.1:{port}"\n[delivery]\nworkers = 0\n'
        f'[webhooks]\nenabled = false\n[api]\nmax_recipients_per_message = {max(args.per_message, 1)}\n'
        f'max_recipients_per_request = {args.messages * args.per_message}\n'
    )
    home = OUT / "large-batch-home"
    body = batch_body(args.messages, args.per_message)
    with postgres("large-batch") as dsn:
        key = create_key(dsn, home)
        with engine_process(dsn, config, home) as proc:
            url = f"http://127.0.0.1:{port}"
            await wait_http(url)
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            async with httpx.AsyncClient(base_url=url, timeout=600) as c:
                r = await c.post("/v1/messages/batch", content=batch_body(2, 2), headers=headers)  # warm-up
                assert r.status_code == 202, r.text
                await asyncio.sleep(1)
                before = tree_peak_rss_mb(proc.pid)
                pg = postgres_pid("large-batch")
                cpu0, pg0 = tree_cpu_seconds(proc.pid), tree_cpu_seconds(pg) if pg else 0.0
                idem = {**headers, "Idempotency-Key": str(uuid.uuid4())}
                t0 = time.perf_counter()
                r = await c.post("/v1/messages/batch", content=body, headers=idem)
                secs = time.perf_counter() - t0
                assert r.status_code == 202, r.text[:500]
                first = r.content
                cpu1, pg1 = tree_cpu_seconds(proc.pid), tree_cpu_seconds(pg) if pg else 0.0
                after = tree_peak_rss_mb(proc.pid)
                t1 = time.perf_counter()
                replay = await c.post("/v1/messages/batch", content=body, headers=idem)
                replay_secs = time.perf_counter() - t1
                assert replay.status_code == 202 and replay.headers.get("Idempotent-Replayed") == "true"
                assert orjson.loads(replay.content) == orjson.loads(first)
                final = tree_peak_rss_mb(proc.pid)
    n = args.messages * args.per_message
    pid = max(after, key=lambda p: after[p] - before.get(p, after[p]))
    print(f"batch of {args.messages} x {args.per_message} = {n:,} recipients, body {len(body) / 1e6:.1f} MB, "
          f"answer {len(first) / 1e6:.1f} MB; load average {os.getloadavg()[0]:.1f}")
    print(f"serving process peak RSS {before.get(pid, 0):.0f} -> {after[pid]:.0f} MB "
          f"(+{after[pid] - before.get(pid, 0):.0f}); after the replay {final.get(pid, 0):.0f} MB")
    print(f"submit {secs:.2f} s; replay {replay_secs:.2f} s; CPU per recipient: engine {(cpu1 - cpu0) / n * 1e6:.0f} us, "
          f"Postgres {(pg1 - pg0) / n * 1e6:.0f} us")
    print(f"command: {COMMAND} --messages {args.messages} --per-message {args.per_message}")


if __name__ == "__main__":
    asyncio.run(main())
