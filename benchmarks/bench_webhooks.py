"""Events out: webhook dispatch to a fast local receiver, alone and while the end-to-end benchmark runs.

The receiver is an aiohttp app in **its own process** on 127.0.0.1 (so it does not share the
dispatcher's process or event loop; on a 2-core machine it still shares the cores). It answers
200 to every POST, verifies each request's Standard Webhooks signature (independently of the
engine), and stamps each event's arrival with the wall clock; lag is arrival minus the event's
``timestamp`` (the event row's creation time in Postgres, same machine, same clock).

Part 1, dispatch throughput (``dispatch-unbatched``, ``dispatch-batched``). A fresh engine
without delivery workers and without a dispatcher (``[webhooks] enabled = false``) gets an
endpoint through ``POST /v1/webhooks`` and N messages through ``POST /v1/messages/batch``:
N real ``email.accepted`` events wait in the event stream. The engine stops, one ``engine
webhooks run`` process starts, and the clock runs from its start-up log line (before its first
fan-out) to the arrival of the N-th event. Unbatched: one event per request; batched:
``--batch-size`` events per request.

Part 2, during the end-to-end run (``e2e-off``, ``e2e-unbatched``, ``e2e-batched``): the REST
variant of ``bench_e2e`` (same engine config, same load, DKIM off, the counting SMTP sink),
with ``[webhooks] enabled = false`` versus the engine's own dispatcher (the one ``engine run``
starts) sending every event (``email.accepted`` and ``email.delivered``: 2 per message) to the
receiver; ``e2e-batched-proc`` / ``e2e-unbatched-proc`` run the dispatcher as a separate ``engine
webhooks run`` process beside an engine whose own is off. Reported: the delivery rate side by side, events received while mail flowed, the
event-to-2xx lag measured at the receiver (p50/p95/max) and the one the engine reports
(``engine webhooks status --json``: ``delivered_at - event_at`` of the delivery rows).

Targets (issue 10): >= 2,000 events/s batched; p95 lag < 2 s while delivering at full speed;
delivery rate within 10% of webhooks off. Printed, not asserted.

Run: ``.venv/bin/python -m benchmarks.bench_webhooks [--messages 10000] [--events 10000]
[--batch-size 100] [--rounds 1] [--only dispatch-batched,e2e-off,e2e-batched] [--profile]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.bench_e2e import (
    PhaseHooks,
    PhaseRun,
    Profiler,
    Result,
    add_engine_args,
    engine_config,
    engine_phase,
    guarded,
    rest_load,
)
from benchmarks.harness import (
    OUT,
    create_database,
    create_key,
    engine_process,
    free_port,
    postgres,
    postgres_pid,
    proc_cpu_seconds,
    tree_cpu_seconds,
    wait_http,
)
from benchmarks.sink import CountingSink

COMMAND = ".venv/bin/python -m benchmarks.bench_webhooks"
E2E_MODES = ["off", "unbatched", "batched", "unbatched-proc", "batched-proc"]
PARTS = ["dispatch-unbatched", "dispatch-batched", *(f"e2e-{m}" for m in E2E_MODES)]
DEFAULT_PARTS = ["dispatch-unbatched", "dispatch-batched", "e2e-off", "e2e-unbatched", "e2e-batched", "e2e-batched-proc"]
PG = "webhooks"


# --------------------------------------------------------------------------- the receiver (its own process)


def _pct(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(round(p / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


async def _serve(host: str, port: int) -> None:
    """POST /hook answers 200 and records (event id, event timestamp, arrival); /_control/* reads and resets."""
    import base64
    import hashlib
    import hmac
    from collections import Counter
    from datetime import datetime

    import orjson
    from aiohttp import web

    state: dict[str, Any] = {}

    def reset(secret: str | None) -> None:
        state.update(
            key=base64.b64decode(secret.removeprefix("whsec_")) if secret else None,
            records=[], requests=0, bad=0, samples={},
        )

    reset(None)

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        at = time.time()
        state["requests"] += 1
        key = state["key"]
        if key is not None:
            msg_id, ts = request.headers.get("webhook-id", ""), request.headers.get("webhook-timestamp", "")
            expected = base64.b64encode(hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest())
            sigs = [s.partition(",")[2].encode() for s in request.headers.get("webhook-signature", "").split(" ")]
            if not any(hmac.compare_digest(s, expected) for s in sigs):
                state["bad"] += 1
        parsed = orjson.loads(body)
        events = parsed if isinstance(parsed, list) else [parsed]
        records = state["records"]
        for ev in events:
            records.append((ev["id"], ev["type"], ev["timestamp"], at))
        samples = state["samples"]
        kind = "batch" if isinstance(parsed, list) else events[0]["type"]
        if kind not in samples:
            samples[kind] = {
                "headers": {k: request.headers[k] for k in ("content-type", "user-agent", "webhook-id",
                                                             "webhook-timestamp", "webhook-signature") if k in request.headers},
                "body": body.decode(),
            }
        return web.Response(status=200)

    async def control_reset(request: web.Request) -> web.Response:
        reset((await request.json()).get("secret"))
        return web.json_response({"ok": True})

    async def control_count(request: web.Request) -> web.Response:
        return web.json_response({"events": len(state["records"]), "requests": state["requests"]})

    async def control_count_before(request: web.Request) -> web.Response:
        t = float(request.query["t"])
        return web.json_response({"events": sum(1 for r in state["records"] if r[3] <= t)})

    async def control_stats(request: web.Request) -> web.Response:
        records = state["records"]
        lags: dict[str, list[float]] = {}
        for _, kind, ts, at in records:
            lags.setdefault(kind, []).append(at - datetime.fromisoformat(ts).timestamp())
        every = sorted(x for v in lags.values() for x in v)
        by_type = {k: {"events": len(v), "lag_p50": _pct(sorted(v), 50), "lag_p95": _pct(sorted(v), 95)}
                   for k, v in lags.items()}
        unique = len({r[0] for r in records})
        return web.json_response({
            "events": len(records), "unique": unique, "duplicates": len(records) - unique,
            "requests": state["requests"], "bad_signatures": state["bad"],
            "first_at": min((r[3] for r in records), default=None), "last_at": max((r[3] for r in records), default=None),
            "lag_p50": _pct(every, 50), "lag_p95": _pct(every, 95), "lag_p99": _pct(every, 99),
            "lag_max": every[-1] if every else None, "by_type": by_type,
            "types": dict(Counter(r[1] for r in records)),
        })

    async def control_samples(request: web.Request) -> web.Response:
        return web.json_response(state["samples"])

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/hook", hook)
    app.router.add_post("/_control/reset", control_reset)
    app.router.add_get("/_control/count", control_count)
    app.router.add_get("/_control/count_before", control_count_before)
    app.router.add_get("/_control/stats", control_stats)
    app.router.add_get("/_control/samples", control_samples)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    await asyncio.Event().wait()


def serve(listen: str) -> None:
    host, _, port = listen.rpartition(":")
    if not host.startswith("127."):
        raise SystemExit("the receiver listens on loopback only")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(host, int(port)))


class Receiver:
    """The receiver process, seen from the benchmark."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/hook"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_webhooks", "--serve", f"127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=open(log_dir / "receiver.log", "wb"),
        )
        self.client = httpx.AsyncClient(timeout=60)

    async def ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the receiver exited {self.proc.returncode}")
            try:
                await self.count()
                return
            except httpx.TransportError:
                await asyncio.sleep(0.1)
        raise RuntimeError("the receiver did not come up")

    async def reset(self, secret: str | None) -> None:
        (await self.client.post(self.base + "/_control/reset", json={"secret": secret})).raise_for_status()

    async def count(self) -> int:
        return int((await self.client.get(self.base + "/_control/count")).json()["events"])

    async def stats(self) -> dict[str, Any]:
        return dict((await self.client.get(self.base + "/_control/stats")).json())

    async def samples(self) -> dict[str, Any]:
        return dict((await self.client.get(self.base + "/_control/samples")).json())

    async def wait_for(self, target: int, deadline: float) -> int:
        """Poll the event count until ``target`` or ``perf_counter() >= deadline`` (bounded)."""
        n = await self.count()
        while n < target and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
            n = await self.count()
        return n

    def cpu(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    async def close(self) -> None:
        await self.client.aclose()
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------- engine helpers


def webhooks_config(enabled: bool, args: argparse.Namespace) -> str:
    cfg = f"[webhooks]\nenabled = {'true' if enabled else 'false'}\nallow_private_targets = true\n"
    if args.wh_concurrency:
        cfg += f"concurrency = {args.wh_concurrency}\n"
    return cfg


async def create_endpoint(engine_url: str, admin_key: str, target: str, batch: int, wait_ms: int) -> tuple[str, str]:
    """``POST /v1/webhooks``: all events, all streams; batched when ``batch > 1``. Returns (id, secret)."""
    body: dict[str, Any] = {"url": target, "description": "bench_webhooks receiver"}
    if batch > 1:
        body["batch"] = {"max_events": batch, "max_wait_ms": wait_ms}
    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.post(engine_url + "/v1/webhooks", json=body, headers={"Authorization": f"Bearer {admin_key}"})
    if r.status_code != 201:
        raise RuntimeError(f"POST /v1/webhooks: {r.status_code} {r.text[:300]}")
    created = r.json()
    return str(created["id"]), str(created["secret"])


def webhooks_status(dsn: str, home: Path, config: Path) -> dict[str, Any] | None:
    """``engine webhooks status --json``: the engine's own backlog and lag figures for the (one) endpoint."""
    env = {**os.environ, "DATABASE_URL": dsn, "ENGINE_HOME": str(home)}
    out = subprocess.run(
        [sys.executable, "-m", "engine", "--config", str(config), "webhooks", "status", "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-300:]}
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]  # --json: JSON Lines
    return dict(rows[0]) if rows else None


SPLIT_SQL = """
SELECT e.type, count(*)::int AS n,
       percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY extract(epoch FROM d.created_at - d.event_at)) AS fanout,
       percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY extract(epoch FROM d.delivered_at - d.created_at)) AS send
FROM webhook_deliveries d JOIN events e ON e.id = d.event_id
WHERE d.state = 'delivered' GROUP BY ROLLUP (e.type) ORDER BY e.type NULLS FIRST
"""


async def lag_split(dsn: str) -> dict[str, Any]:
    """Where the engine's lag is, from the delivery rows (a diagnostic; the benchmark's own SQL, read only):
    event row created -> its delivery row written by the fan-out, and that -> the 2xx recorded."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(SPLIT_SQL)
    finally:
        await conn.close()
    return {("all" if r["type"] is None else "email." + r["type"]): dict(r) for r in rows}


async def start_dispatcher(dsn: str, home: Path, config: Path) -> subprocess.Popen[bytes]:
    """``engine webhooks run`` with ``config``; returns once it logged that it started (bounded)."""
    env = {**os.environ, "DATABASE_URL": dsn, "ENGINE_HOME": str(home)}
    log_path = home / "dispatcher.log"
    with open(log_path, "wb") as log:
        disp = subprocess.Popen([sys.executable, "-m", "engine", "--config", str(config), "webhooks", "run"],
                                env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.perf_counter() + 60
    while b"webhook_dispatcher_started" not in log_path.read_bytes():
        if disp.poll() is not None or time.perf_counter() > deadline:
            stop_dispatcher(disp)
            raise RuntimeError(f"engine webhooks run did not start, see {log_path}")
        await asyncio.sleep(0.01)
    return disp


def stop_dispatcher(disp: subprocess.Popen[bytes]) -> None:
    disp.terminate()
    try:
        disp.wait(30)
    except subprocess.TimeoutExpired:
        disp.kill()
        disp.wait()


def wall_offset() -> float:
    """wall clock - perf_counter: the receiver stamps with time.time(), the phases with perf_counter."""
    return time.time() - time.perf_counter()


# --------------------------------------------------------------------------- part 1: dispatch throughput


@dataclass
class Dispatch:
    mode: str
    batch: int
    target: int
    received: int = 0
    seconds: float = 0.0          # dispatcher started (log line) -> last event arrived
    spread: float = 0.0           # first -> last arrival
    requests: int = 0
    cpu: float | None = None      # the dispatcher process, start-up line -> end
    pg_cpu: float | None = None
    rx_cpu: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    profile: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else 0.0


async def dispatch_phase(mode: str, pg_dsn: str, rx: Receiver, args: argparse.Namespace) -> Dispatch:
    batch = args.batch_size if mode == "batched" else 1
    n = args.events
    res = Dispatch(mode, batch, n)
    home = OUT / f"webhooks-dispatch-{mode}"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    dsn = await create_database(pg_dsn, f"wh_dispatch_{mode}")
    http_port = free_port()
    # No delivery workers: each message stays queued and has exactly one event (email.accepted).
    base = engine_config(http_port, free_port(), rx.port, argparse.Namespace(**{**vars(args), "workers": 0}), None)
    key = await asyncio.to_thread(create_key, dsn, home, "admin")
    with engine_process(dsn, base + webhooks_config(False, args), home) as proc:
        url = f"http://127.0.0.1:{http_port}"
        await wait_http(url)
        _, secret = await create_endpoint(url, key, rx.url, batch, args.batch_wait_ms)
        await rx.reset(secret)
        accepted = await rest_load(url, key, n, args.batch, args.rest_concurrency, time.perf_counter() + args.phase_limit, False)
        if proc.poll() is not None:
            raise RuntimeError(f"engine exited {proc.returncode}, see {home}/engine.log")
    if accepted < n:
        res.note = f"only {accepted} of {n} messages accepted; "
    cfg = home / "dispatch.toml"
    cfg.write_text(base + webhooks_config(True, args))
    pg = postgres_pid(PG)
    disp = await start_dispatcher(dsn, home, cfg)
    try:
        t_ready = time.perf_counter()
        cpu0, pg0, rx0 = proc_cpu_seconds(disp.pid), (tree_cpu_seconds(pg) if pg else 0.0), rx.cpu()
        profiler = Profiler(OUT / "webhooks-profile" / mode) if args.profile else None
        if profiler:
            profiler.start(disp.pid)
        res.received = await rx.wait_for(accepted, t_ready + args.phase_limit)
        res.cpu = proc_cpu_seconds(disp.pid) - cpu0
        res.pg_cpu = (tree_cpu_seconds(pg) - pg0) if pg else None
        res.rx_cpu = rx.cpu() - rx0
        res.profile = profiler.stop() if profiler else []
        res.stats = await rx.stats()
        off = wall_offset()
        if res.stats["last_at"] is not None:
            res.seconds = res.stats["last_at"] - off - t_ready
            res.spread = res.stats["last_at"] - res.stats["first_at"]
        res.requests = res.stats["requests"]
        res.received = res.stats["unique"]
        if res.received < accepted:
            res.note += f"partial: {res.received}/{accepted} events within {args.phase_limit:.0f} s; "
        if disp.poll() is not None:
            res.note += f"dispatcher exited {disp.returncode}, see {home}/dispatcher.log; "
    finally:
        stop_dispatcher(disp)
    return res


# --------------------------------------------------------------------------- part 2: during the e2e run


@dataclass
class E2E:
    mode: str
    result: Result
    batch: int = 1
    stats: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] | None = None
    split: dict[str, Any] = field(default_factory=dict)
    in_window: int = 0            # events that arrived between the first submit and the last mail delivered
    window: float = 0.0
    drain: float | None = None    # last event arrival - last mail delivered
    rx_cpu: float | None = None
    disp_cpu: float | None = None  # the separate dispatcher process (-proc modes)


async def e2e_phase(mode: str, pg_dsn: str, sink: CountingSink, rx: Receiver, args: argparse.Namespace, rnd: int) -> E2E:
    """``mode``: off, unbatched, batched (the engine's own dispatcher, inside ``engine run``), or
    unbatched-proc, batched-proc (``[webhooks] enabled = false`` and one ``engine webhooks run`` beside it)."""
    on = mode != "off"
    own_process = mode.endswith("-proc")
    batch = args.batch_size if mode.startswith("batched") else 1
    out = E2E(mode, Result(mode, args.messages, 0, 0.0, None, None, "-"), batch)
    times: list[float] = []
    disp: list[subprocess.Popen[bytes]] = []

    async def ready(run: PhaseRun) -> None:
        admin = await asyncio.to_thread(create_key, run.dsn, run.home, "admin")
        _, secret = await create_endpoint(run.url, admin, rx.url, batch, args.batch_wait_ms)
        await rx.reset(secret)
        if own_process:
            cfg = run.home / "dispatch.toml"
            cfg.write_text(run.config.read_text().replace(webhooks_config(False, args), webhooks_config(True, args)))
            disp.append(await start_dispatcher(run.dsn, run.home, cfg))
            times.append(proc_cpu_seconds(disp[0].pid))
        times.insert(0, rx.cpu())

    async def delivered(run: PhaseRun) -> None:
        # Every message has 2 events (accepted, delivered); wait for the tail, bounded.
        try:
            await rx.wait_for(2 * args.messages, time.perf_counter() + args.drain_limit)
            if disp:
                out.disp_cpu = proc_cpu_seconds(disp[0].pid) - times[1]
        finally:
            for d in disp:
                stop_dispatcher(d)
        out.rx_cpu = rx.cpu() - times[0]
        out.stats = await rx.stats()
        off = wall_offset()
        t0, last_mail = run.t0 + off, run.last_at + off
        out.window = last_mail - t0
        if out.stats["last_at"] is not None:
            out.drain = out.stats["last_at"] - last_mail
        # arrivals inside the window need the per-event times: ask the receiver for a count by time
        out.in_window = await _arrivals_before(rx, last_mail)
        out.status = await asyncio.to_thread(webhooks_status, run.dsn, run.home, run.config)
        out.split = await lag_split(run.dsn)

    hooks = PhaseHooks(config=webhooks_config(on and not own_process, args), ready=ready if on else None,
                       delivered=delivered if on else None)
    variant = f"engine-rest-wh-{mode}-{rnd}"
    out.result = await guarded(variant, args, engine_phase(variant, pg_dsn, PG, sink, args, hooks))
    return out


async def _arrivals_before(rx: Receiver, wall: float) -> int:
    r = await rx.client.get(rx.base + "/_control/count_before", params={"t": wall})
    return int(r.json()["events"]) if r.status_code == 200 else -1


# --------------------------------------------------------------------------- report


def _s(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def report(dispatch: list[Dispatch], e2e: list[E2E], args: argparse.Namespace, sink: CountingSink | None,
           argv: list[str], load: str) -> list[str]:
    lines: list[str] = []
    p = lines.append
    p(f"machine: {os.cpu_count()} CPUs, 1-min load average {load} (other jobs share this machine)")
    p("receiver: aiohttp (uvloop) in its own process on 127.0.0.1, answers 200, verifies every signature")
    if dispatch:
        p("")
        p(f"1. dispatch of a waiting backlog of {args.events} email.accepted events by one `engine webhooks run` process "
          f"([webhooks] concurrency {args.wh_concurrency or 8}); clock: dispatcher start-up line -> last event received")
        head = (f"{'mode':<18} {'events':>7} {'requests':>8} {'seconds':>8} {'events/s':>9} {'first->last/s':>13} "
                f"{'disp CPU s':>10} {'PG CPU s':>8} {'rx CPU s':>8}")
        p(head)
        p("-" * len(head))
        for d in dispatch:
            label = "unbatched" if d.batch == 1 else f"batched ({d.batch}/POST)"
            spread_rate = d.received / d.spread if d.spread > 0 else 0.0
            p(f"{label:<18} {d.received:>7} {d.requests:>8} {d.seconds:>8.2f} {d.rate:>9.0f} {spread_rate:>13.0f} "
              f"{_s(d.cpu, '{:.1f}'):>10} {_s(d.pg_cpu, '{:.1f}'):>8} {_s(d.rx_cpu, '{:.1f}'):>8}")
            extra = []
            if d.stats.get("bad_signatures"):
                extra.append(f"{d.stats['bad_signatures']} BAD SIGNATURES")
            if d.stats.get("duplicates"):
                extra.append(f"{d.stats['duplicates']} duplicates")
            if d.note:
                extra.append(d.note.rstrip("; "))
            if extra:
                p(f"{'':<18} note: " + "; ".join(extra))
        for d in dispatch:
            for line in d.profile:
                p(line)
    if e2e:
        p("")
        p(f"2. end to end, REST batch, {args.messages} messages of ~2 KB to {sink.kind if sink else '-'}, "
          f"{args.workers} delivery workers, DKIM off; the engine's own dispatcher (in `engine run`'s listener process; "
          f"'own proc': [webhooks] enabled = false and one `engine webhooks run` beside it) sends every event "
          f"(2 per message); lag = receiver arrival - event timestamp")
        head = (f"{'variant':<26} {'delivered':>9} {'seconds':>8} {'msg/s':>7} {'vs off':>7} {'events':>7} "
                f"{'in run':>7} {'ev/s in run':>11} {'lag p50':>8} {'lag p95':>8} {'lag max':>8} {'drain s':>8} "
                f"{'engine p50/p95':>15}")
        p(head)
        p("-" * len(head))
        offs = [r.result.rate for r in e2e if r.mode == "off" and r.result.rate > 0]
        off_rate = sum(offs) / len(offs) if offs else 0.0
        for r in e2e:
            res = r.result
            label = "webhooks off" if r.mode == "off" else ("on, unbatched" if r.batch == 1 else f"on, batched ({r.batch})")
            if r.mode.endswith("-proc"):
                label += ", own proc"
            vs = f"{100 * res.rate / off_rate:.0f}%" if off_rate and r.mode != "off" else "-"
            st, s = r.status or {}, r.stats
            ev_rate = r.in_window / r.window if r.window > 0 and r.in_window >= 0 else None
            p(f"{label:<26} {res.delivered:>9} {res.seconds:>8.2f} {res.rate:>7.0f} {vs:>7} "
              f"{s.get('unique', 0) if r.mode != 'off' else '-':>7} {r.in_window if r.mode != 'off' else '-':>7} "
              f"{_s(ev_rate, '{:.0f}'):>11} {_s(s.get('lag_p50')):>8} {_s(s.get('lag_p95')):>8} {_s(s.get('lag_max')):>8} "
              f"{_s(r.drain):>8} {_s(st.get('lag_p50_seconds')) + '/' + _s(st.get('lag_p95_seconds')):>15}")
            details = []
            if res.cpu is not None:
                details.append(f"engine CPU {res.cpu:.1f} s ({res.cpu_split}), PG {_s(res.pg_cpu, '{:.1f}')} s")
            if r.disp_cpu is not None:
                details.append(f"`engine webhooks run` CPU {r.disp_cpu:.1f} s")
            if r.rx_cpu is not None:
                details.append(f"receiver CPU {r.rx_cpu:.1f} s")
            bt = s.get("by_type") or {}
            for t in sorted(bt):
                details.append(f"{t} {bt[t]['events']} p95 {_s(bt[t]['lag_p95'])} s")
            if s.get("bad_signatures"):
                details.append(f"{s['bad_signatures']} BAD SIGNATURES")
            if s.get("duplicates"):
                details.append(f"{s['duplicates']} duplicates")
            if details:
                p(f"{'':<26} " + "; ".join(details))
            for kind, sp in r.split.items():
                if sp.get("fanout") and sp.get("send"):
                    p(f"{'':<26} engine split p50/p95 ({kind}): event -> fanned out {sp['fanout'][0]:.2f}/{sp['fanout'][1]:.2f} s, "
                      f"fanned out -> 2xx recorded {sp['send'][0]:.2f}/{sp['send'][1]:.2f} s")
            if res.note:
                p(f"{'':<26} note: {res.note}")
        for r in e2e:
            for line in r.result.profile:
                p(line)
    p("")
    batched = [d for d in dispatch if d.batch > 1 and d.rate > 0]
    if batched:
        best = max(d.rate for d in batched)
        p(f"target >= 2,000 events/s batched: {best:.0f} events/s -> {'met' if best >= 2000 else 'NOT met'}")
    for mode in E2E_MODES[1:]:
        lags = [float(r.stats["lag_p95"]) for r in e2e if r.mode == mode and r.stats.get("lag_p95") is not None]
        if lags:
            worst = max(lags)
            p(f"target p95 lag < 2 s during the e2e run ({mode}): {', '.join(f'{x:.2f}' for x in lags)} s -> "
              f"{'met' if worst < 2 else 'NOT met'}")
    offs = [r.result.rate for r in e2e if r.mode == "off" and r.result.rate > 0]
    ons = [r for r in e2e if r.mode != "off" and r.result.rate > 0]
    if offs and ons:
        ref = sum(offs) / len(offs)
        for mode in E2E_MODES[1:]:
            rates = [r.result.rate for r in ons if r.mode == mode]
            if rates:
                ratio = sum(rates) / len(rates) / ref
                p(f"target delivery rate within 10% of webhooks off ({mode}): {100 * ratio:.0f}% -> "
                  f"{'met' if ratio >= 0.9 else 'NOT met'}")
    p("command: " + " ".join([COMMAND, *argv]))
    return lines


# --------------------------------------------------------------------------- main


async def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_args(ap, messages=10_000)
    ap.add_argument("--events", type=int, default=10_000, help="backlog size of the dispatch parts")
    ap.add_argument("--batch-size", type=int, default=100, help="max_events per POST of the batched endpoint")
    ap.add_argument("--batch-wait-ms", type=int, default=1000, help="max_wait_ms of the batched endpoint")
    ap.add_argument("--wh-concurrency", type=int, default=0, help="[webhooks] concurrency (0: the engine default)")
    ap.add_argument("--drain-limit", type=float, default=120.0, help="seconds to wait for the last events after the last mail")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the e2e parts, alternating (off, on, ...)")
    ap.add_argument("--only", default=",".join(DEFAULT_PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = ap.parse_args(argv)
    only = [v.strip() for v in args.only.split(",") if v.strip()]
    unknown = set(only) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; pick from {PARTS}")
    OUT.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    rx = Receiver(OUT / "webhooks-receiver")
    dispatch: list[Dispatch] = []
    e2e: list[E2E] = []
    sink: CountingSink | None = None
    samples: dict[str, Any] = {}
    try:
        await rx.ready()
        with postgres(PG) as pg_dsn:
            for mode in ("unbatched", "batched"):
                if f"dispatch-{mode}" in only:
                    try:
                        dispatch.append(await dispatch_phase(mode, pg_dsn, rx, args))
                    except Exception as exc:  # noqa: BLE001 - reported, the other parts go on
                        dispatch.append(Dispatch(mode, args.batch_size if mode == "batched" else 1, args.events,
                                                 note=f"failed: {type(exc).__name__}: {exc}"))
            modes = [m for m in E2E_MODES if f"e2e-{m}" in only]
            if modes:
                sink = CountingSink(free_port(), OUT / "webhooks-sink")
                sink.wait_ready()
                for rnd in range(args.rounds):
                    for mode in modes:
                        e2e.append(await e2e_phase(mode, pg_dsn, sink, rx, args, rnd))
                        if mode.startswith("unbatched"):
                            samples.update(await rx.samples())
                        elif mode.startswith("batched"):
                            samples.setdefault("batch", (await rx.samples()).get("batch"))
    finally:
        if sink is not None:
            sink.close()
        await rx.close()
    lines = report(dispatch, e2e, args, sink, argv, f"{load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print("\n".join(lines))
    (OUT / "webhooks-report.txt").write_text("\n".join(lines) + "\n")
    if samples:
        (OUT / "webhooks-samples.json").write_text(json.dumps(samples, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(sys.argv[2])
    else:
        asyncio.run(main(sys.argv[1:]))
