"""End-to-end delivery: submit N messages and time them until the last reaches a sink.

Variants, each on a fresh engine (own database on one embedded Postgres) and timed from
the first submit to the last message counted by the sink on 127.0.0.1:

* engine REST batch      -- ``POST /v1/messages/batch`` (1000 per request, 4 in flight)
* engine SMTP            -- ``smtp-source`` (20 sessions, 2 KB bodies) into our relay
* engine SMTP + DKIM     -- the same with rsa-sha256 signing for example.com
* engine REST tpl + DKIM -- REST batch using the ``welcome`` template, signed
* Postfix SMTP           -- the same ``smtp-source`` load into a private Postfix
                            relaying to the same sink (the reference; see benchmarks/postfix.py)

The SMTP variants (``smtp-source`` load) run over two more axes, each combination in turn with
the variants alternating, so every engine figure has a Postfix figure from the same minutes:

* ``--modes``: ``reuse`` (``smtp-source -d``: message after message on each connection) and
  ``new`` (a new connection per message, how most applications and libraries submit);
* ``--sizes``: message sizes (``2k``, ``20k``, ``100k``, ``1m``); the message count is
  ``--messages`` scaled down for bigger sizes (:data:`SIZE_SCALE`) so each run stays bounded.

The REST variants run once (2 KB bodies), outside the axes. The targets (issue 14) are engine
SMTP + DKIM >= 1.5x Postfix (no DKIM) in every mode and size. Every recipient is ``@example.net``
with a static route to the sink; nothing leaves 127.0.0.1 and no DNS is asked.

Run: ``.venv/bin/python -m benchmarks.bench_e2e [--messages 20000] [--workers 2]
[--sizes 2k,100k] [--modes reuse,new] [--destination-concurrency 20] [--phase-limit 150]
[--only engine-smtp-dkim,postfix]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks import postfix as pfx
from benchmarks.harness import (
    OUT,
    ROOT,
    create_database,
    create_key,
    engine_process,
    free_port,
    postgres,
    postgres_pid,
    proc_cpu_seconds,
    tree_cpu_seconds,
    tree_peak_rss_mb,
    tree_pids,
    wait_http,
)
from benchmarks.sink import CountingSink

COMMAND = ".venv/bin/python -m benchmarks.bench_e2e"
VARIANTS = ["postfix", "engine-rest", "engine-smtp", "engine-smtp-dkim", "engine-rest-tpl-dkim"]
SENDER, RCPT_DOMAIN = "app@example.com", "example.net"
BODY_2K = ("Thanks for your order. Your parcel ships tomorrow; track it in your account.\n" * 26)[:2048]
SMTP_VARIANTS = ("postfix", "engine-smtp", "engine-smtp-dkim")
SIZES = {"2k": 2048, "20k": 20 * 1024, "100k": 100 * 1024, "1m": 1024 * 1024}
SIZE_SCALE = {"2k": 1.0, "20k": 0.4, "100k": 0.25, "1m": 0.05}
"""Share of ``--messages`` sent at each size (20,000 at 2 KB: 8,000 x 20 KB, 5,000 x 100 KB, 1,000 x 1 MB)."""
MODES = ("reuse", "new")


@dataclass(frozen=True)
class Load:
    """One point on the SMTP axes: message size and connection mode."""

    size: str = "2k"
    mode: str = "reuse"

    @property
    def octets(self) -> int:
        return SIZES[self.size]

    def messages(self, base: int) -> int:
        return max(1, round(base * SIZE_SCALE[self.size]))

    @property
    def label(self) -> str:
        return f"{self.size} {self.mode}"


@dataclass
class Result:
    variant: str
    target: int
    delivered: int
    seconds: float
    cpu: float | None          # the MTA's process tree (engine: listener + workers; Postfix: master + daemons)
    pg_cpu: float | None       # embedded Postgres (engine variants only)
    rss_mb: str                # peak RSS, human readable
    note: str = ""
    profile: list[str] = field(default_factory=list)
    cpu_split: str = ""
    submit_seconds: float | None = None  # first submit to last submit accepted
    load: Load | None = None             # the SMTP axes point (None: REST variants)

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------- load generators


async def rest_load(url: str, key: str, n: int, batch: int, concurrency: int, deadline: float, template: bool) -> int:
    """POST ``n`` one-recipient messages in batches; returns how many were accepted before ``deadline``."""
    headers = {"Authorization": f"Bearer {key}"}
    todo = list(range(0, n, batch))
    todo.reverse()
    done = 0

    def message(i: int) -> dict[str, object]:
        to = [f"user{i}@{RCPT_DOMAIN}"]
        if template:
            return {"from": SENDER, "to": to, "template": "welcome",
                    "vars": {"name": f"User {i}", "product": "Bench", "login_url": f"https://example.com/login?u={i}"}}
        return {"from": SENDER, "to": to, "subject": f"Your receipt {i}", "text": BODY_2K}

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done
        while todo and time.perf_counter() < deadline:
            base = todo.pop()
            msgs = [message(base + i) for i in range(min(batch, n - base))]
            r = await client.post(url + "/v1/messages/batch", json={"messages": msgs}, headers=headers)
            if r.status_code != 202:
                raise RuntimeError(f"batch refused: {r.status_code} {r.text[:300]}")
            done += len(msgs)

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return done


async def smtp_source_load(port: int, n: int, sessions: int, deadline: float, log: Path, load: Load = Load()) -> str:
    """``smtp-source`` into 127.0.0.1:``port``; falls back to 20 aiosmtplib clients (2 KB, reused
    connections) without Postfix tools."""
    if shutil.which("smtp-source"):
        cmd = pfx.smtp_source("127.0.0.1", port, n, sessions, load.octets, SENDER, f"user@{RCPT_DOMAIN}",
                              reuse=load.mode == "reuse")
        with open(log, "ab") as fh:
            proc = await asyncio.create_subprocess_exec(*cmd, stdout=fh, stderr=fh)
            try:
                await asyncio.wait_for(proc.wait(), max(1.0, deadline - time.perf_counter()))
            except TimeoutError:
                proc.kill()
                await proc.wait()
                return "smtp-source killed at the phase limit"
        return "" if proc.returncode == 0 else f"smtp-source exit {proc.returncode} (see {log})"
    from benchmarks.bench_submit import smtp_load

    await smtp_load("127.0.0.1", port, n, sessions, max(1.0, deadline - time.perf_counter()))
    return "load: aiosmtplib clients (smtp-source missing)"


# --------------------------------------------------------------------------- profiling (optional, --profile)


class Profiler:
    """``py-spy record`` on each engine process (listener and workers) for one phase.

    py-spy is not a project dependency (``.venv/bin/pip install py-spy``); it samples from
    outside the process (``--nonblocking``, so the engine is not paused) but its own CPU
    competes on a 2-core machine, so profiled runs are for finding hot spots, not for figures.
    """

    def __init__(self, out_dir: Path, rate: int = 200) -> None:
        self.out_dir, self.rate = out_dir, rate
        self.procs: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
        self.exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))

    def start(self, root_pid: int) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for i, pid in enumerate(tree_pids(root_pid)):
            role = "listener" if pid == root_pid else f"worker{i}"
            out = self.out_dir / f"{role}.txt"
            cmd = [self.exe, "record", "--nonblocking", "-r", str(self.rate), "-f", "raw", "-o", str(out), "-p", str(pid)]
            self.procs.append((role, out, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))

    def stop(self) -> list[str]:
        for _, _, p in self.procs:
            p.send_signal(signal.SIGINT)
        lines = []
        for role, out, p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
            lines += summarize_profile(role, out)
        return lines


def summarize_profile(role: str, path: Path, top: int = 12) -> list[str]:
    """Share of samples per function: inclusive (anywhere on the stack) and self (innermost frame)."""
    from collections import Counter

    incl: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    total = 0
    try:
        text = path.read_text()
    except OSError:
        return [f"profile {role}: no output at {path}"]
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        total += count
        for f in set(frames):
            incl[f] += count
        if frames:
            self_[frames[-1]] += count
    if not total:
        return [f"profile {role}: no samples"]
    out = [f"profile {role} ({total} samples, {path}):", "  inclusive:"]
    out += [f"    {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(2 * top)]
    out += ["  self:"] + [f"    {100 * c / total:5.1f}%  {f}" for f, c in self_.most_common(top)]
    return out


# --------------------------------------------------------------------------- phases


def engine_config(http_port: int, smtp_port: int, sink_port: int, args: argparse.Namespace, dkim_key: Path | None) -> str:
    cfg = f"""\
