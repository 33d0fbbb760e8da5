"""Submission into the durable outbox, with 1 and 2 intake processes side by side.

Loads, each against an engine with delivery off: REST batches (1,000 recipients per
request), single-message REST from 20 concurrent clients (``wrk``), SMTP with 20
sessions reusing their connection, and SMTP with a new connection per message
(``smtp-source`` without ``-d``, Postfix's load generator), which is how many
applications submit.

Run: ``.venv/bin/python -m benchmarks.bench_submit [--intake 1,2] [--recipients N] [--smtp-messages N]``
(wrk: ``apt-get install wrk``; smtp-source: ``apt-get install postfix``; a load without its
tool is skipped). Prints a table; figures are not asserted anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks import postfix as pfx
from benchmarks.harness import (
    OUT,
    create_key,
    engine_process,
    free_port,
    postgres,
    tree_cpu_seconds,
    tree_peak_rss_mb,
    wait_http,
)

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


def wrk_single(url: str, key: str, connections: int, seconds: float, workdir: Path) -> tuple[float, int, str]:
    """``wrk``: ``connections`` clients POSTing one single-recipient message each, for ``seconds``.

    wrk (C, Debian package ``wrk``) rather than a Python client: on a 2-core machine the
    load generator must cost little next to the engine. Returns (requests/s, non-2xx, p99).
    """
    script = workdir / "single.lua"
    body = json.dumps({"from": "app@example.com", "to": ["someone@example.net"], "subject": "Your receipt",
                       "text": "Thanks for your order. " * 20})
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n'
    )
    out = subprocess.run(
        ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds:.0f}s", "--latency", "-s", str(script),
         url + "/v1/messages"], capture_output=True, text=True, timeout=seconds + 60,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    p99 = re.search(r"99%\s+(\S+)", out)
    return rate, int(bad.group(1)) if bad else 0, p99.group(1) if p99 else "?"


async def smtp_source_new_connections(port: int, messages: int, sessions: int, time_limit: float) -> tuple[int, float]:
    """``smtp-source`` without ``-d``: a new connection (banner, EHLO, QUIT) for every message."""
    cmd = [c for c in pfx.smtp_source("127.0.0.1", port, messages, sessions, 2048, "app@example.com",
                                      "user@example.net") if c != "-d"]
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await asyncio.wait_for(proc.wait(), time_limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
    return messages if proc.returncode == 0 else 0, time.perf_counter() - start


@dataclass
class Row:
    intake: int
    figures: dict[str, str] = field(default_factory=dict)


async def measure(args: argparse.Namespace, intake: int) -> Row:
    """One engine (delivery off) with ``intake`` intake processes, every submission load in turn."""
    http_port, smtp_port = free_port(), free_port()
    config = (
        f'[server]\nintake_processes = {intake}\n'
        f'[http]\nlisten = "127.0.0.1:{http_port}"\n'
        f'[database]\npool_max = 20\n'
        f'[delivery]\nworkers = 0\n'
        f'[[smtp.listeners]]\nname = "local"\nlisten = "127.0.0.1:{smtp_port}"\ntrusted = true\n'
    )
    home = OUT / f"submit-home-{intake}"
    row = Row(intake)
    with postgres(f"submit-{intake}") as dsn:
        key = create_key(dsn, home)
        with engine_process(dsn, config, home) as proc:
            url = f"http://127.0.0.1:{http_port}"
            await wait_http(url)
            await asyncio.sleep(3)  # every intake child up (wait_http sees the first)

            def cpu() -> float:
                return tree_cpu_seconds(proc.pid)

            c0 = cpu()
            n, secs = await rest_load(url, key, args.recipients, args.batch, args.concurrency, args.time_limit)
            row.figures["REST batch (recipients/s)"] = f"{n / secs:,.0f}"
            row.figures["REST batch CPU s/1k"] = f"{(cpu() - c0) / n * 1000:.2f}"
            print(f"[intake {intake}] REST batch: {n} recipients in {secs:.2f} s = {n / secs:,.0f}/s", flush=True)
            if shutil.which("wrk"):
                c0 = cpu()
                rate, bad, p99 = await asyncio.to_thread(wrk_single, url, key, args.rest_clients, args.rest_seconds, home)
                row.figures[f"REST single, {args.rest_clients} clients (req/s)"] = f"{rate:,.0f}"
                row.figures["REST single p99"] = p99
                row.figures["REST single non-2xx"] = str(bad)
                print(f"[intake {intake}] REST single: {rate:,.0f} req/s, p99 {p99}, non-2xx {bad}", flush=True)
            c0 = cpu()
            m, secs = await smtp_load("127.0.0.1", smtp_port, args.smtp_messages, args.smtp_clients, args.time_limit)
            row.figures["SMTP reused (msg/s)"] = f"{m / secs:,.0f}"
            row.figures["SMTP reused CPU s/1k"] = f"{(cpu() - c0) / max(m, 1) * 1000:.2f}"
            print(f"[intake {intake}] SMTP reused: {m / secs:,.0f} msg/s", flush=True)
            if shutil.which("smtp-source"):
                c0 = cpu()
                m, secs = await smtp_source_new_connections(smtp_port, args.smtp_messages, args.smtp_clients,
                                                            args.time_limit)
                row.figures["SMTP new connection each (msg/s)"] = f"{m / secs:,.0f}"
                row.figures["SMTP new conn CPU s/1k"] = f"{(cpu() - c0) / max(m, 1) * 1000:.2f}"
                print(f"[intake {intake}] SMTP new connection per message: {m / secs:,.0f} msg/s", flush=True)
            row.figures["engine tree peak RSS (MB)"] = f"{sum(tree_peak_rss_mb(proc.pid).values()):.0f}"
    return row


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipients", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--smtp-messages", type=int, default=10_000)
    ap.add_argument("--smtp-clients", type=int, default=20)
    ap.add_argument("--rest-clients", type=int, default=20)
    ap.add_argument("--rest-seconds", type=float, default=15)
    ap.add_argument("--intake", default="1,2", help="intake process counts to compare, e.g. 1,2")
    ap.add_argument("--time-limit", type=float, default=120)
    args = ap.parse_args()
    rows = [await measure(args, int(n)) for n in args.intake.split(",")]
    print(f"\nload average {os.getloadavg()[0]:.1f}; delivery off; CPU = the engine's process tree")
    names = list(dict.fromkeys(k for r in rows for k in r.figures))
    print("| load | " + " | ".join(f"intake {r.intake}" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name in names:
        print(f"| {name} | " + " | ".join(r.figures.get(name, "-") for r in rows) + " |")
    print(f"command: {COMMAND} --intake {args.intake} --recipients {args.recipients} "
          f"--smtp-messages {args.smtp_messages}")


if __name__ == "__main__":
    asyncio.run(main())
