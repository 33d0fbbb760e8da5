"""The unauthenticated bounce/FBL listener under a CPU flood, over real sockets.

Anyone may connect to the inbound listener, so what one client can make the engine's
event loop do must be bounded: reading a message costs the same however its bytes are
cut into lines, a message with too many lines or bytes is refused with a clear 552,
a client that sends nothing but bad command lines is hung up on, and parsing runs
off the loop. The check is liveness: while raw-socket clients (threads, so they do not
share the engine's loop) flood the listener, ``/healthz`` polled from the engine's own
loop keeps answering, and a genuine DSN sent afterwards is still applied.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import httpx
import pytest

from engine.outcome.inbound_smtp import MAX_ERRORS
from tests.configs import BULK_WITHOUT_CONSENT, inbound_feedback
from tests.test_inbound import SECRET, VERP, Env, dsn

FLOOD_CONFIG = inbound_feedback(SECRET) + BULK_WITHOUT_CONSENT  # default max_message_size (10 MB)
LIVENESS_BOUND = 1.5
"""Seconds a /healthz answer may take during the flood: generous for a loaded 2-core machine;
the unbounded listener took 4.4 s for three 6 MB messages (the adversarial run)."""


@pytest.fixture
async def flood_env(engine_factory: Any) -> Any:
    eng = await engine_factory(FLOOD_CONFIG)
    key, _ = await eng.apikeys.create("admin", ["admin"])
    host, port = eng.http_address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as client:
        yield Env(eng, client, key)


class RawClient:
    """A blocking SMTP client on a plain socket: sends exactly the bytes it is given."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=120)
        self.buf = b""

    def reply(self) -> tuple[int, str]:
        """The next complete (possibly multi-line) reply; (0, '') if the server hung up."""
        while True:
            lines = self.buf.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if len(line) >= 4 and line[3:4] == b" ":
                    self.buf = b"\r\n".join(lines[i + 1 :])
                    return int(line[:3]), b"\r\n".join(lines[: i + 1]).decode("latin-1")
            chunk = self.sock.recv(65536)
            if not chunk:
                return 0, self.buf.decode("latin-1")
            self.buf += chunk

    def command(self, line: bytes) -> tuple[int, str]:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def message(self, rcpt: str, body: bytes) -> tuple[int, str]:
        """One transaction from the null sender; the reply to the end of DATA."""
        assert self.reply()[0] == 220
        assert self.command(b"EHLO flood.example")[0] == 250
        assert self.command(b"MAIL FROM:<>")[0] == 250
        assert self.command(f"RCPT TO:<{rcpt}>".encode())[0] == 250
        assert self.command(b"DATA")[0] == 354
        self.sock.sendall(body)
        return self.command(b".")

    def close(self) -> None:
        self.sock.close()


def _in_thread(results: dict[str, Any], name: str, work: Any) -> threading.Thread:
    def run() -> None:
        try:
            results[name] = work()
        except Exception as exc:  # noqa: BLE001 - recorded, asserted on by the test
            results[name] = exc

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t


async def healthz_while(env: Env, threads: list[threading.Thread]) -> float:
    """Poll ``/healthz`` (each answer must be 200) until every thread is done; the slowest answer, in seconds."""
    latencies: list[float] = []
    deadline = time.monotonic() + 300
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        t0 = time.monotonic()
        r = await env.client.get("/healthz")
        latencies.append(time.monotonic() - t0)
        assert r.status_code == 200, r.text
        await asyncio.sleep(0.02)
    for t in threads:
        await asyncio.to_thread(t.join, 60)
    assert not any(t.is_alive() for t in threads)
    assert latencies  # at least one answer while the flood was on (a fast server may finish it within a few polls)
    return max(latencies)


async def warm(env: Env) -> None:
    """The first request on a route does one-off work of its own: not what the flood is measured by."""
    for _ in range(3):
        assert (await env.client.get("/healthz")).status_code == 200


async def test_line_flood_and_large_messages_do_not_stall_the_loop(flood_env: Env) -> None:
    env = flood_env
    out = await env.submit(["rae@example.net"])
    rid = out["recipients"][0]["id"]
    await env.deliver(rid)
    rcpt = VERP.return_path(rid)
    address = env.eng.inbound_address
    short_lines = b"a\r\n" * 2_000_000  # 2 million short lines (6 MB)
    soft_breaks = b"=\r\n" * 2_000_000  # 6 MB of quoted-printable soft line breaks

    def message(body: bytes) -> Any:
        def work() -> tuple[int, str]:
            client = RawClient(address)
            try:
                return client.message(rcpt, body)
            finally:
                client.close()

        return work

    def blank_commands() -> int:
        """2 million empty command lines, each worth a 500 reply unless the server hangs up: replies read."""
        client = RawClient(address)
        replies = 0
        try:
            assert client.reply()[0] == 220
            try:
                client.sock.sendall(b"\r\n" * 2_000_000)
            except OSError:
                pass  # hung up on mid-send: what we want
            while True:
                try:
                    code, _ = client.reply()
                except OSError:
                    return replies  # reset: the server closed with our lines unread
                if code == 0:
                    return replies
                replies += 1
        finally:
            client.close()

    await warm(env)
    results: dict[str, Any] = {}
    threads = [_in_thread(results, "lines", message(short_lines))]
    threads += [_in_thread(results, f"soft{i}", message(soft_breaks)) for i in range(3)]
    threads.append(_in_thread(results, "blank", blank_commands))

    slowest = await healthz_while(env, threads)
    assert slowest < LIVENESS_BOUND, f"/healthz took up to {slowest:.2f} s during the flood"

    # Every flooding client got a clear answer: too many lines (552), or an early hang-up on bad commands.
    for name in ("lines", "soft0", "soft1", "soft2"):
        code, text = results[name]
        assert code == 552 and "5.3.4" in text and "lines" in text, (name, code, text)
    assert results["blank"] <= MAX_ERRORS + 1, results["blank"]  # hung up on after the error budget

    # Still serving: a genuine bounce sent afterwards is applied.
    await env.send(dsn("rae@example.net"), [rcpt])
    assert (await env.row(rid))["state"] == "bounced"


