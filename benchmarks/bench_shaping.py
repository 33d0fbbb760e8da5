"""Traffic shaping: configured vs measured rate per provider with 2 worker processes, and its overhead.

Run: .venv/bin/python -m benchmarks.bench_shaping [--seconds 20] [--messages 3000]

Part 1: two capped "providers" (receivers on 127.0.0.x with MX records on a loopback DNS server)
and one uncapped destination, delivered by 2 `engine worker` processes. For each provider it prints
the configured cap, the measured steady rate (messages after the first burst / time from the first
to the last delivery) and the worst excess over cap x window for any window starting at the first
delivery. Part 2: end-to-end delivery rate to one uncapped destination with shaping off (no
[shaping] file) and with shaping on but limits far above the load (every check still runs:
token leases, connection leases): the overhead of the shaping layer. Figures are printed only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import OUT, postgres
from engine.config import load_settings
from engine.db.migrate import migrate
from engine.db.pool import create_pool
from engine.ids import uuid7
from engine.outbox import NewMessage, NewRecipient, Outbox
from engine.shaping.throttle import burst_for
from tests.dnsserver import DnsServer
from tests.receivers import Receiver

COMMAND = ".venv/bin/python -m benchmarks.bench_shaping"
CAPS = {"alpha": 50.0, "beta": 25.0}


def _config(dns: tuple[str, int], port: int, shaping: bool) -> str:
    return (
        "[queue]\nlease_duration = \"60s\"\n"
        "[delivery]\nretry_schedule = [\"1s\"]\npoll_interval = \"100ms\"\nflush_interval = \"20ms\"\n"
        f"[routing]\nnameservers = [\"{dns[0]}:{dns[1]}\"]\nmx_port = {port}\n"
        + ("[shaping]\nfile = \"shaping.toml\"\n" if shaping else "")
    )


def _shaping(uncapped_only: bool) -> str:
    # 2 workers x [delivery.smtp] connection_limit (10) = what shaping off allows: compare like with like.
    text = "[default]\nconnection_limit = 20\nmax_message_rate = \"100000/s\"\n"
    if not uncapped_only:
        for name, cap in CAPS.items():
            text += (f"[provider.{name}]\nmatch = [{{MXSuffix = \".{name}.test\"}}]\n"
                     f"provider_max_message_rate = \"{cap:g}/s\"\nprovider_connection_limit = 5\n")
    return text


async def _enqueue(pool, domain: str, n: int) -> None:
    ob = Outbox(pool, 3600)
    for start in range(0, n, 1000):
        await ob.enqueue([
            NewMessage(id=uuid7(), source="smtp", mail_from="bench@sender.test", stream="relay", priority=5,
                       recipients=[NewRecipient(f"u{i}@{domain}", domain)], raw=f"Subject: {i}\r\n\r\nbody\r\n".encode())
            for i in range(start, min(n, start + 1000))
        ])


async def _run(dsn: str, home: Path, cfg_text: str, shaping_text: str | None, loads: dict[str, int],
               rxs: dict[str, Receiver], time_limit: float) -> dict[str, list[tuple[float, int]]]:
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "engine.toml"
    cfg.write_text(cfg_text)
    if shaping_text is not None:
        (home / "shaping.toml").write_text(shaping_text)
    env = {**os.environ, "DATABASE_URL": dsn, "ENGINE_HOME": str(home)}
    settings = load_settings(cfg, env=env)
    pool = await create_pool(dsn, settings)
    async with pool.acquire() as conn:
        await migrate(conn)
        await conn.execute("TRUNCATE recipients, messages, attempts, throttles, connection_leases CASCADE")
    for domain, n in loads.items():
        await _enqueue(pool, domain, n)
    base = {d: len(rxs[d].messages) for d in loads}
    cmd = [sys.executable, "-m", "engine", "--config", str(cfg), "worker"]
    logs = [open(home / f"worker{i}.log", "wb") for i in range(2)]
    procs = [subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    samples: dict[str, list[tuple[float, int]]] = {d: [] for d in loads}
    deadline = time.monotonic() + time_limit
    try:
        while time.monotonic() < deadline:
            now = time.monotonic()
            done = True
            for d, n in loads.items():
                c = len(rxs[d].messages) - base[d]
                samples[d].append((now, c))
                done = done and c >= n
            if done:
                break
            await asyncio.sleep(0.01)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)
        for log in logs:
            log.close()
        await pool.close()
    return samples


def _rate(samples: list[tuple[float, int]], skip: int = 0) -> tuple[float, float]:
    """(steady messages/s after the first ``skip`` messages, seconds from first to last delivery)."""
    t_first = next(t for t, c in samples if c > skip)
    last = samples[-1][1]
    t_last = next(t for t, c in samples if c >= last)
    span = max(1e-6, t_last - t_first)
    return (last - skip) / span, span


def _excess(samples: list[tuple[float, int]], cap: float) -> float:
    t0 = next(t for t, c in samples if c > 0) - 0.01
    return max(c - cap * (t - t0) for t, c in samples if t >= t0)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0, help="target length of the capped run")
    ap.add_argument("--messages", type=int, default=3000, help="messages for the overhead runs")
    args = ap.parse_args()
    rx = {"free.test": Receiver().start()}
    port = rx["free.test"].port
    zone: dict[str, dict[str, list[str] | str]] = {"free.test": {"MX": ["10 mx.free.test."]},
                                                   "mx.free.test": {"A": rx["free.test"].address}}
    for name in CAPS:
        r = Receiver(address=None, port=port).start()
        rx[f"{name}.example"] = r
        zone[f"{name}.example"] = {"MX": [f"10 mx1.{name}.test."]}
        zone[f"mx1.{name}.test"] = {"A": r.address}
    dns = DnsServer(zone).start()
    try:
        with postgres("shaping") as dsn:
            print(f"# {COMMAND} --seconds {args.seconds:g} --messages {args.messages}")
            print("## configured vs measured rate, 2 worker processes")
            loads = {f"{n}.example": int(c * args.seconds) for n, c in CAPS.items()}
            loads["free.test"] = 500
            samples = await _run(dsn, OUT / "shaping-capped", _config(dns.address, port, True), _shaping(False),
                                 loads, rx, args.seconds * 3 + 30)
            print(f"{'provider':<10} {'configured/s':>12} {'measured/s':>11} {'error':>7} {'worst excess':>13} {'msgs':>6}")
            for name, cap in CAPS.items():
                s = samples[f"{name}.example"]
                rate, span = _rate(s, skip=int(burst_for(cap)))
                print(f"{name:<10} {cap:>12.1f} {rate:>11.2f} {100 * (rate - cap) / cap:>+6.1f}% "
                      f"{_excess(s, cap):>9.1f} msg {s[-1][1]:>6}")
            rate, span = _rate(samples["free.test"])
            print(f"{'uncapped':<10} {'-':>12} {rate:>11.1f}   (500 messages in {span:.2f}s, alongside the capped ones)")
            print("## overhead of the shaping layer, 2 worker processes, one uncapped destination")
            results = {}
            for label, cfg, shp in (
                ("shaping off", _config(dns.address, port, False), None),
                ("shaping on (limits above the load)", _config(dns.address, port, True), _shaping(True)),
            ):
                s = await _run(dsn, OUT / f"shaping-{len(results)}", cfg, shp, {"free.test": args.messages}, rx, 300)
                results[label] = _rate(s["free.test"])[0]
                print(f"{label:<38} {results[label]:>8.1f} messages/s ({s['free.test'][-1][1]} delivered)")
            off, on = results.values()
            print(f"overhead: {100 * (off - on) / off:+.1f}% (target < 5%)")
    finally:
        dns.stop()
        for r in rx.values():
            r.stop()


if __name__ == "__main__":
    asyncio.run(main())
