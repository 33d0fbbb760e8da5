"""Consent bulk sync: POST /v1/consent/import throughput, NDJSON plain and gzip, against a running engine.

Run: .venv/bin/python -m benchmarks.bench_consent [--sizes 100000,1000000]
For each size, a fresh database gets two imports of that many new consent lines (different
addresses: one posted plain, one gzip with Content-Encoding), then the plain file again (every
line unchanged: the idempotent re-sync a CRM does nightly). Prints rows/s per import and the
CPU seconds the engine process and Postgres spent; the issue's target is 50,000 rows/s. Bodies
are built before the clock starts and streamed in 1 MB chunks (never held whole by the engine).
Figures are not asserted anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import zlib
from collections.abc import AsyncIterator

import httpx
import orjson

from benchmarks.harness import (
    OUT,
    create_database,
    create_key,
    engine_process,
    free_port,
    postgres,
    postgres_pid,
    proc_peak_rss_mb,
    tree_cpu_seconds,
    tree_pids,
    wait_http,
)

COMMAND = ".venv/bin/python -m benchmarks.bench_consent"
CHUNK = 1 << 20


def pg_processes(root: int) -> dict[int, tuple[str, float]]:
    """pid -> (kind, CPU seconds incl. reaped children) for the Postgres tree: where its time goes."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                title = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        kind = title.removeprefix("postgres: ")
        if " " in kind and not kind.startswith(("autovacuum", "background", "logical", "walwriter", "checkpointer")):
            kind = "client backends"  # "user db host state": one line for all sessions
        out[pid] = (kind or "postmaster", (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / ticks)
    return out


def pg_breakdown(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> str:
    spent: dict[str, float] = {}
    for pid, (kind, cpu) in after.items():
        spent[kind] = spent.get(kind, 0.0) + cpu - before.get(pid, (kind, 0.0))[1]
    return ", ".join(f"{k} {v:.1f}" for k, v in sorted(spent.items(), key=lambda kv: -kv[1]) if v >= 0.05)


def body(n: int, prefix: str) -> bytes:
    """``n`` consent lines as a CRM exports them (about 230 bytes each)."""
    statuses = ("granted", "granted", "granted", "revoked", "unknown")
    return b"".join(
        orjson.dumps({
            "address": f"{prefix}{i:08d}@customers{i % 97}.example", "purpose": "marketing" if i % 3 else "sales",
            "status": statuses[i % 5], "legal_basis": "consent", "source": "crm:hubspot",
            "captured_at": f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}T10:{i % 60:02d}:00Z", "policy_version": "2026-03",
            "contact_id": f"hs-{i}",
        }) + b"\n"
        for i in range(n)
    )


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), CHUNK):
        yield data[i:i + CHUNK]


async def post(url: str, key: str, data: bytes, gz: bool) -> tuple[dict[str, object], float]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-ndjson"}
    if gz:
        headers["Content-Encoding"] = "gzip"
    async with httpx.AsyncClient(timeout=3600) as client:
        start = time.perf_counter()
        r = await client.post(url + "/v1/consent/import", content=chunks(data), headers=headers)
        secs = time.perf_counter() - start
    if r.status_code != 200:
        raise RuntimeError(f"import refused: {r.status_code} {r.text[:300]}")
    return r.json(), secs


async def run_size(server_dsn: str, n: int, webhooks: bool) -> None:
    plain, other = body(n, "p"), body(n, "g")
    compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zipped = compressor.compress(other) + compressor.flush()
    print(f"-- {n:,} lines: {len(plain) / 1e6:.0f} MB plain; the other set {len(zipped) / 1e6:.0f} MB gzip")
    dsn = await create_database(server_dsn, f"consent_{n}")
    port = free_port()
    home = OUT / f"consent-home-{n}"
    config = f'[http]\nlisten = "127.0.0.1:{port}"\n[smtp]\nenabled = false\n[delivery]\nworkers = 0\n'
    if not webhooks:
        config += "[webhooks]\nenabled = false\n"
    key = create_key(dsn, home, "consent,read")
    pg = postgres_pid("consent")
    with engine_process(dsn, config, home) as proc:
        url = f"http://127.0.0.1:{port}"
        await wait_http(url)
        for label, data, gz in (("plain", plain, False), ("gzip", zipped, True), ("plain again", plain, False)):
            cpu0, pg0 = tree_cpu_seconds(proc.pid), pg_processes(pg) if pg else {}
            out, secs = await post(url, key, data, gz)
            await asyncio.sleep(1)  # let the dispatcher and autovacuum react to what was written
            pg1 = pg_processes(pg) if pg else {}
            cpu = tree_cpu_seconds(proc.pid) - cpu0
            pgcpu = sum(c for _, c in pg1.values()) - sum(pg0.get(p, (k, 0.0))[1] for p, (k, _) in pg1.items())
            counts = " ".join(f"{k}={out[k]}" for k in ("new", "changed", "unchanged", "stale", "invalid"))
            print(f"import {label:<11} {n:>9,} lines in {secs:7.2f} s = {n / secs:>9,.0f} rows/s  {counts}\n"
                  f"    CPU per row: engine {cpu / n * 1e6:.0f} us, Postgres {pgcpu / n * 1e6:.0f} us "
                  f"(engine {cpu:.1f} s; Postgres {pgcpu:.1f} s: {pg_breakdown(pg0, pg1)})")
        print(f"engine peak RSS: {proc_peak_rss_mb(proc.pid):.0f} MB")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated line counts")
    ap.add_argument("--no-webhooks", action="store_true",
                    help="[webhooks] enabled = false: no dispatcher reading the consent.changed events as they come")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    with postgres("consent") as server_dsn:
        for n in sizes:
            await run_size(server_dsn, n, not args.no_webhooks)
    print(f"command: {COMMAND} --sizes {args.sizes}{' --no-webhooks' if args.no_webhooks else ''}")


if __name__ == "__main__":
    asyncio.run(main())