[server]
hostname = "bench.localdomain"
{f"intake_processes = {args.intake}" if args.intake else "# intake_processes: the engine's default (one per core)"}
[http]
listen = "127.0.0.1:{http_port}"
[database]
pool_max = 20
[delivery]
workers = {args.workers}
destination_concurrency = {args.destination_concurrency}
[delivery.smtp]
connection_limit = {args.connection_limit}
[routing.static]
"{RCPT_DOMAIN}" = "127.0.0.1:{sink_port}"
[[smtp.listeners]]
name = "local"
listen = "127.0.0.1:{smtp_port}"
trusted = true
[templates]
directory = "{ROOT / 'templates'}"
"""
    if dkim_key is not None:
        cfg += f"""\
[[domains]]
name = "example.com"
[[domains.dkim]]
selector = "s1"
algorithm = "rsa-sha256"
key_file = "{dkim_key}"
"""
    return cfg


@dataclass
class PhaseRun:
    """What a hook of :func:`engine_phase` gets: the running engine and the phase's clock."""

    url: str
    dsn: str
    home: Path
    pid: int
    config: Path
    t0: float = 0.0          # perf_counter at the first submit
    last_at: float = 0.0     # perf_counter when the sink counted the last message


@dataclass
class PhaseHooks:
    """Extension points for benchmarks built on this phase (bench_webhooks).

    ``config`` is appended to the engine's config; ``ready`` runs once the engine is up, before
    the clock starts; ``delivered`` once the sink counted the last message (or the phase limit
    passed), before the engine stops. Neither callback is inside the timed interval.
    """

    config: str = ""
    ready: Callable[[PhaseRun], Awaitable[None]] | None = None
    delivered: Callable[[PhaseRun], Awaitable[None]] | None = None