async def test_error_budget_line_count_and_pipelined_commands(flood_env: Env) -> None:
    """The limits one by one, each with a clear reply, and the block-wise reader keeps SMTP intact."""
    env = flood_env
    out = await env.submit(["sam@example.net"])
    rid = out["recipients"][0]["id"]
    rcpt = VERP.return_path(rid)
    address = env.eng.inbound_address

    def budget() -> list[tuple[int, str]]:
        client = RawClient(address)
        try:
            assert client.reply()[0] == 220
            return [client.command(b"") for _ in range(MAX_ERRORS + 1)] + [client.reply()]
        finally:
            client.close()

    replies = await asyncio.to_thread(budget)
    assert [c for c, _ in replies[:MAX_ERRORS]] == [500] * MAX_ERRORS
    assert replies[MAX_ERRORS][0] == 421 and "4.7.0" in replies[MAX_ERRORS][1]
    assert replies[-1][0] == 0  # then the server hangs up

    def transactions() -> list[tuple[int, str]]:
        client = RawClient(address)
        try:
            too_many = client.message(rcpt, b"x\r\n" * 200_001)  # [feedback.inbound] max_lines default
            # A message whose last line is a lone-dot lookalike and whose dot-stuffed lines must be
            # undone, its end pipelined with the next commands in one write (bytes past the end).
            client.command(b"RSET")
            assert client.command(b"MAIL FROM:<>")[0] == 250
            assert client.command(f"RCPT TO:<{rcpt}>".encode())[0] == 250
            assert client.command(b"DATA")[0] == 354
            client.sock.sendall(dsn("sam@example.net").replace(b"\r\n\r\n--BOUNDARY--", b"\r\n..\r\n--BOUNDARY--")
                                + b".\r\nNOOP\r\nQUIT\r\n")
            return [too_many, client.reply(), client.reply(), client.reply()]
        finally:
            client.close()

    too_many, applied, noop, quit_ = await asyncio.to_thread(transactions)
    assert too_many[0] == 552 and "5.3.4" in too_many[1] and "200000" in too_many[1], too_many
    assert applied[0] == 250 and "applied" in applied[1], applied
    assert noop[0] == 250 and quit_[0] == 221
    assert (await env.row(rid))["state"] == "bounced"


async def test_costly_reports_are_parsed_off_the_loop(flood_env: Env) -> None:
    """Messages within every limit that are slow to parse (20,000 MIME parts: seconds of CPU each):
    parsing them must not take the event loop's time, nor its GIL."""
    env = flood_env
    out = await env.submit(["tia@example.net"])
    rid = out["recipients"][0]["id"]
    await env.deliver(rid)
    rcpt = VERP.return_path(rid)
    address = env.eng.inbound_address
    parts = b"Content-Type: multipart/mixed; boundary=x\r\n\r\n" + b"--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n" * 20_000

    def costly() -> list[tuple[int, str]]:
        client = RawClient(address)
        try:
            first = client.message(rcpt, parts)
            assert client.command(b"MAIL FROM:<>")[0] == 250
            assert client.command(f"RCPT TO:<{rcpt}>".encode())[0] == 250
            assert client.command(b"DATA")[0] == 354
            client.sock.sendall(parts)
            return [first, client.command(b".")]
        finally:
            client.close()

    await warm(env)
    results: dict[str, Any] = {}
    threads = [_in_thread(results, f"c{i}", costly) for i in range(4)]
    slowest = await healthz_while(env, threads)
    for name, res in results.items():
        assert not isinstance(res, Exception), (name, res)
        assert [code for code, _ in res] == [250, 250] and "not a report" in res[0][1], res
    assert env.eng.inbound.handler.stats["not_a_report"] == 8
    assert slowest < LIVENESS_BOUND, f"/healthz took up to {slowest:.2f} s while reports were parsed"
    await env.send(dsn("tia@example.net"), [rcpt])
    assert (await env.row(rid))["state"] == "bounced"
