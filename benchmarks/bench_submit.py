"""Submission into the durable outbox: REST batches and SMTP from concurrent clients.

Run: make bench   (or: .venv/bin/python -m benchmarks.bench_submit [--recipients N] [--smtp-messages N])
Prints recipients/s (REST) and messages/s (SMTP); figures are not asserted anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx

from benchmarks.harness import OUT, create_key, engine_process, free_port, postgres, proc_cpu_seconds, proc_peak_rss_mb, wait_http

COMMAND = ".venv/bin/python -m benchmarks.bench_submit"


async def rest_load(url: str, key: str, recipients: int, batch: int, concurrency: int, time_limit: float) -> tuple[int, float]:
    """POST batches of `batch` one-recipient messages until `recipients` are accepted (or time runs out)."""
    headers = {"Authorization": f"Bearer {key}"}
    todo = list(range(0, recipients, batch))
    done = 0
    start = time.perf_counter()
    deadline = start + time_limit

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done
        while todo and time.perf_counter() < deadline:
            base = todo.pop()
            msgs = [
                {"from": "app@example.com", "to": [f"user{base + i}@example.net"], "subject": "Your receipt",
                 "text": "Thanks for your order. " * 20, "metadata": {"order": base + i}}
                for i in range(min(batch, recipients - base))
            ]
            r = await client.post(url + "/v1/messages/batch", json={"messages": msgs}, headers=headers)
            if r.status_code != 202:
                raise RuntimeError(f"batch refused: {r.status_code} {r.text[:200]}")
            done += len(msgs)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return done, time.perf_counter() - start


async def smtp_load(host: str, port: int, messages: int, clients: int, time_limit: float) -> tuple[int, float]:
    """`clients` concurrent SMTP sessions, each sending 2 KB messages over one connection."""
    import aiosmtplib

    body = ("X" * 76 + "\r\n") * 25  # ~2 KB
    per_client = messages // clients
    sent = 0
    start = time.perf_counter()
    deadline = start + time_limit

    async def client(n: int) -> None:
        nonlocal sent
        smtp = aiosmtplib.SMTP(hostname=host, port=port, timeout=30)
        await smtp.connect()
        try:
            for i in range(per_client):
                if time.perf_counter() > deadline:
                    break
                msg = (f"From: app@example.com\r\nTo: u{n}-{i}@example.net\r\nSubject: bench {i}\r\n"
                       f"Message-ID: <{n}.{i}@bench.local>\r\n\r\n{body}")
                await smtp.sendmail("app@example.com", [f"u{n}-{i}@example.net"], msg.encode())
                sent += 1
        finally:
            await smtp.quit()

    await asyncio.gather(*(client(n) for n in range(clients)))
    return sent, time.perf_counter() - start


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipients", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--smtp-messages", type=int, default=10_000)
    ap.add_argument("--smtp-clients", type=int, default=20)
    ap.add_argument("--time-limit", type=float, default=120)
    args = ap.parse_args()

    http_port, smtp_port = free_port(), free_port()
    config = (
        f'[http]\nlisten = "127.0.0.1:{http_port}"\n'
        f'[database]\npool_max = 20\n'
        f'[delivery]\nworkers = 0\n'
        f'[[smtp.listeners]]\nname = "local"\nlisten = "127.0.0.1:{smtp_port}"\ntrusted = true\n'
    )
    home = OUT / "submit-home"
    with postgres("submit") as dsn:
        key = create_key(dsn, home)
        with engine_process(dsn, config, home) as proc:
            url = f"http://127.0.0.1:{http_port}"
            await wait_http(url)
            cpu0 = proc_cpu_seconds(proc.pid)
            n, secs = await rest_load(url, key, args.recipients, args.batch, args.concurrency, args.time_limit)
            cpu_rest = proc_cpu_seconds(proc.pid) - cpu0
            print(f"REST batch submit: {n} recipients in {secs:.2f} s = {n / secs:,.0f} recipients/s "
                  f"(batch {args.batch}, {args.concurrency} concurrent requests, engine CPU {cpu_rest:.1f} s)")
            cpu0 = proc_cpu_seconds(proc.pid)
            m, secs = await smtp_load("127.0.0.1", smtp_port, args.smtp_messages, args.smtp_clients, args.time_limit)
            cpu_smtp = proc_cpu_seconds(proc.pid) - cpu0
            print(f"SMTP submit: {m} messages of 2 KB in {secs:.2f} s = {m / secs:,.0f} messages/s "
                  f"({args.smtp_clients} concurrent clients, engine CPU {cpu_smtp:.1f} s)")
            print(f"engine peak RSS: {proc_peak_rss_mb(proc.pid):.0f} MB")
    print(f"command: {COMMAND} --recipients {args.recipients} --smtp-messages {args.smtp_messages}")


if __name__ == "__main__":
    asyncio.run(main())