async def engine_phase(
    variant: str, pg_dsn: str, pg_name: str, sink: CountingSink, args: argparse.Namespace, hooks: PhaseHooks | None = None,
    load: Load | None = None,
) -> Result:
    hooks = hooks or PhaseHooks()
    tag = variant if load is None else f"{variant}-{load.size}-{load.mode}"
    home = OUT / f"e2e-{tag}"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    dkim_key = None
    if "dkim" in variant:
        from engine.compose.dkim import keygen

        dkim_key, _ = keygen("example.com", "s1", "rsa", out_dir=home / "dkim", bits=2048)
    dsn = await create_database(pg_dsn, tag.replace("-", "_"))
    http_port, smtp_port = free_port(), free_port()
    config = engine_config(http_port, smtp_port, sink.port, args, dkim_key) + hooks.config
    rest = variant.startswith("engine-rest")
    key = await asyncio.to_thread(create_key, dsn, home) if rest else ""
    pg = postgres_pid(pg_name)
    n = args.messages if load is None else load.messages(args.messages)
    with engine_process(dsn, config, home) as proc:
        url = f"http://127.0.0.1:{http_port}"
        await wait_http(url)
        await asyncio.sleep(1.0)  # let the workers connect and start claiming
        run = PhaseRun(url, dsn, home, proc.pid, home / "bench.toml")
        if hooks.ready is not None:
            await hooks.ready(run)
        profiler = Profiler(OUT / "e2e-profile" / tag) if args.profile else None
        if profiler:
            profiler.start(proc.pid)
        base = sink.count
        cpu0, pg0 = tree_cpu_seconds(proc.pid), (tree_cpu_seconds(pg) if pg else 0.0)
        listener0 = proc_cpu_seconds(proc.pid)
        t0 = run.t0 = time.perf_counter()
        deadline = t0 + args.phase_limit
        note = ""
        if rest:
            try:
                accepted = await rest_load(url, key, n, args.batch, args.rest_concurrency, deadline, template="tpl" in variant)
            except (RuntimeError, httpx.HTTPError) as exc:
                accepted, note = 0, f"REST load failed: {exc}"
                deadline = time.perf_counter() + 5  # still count what was accepted before the failure
            if accepted < n and not note:
                note = f"only {accepted} accepted before the phase limit"
        else:
            note = await smtp_source_load(smtp_port, n, args.sessions, deadline, home / "smtp-source.log", load or Load())
        submitted = time.perf_counter() - t0
        count, last_at = await asyncio.to_thread(sink.wait_for, base + n, deadline)
        delivered = count - base
        cpu = tree_cpu_seconds(proc.pid) - cpu0
        listener_cpu = proc_cpu_seconds(proc.pid) - listener0
        pg_cpu = (tree_cpu_seconds(pg) - pg0) if pg else None
        rss = tree_peak_rss_mb(proc.pid)
        profile = profiler.stop() if profiler else []
        if hooks.delivered is not None:
            run.last_at = last_at
            await hooks.delivered(run)
        if proc.poll() is not None:
            note = (note + "; " if note else "") + f"engine exited {proc.returncode}, see {home}/engine.log"
    if delivered < n:
        note = (note + "; " if note else "") + f"partial: {delivered}/{n} delivered within {args.phase_limit:.0f} s"
        seconds = time.perf_counter() - t0 if delivered == 0 else last_at - t0
    else:
        seconds = last_at - t0
    parent = rss.get(proc.pid, 0.0)
    workers = sorted(v for p, v in rss.items() if p != proc.pid)
    rss_txt = f"{sum(rss.values()):.0f} MB (supervisor {parent:.0f} + children {' + '.join(f'{w:.0f}' for w in workers) or '-'})"
    split = f"supervisor {listener_cpu:.1f} + children (intake, workers) {cpu - listener_cpu:.1f}"
    return Result(variant, n, delivered, seconds, cpu, pg_cpu, rss_txt, note, profile, split, submitted, load)


async def postfix_phase(sink: CountingSink, args: argparse.Namespace, load: Load = Load()) -> Result:
    root = OUT / "postfix"
    n = load.messages(args.messages)
    try:
        await asyncio.to_thread(pfx.ensure_installed, OUT / "postfix-install.log")
    except pfx.PostfixUnavailable as exc:
        return Result("postfix", n, 0, 0.0, None, None, "-", f"skipped: {exc}")
    port = free_port()
    with pfx.private_postfix(root, port, sink.port, concurrency=args.destination_concurrency) as master:
        await asyncio.sleep(0.5)
        base = sink.count
        cpu0 = tree_cpu_seconds(master)
        t0 = time.perf_counter()
        deadline = t0 + args.phase_limit
        note = await smtp_source_load(port, n, args.sessions, deadline, OUT / "postfix-smtp-source.log", load)
        submitted = time.perf_counter() - t0
        count, last_at = await asyncio.to_thread(sink.wait_for, base + n, deadline)
        cpu = tree_cpu_seconds(master) - cpu0
        rss = tree_peak_rss_mb(master)
    delivered = count - base
    if delivered < n:
        note = (note + "; " if note else "") + f"partial: {delivered}/{n} delivered within {args.phase_limit:.0f} s"
    seconds = last_at - t0 if delivered else time.perf_counter() - t0
    rss_txt = f"{sum(rss.values()):.0f} MB (sum over {len(rss)} processes, shared pages counted in each)"
    return Result("postfix", n, delivered, seconds, cpu, None, rss_txt, note, submit_seconds=submitted, load=load)


async def guarded(variant: str, args: argparse.Namespace, phase: Awaitable[Result], load: Load | None = None) -> Result:
    """One failing variant (engine did not start, Postfix would not start) is reported, not fatal."""
    try:
        return await phase
    except Exception as exc:  # noqa: BLE001 - the benchmark reports every failure and goes on
        n = args.messages if load is None else load.messages(args.messages)
        return Result(variant, n, 0, 0.0, None, None, "-", f"failed: {type(exc).__name__}: {exc}", load=load)


# --------------------------------------------------------------------------- report


LABELS = {
    "engine-rest": "engine REST batch",
    "engine-smtp": "engine SMTP (smtp-source)",
    "engine-smtp-dkim": "engine SMTP + DKIM",
    "engine-rest-tpl-dkim": "engine REST template + DKIM",
    "postfix": "Postfix SMTP (smtp-source)",
}


def _print_rows(results: list[Result]) -> None:
    head = f"{'variant':<30} {'messages':>9} {'seconds':>8} {'msg/s':>8} {'MTA CPU s':>10} {'PG CPU s':>9}  peak RSS"
    print(head)
    print("-" * len(head))
    for r in results:
        cpu = f"{r.cpu:.1f}" if r.cpu is not None else "-"
        pg = f"{r.pg_cpu:.1f}" if r.pg_cpu is not None else "-"
        print(f"{LABELS[r.variant]:<30} {r.delivered:>9} {r.seconds:>8.2f} {r.rate:>8.0f} {cpu:>10} {pg:>9}  {r.rss_mb}")
        details = []
        if r.submit_seconds is not None:
            details.append(f"all submitted after {r.submit_seconds:.2f} s")
        if r.cpu_split:
            details.append(f"CPU s: {r.cpu_split}")
        if details:
            print(f"{'':<30} " + "; ".join(details))
        if r.note:
            print(f"{'':<30} note: {r.note}")


def _ratios(results: list[Result], variants: tuple[str, ...], prefix: str = "") -> None:
    by = {r.variant: r for r in results}
    ref = by.get("postfix")
    if not ref or ref.rate <= 0:
        return
    for v in variants:
        if v in by and by[v].rate > 0:
            ratio = by[v].rate / ref.rate
            extra = f"  (target >= 1.5x: {'met' if ratio >= 1.5 else 'NOT met'})" if v == "engine-smtp-dkim" else ""
            print(f"{prefix}ratio {LABELS[v]} / Postfix: {ratio:.2f}x{extra}")


def report(results: list[Result], args: argparse.Namespace, sink: CountingSink, argv: list[str], load: str) -> None:
    print(f"end-to-end, sink: {sink.kind} on 127.0.0.1; engine: {args.workers} delivery workers, "
          f"destination_concurrency {args.destination_concurrency}, connection_limit {args.connection_limit}; "
          f"SMTP load: smtp-source, {args.sessions} sessions; engine DKIM: rsa-sha256 2048 bits, Postfix: no DKIM")
    print(f"machine: {os.cpu_count()} CPUs, 1-min load average {load} (other jobs share this machine)")
    points = sorted({r.load for r in results if r.load is not None},
                    key=lambda p: (MODES.index(p.mode), SIZES[p.size]))
    for point in points:
        rows = [r for r in results if r.load == point]
        print()
        print(f"== {point.mode} connections ({'smtp-source -d' if point.mode == 'reuse' else 'smtp-source, no -d'}), "
              f"{point.size} messages ({point.octets} octets), {rows[0].target} messages")
        _print_rows(rows)
        _ratios(rows, ("engine-smtp", "engine-smtp-dkim"))
    rest = [r for r in results if r.load is None]
    if rest:
        print()
        print(f"== REST, {args.messages} messages of ~2 KB")
        _print_rows(rest)
        smtp_ref = [r for r in results if r.variant == "postfix" and r.load == Load()]
        _ratios(rest + smtp_ref, ("engine-rest", "engine-rest-tpl-dkim"), prefix="(vs Postfix 2k reuse) ")
    if len(points) > 1:
        print()
        print("summary, engine SMTP + DKIM / Postfix:")
        for point in points:
            by = {r.variant: r for r in results if r.load == point}
            e, p = by.get("engine-smtp-dkim"), by.get("postfix")
            if e and p and p.rate > 0:
                print(f"  {point.mode:<6} {point.size:>5}: {e.rate:7.0f} vs {p.rate:7.0f} msg/s = {e.rate / p.rate:.2f}x")
    for r in results:
        for line in r.profile:
            print(line)
    print("command: " + " ".join([COMMAND, *argv]))


def add_engine_args(ap: argparse.ArgumentParser, messages: int = 20_000) -> None:
    """The options :func:`engine_phase` reads (shared with benchmarks built on it)."""
    ap.add_argument("--messages", type=int, default=messages)
    ap.add_argument("--workers", type=int, default=2, help="engine delivery processes")
    ap.add_argument("--intake", type=int, default=0,
                    help="engine [server] intake_processes (0: the engine's default, one per core)")
    ap.add_argument("--destination-concurrency", type=int, default=20,
                    help="engine [delivery] destination_concurrency and Postfix destination concurrency")
    ap.add_argument("--connection-limit", type=int, default=20, help="engine [delivery.smtp] connection_limit")
    ap.add_argument("--sessions", type=int, default=20, help="concurrent SMTP sessions of the load generator")
    ap.add_argument("--batch", type=int, default=1000, help="messages per REST batch")
    ap.add_argument("--rest-concurrency", type=int, default=4, help="REST batches in flight")
    ap.add_argument("--phase-limit", type=float, default=150.0, help="seconds allowed per variant")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy each engine process during its phase and print hot spots (slows the run)")


def _axis(ap: argparse.ArgumentParser, text: str, known: tuple[str, ...] | list[str], what: str) -> list[str]:
    items = [x.strip().lower() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in known]
    if bad or not items:
        ap.error(f"{what}: unknown {bad or text!r}; pick from {','.join(known)}")
    return items


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_args(ap)
    ap.add_argument("--only", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--sizes", default="2k", help=f"SMTP message sizes, comma-separated: {','.join(SIZES)}")
    ap.add_argument("--modes", default="reuse", help="SMTP connection modes: reuse (-d), new (a connection per message)")
    argv = sys.argv[1:]
    args = ap.parse_args(argv)
    only = _axis(ap, args.only, VARIANTS, "--only")
    points = [Load(size, mode) for mode in _axis(ap, args.modes, MODES, "--modes")
              for size in _axis(ap, args.sizes, list(SIZES), "--sizes")]
    if "postfix" in only:  # install before starting the sink, so the fast C sink is used
        try:
            await asyncio.to_thread(pfx.ensure_installed, OUT / "postfix-install.log")
        except pfx.PostfixUnavailable as exc:
            print(f"note: {exc}; using the python sink and load generator")
    OUT.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    sink = CountingSink(free_port(), OUT / "e2e-sink")
    results: list[Result] = []
    smtp = [v for v in VARIANTS if v in only and v in SMTP_VARIANTS]
    rest = [v for v in VARIANTS if v in only and v not in SMTP_VARIANTS]
    try:
        sink.wait_ready()
        with postgres("e2e") as pg_dsn:
            for point in points:  # alternating: Postfix, then each engine variant, at every point
                for v in smtp:
                    phase = postfix_phase(sink, args, point) if v == "postfix" else engine_phase(
                        v, pg_dsn, "e2e", sink, args, load=point)
                    results.append(await guarded(v, args, phase, point))
            for v in rest:
                results.append(await guarded(v, args, engine_phase(v, pg_dsn, "e2e", sink, args)))
    finally:
        sink.close()
    report(results, args, sink, argv, f"{load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    asyncio.run(main())
