"""Logging: ``[logging]`` level and format, one JSON record per delivery attempt, no addresses by default.

The end-to-end test runs ``engine run`` as a real process with ``format = "json"``, relays two
recipients over SMTP to a real receiver (one accepted, one refused) and parses every line the
engine and its worker wrote. Configuration is tested in child processes too, so this test
process's structlog setup (which other tests capture) is never touched.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import aiosmtplib

from engine.logging import redact, redact_addresses
from tests.receivers import Behaviour, smtp_receiver, tls_ca  # noqa: F401  (fixtures)


def test_redact_keeps_domains_and_everything_else() -> None:
    assert redact("550 5.1.1 <ann.lee+x@Example.NET>: unknown") == "550 5.1.1 <***@Example.NET>: unknown"
    assert redact({"to": ["a@b.test", "c@[192.0.2.1]"], "n": 3}) == {"to": ["***@b.test", "***@[192.0.2.1]"], "n": 3}
    assert redact("mx.example[192.0.2.1]:25, user@localhost, no address") == "mx.example[192.0.2.1]:25, user@localhost, no address"
    event = {"event": "x", "recipient": "bob@example.org", "id": 7}
    assert redact_addresses(None, "info", dict(event)) == {"event": "x", "recipient": "***@example.org", "id": 7}
    assert redact_addresses(None, "debug", dict(event)) == event  # debug is for a person at a console


def _child(config: str) -> list[str]:
    """Configure logging from ``config`` in a child process, log a few lines, return what it wrote."""
    script = textwrap.dedent(f"""
        import logging, structlog
        from engine.logging import LoggingConfig, configure
        configure(LoggingConfig.model_validate({config}))
        log = structlog.get_logger("t")
        log.debug("dbg", recipient="d@example.org")
        log.info("hello", recipient="ann@example.org")
        log.warning("careful", reply="550 <bob@example.org> unknown")
        logging.getLogger("uvicorn.error").warning("library says %s", "carl@example.org")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stderr.splitlines()


def test_json_format_level_and_address_switch() -> None:
    lines = [json.loads(line) for line in _child('{"format": "json"}')]
    assert [(r["event"], r["level"]) for r in lines] == [
        ("hello", "info"), ("careful", "warning"), ("library says ***@example.org", "warning")]
    assert lines[0]["recipient"] == "***@example.org" and lines[1]["reply"] == "550 <***@example.org> unknown"
    assert lines[2]["logger"] == "uvicorn.error" and lines[0]["timestamp"].endswith("Z")

    lines = [json.loads(line) for line in _child('{"format": "json", "log_addresses": True, "level": "DEBUG"}')]
    assert [r["event"] for r in lines] == ["dbg", "hello", "careful", "library says carl@example.org"]
    assert lines[1]["recipient"] == "ann@example.org"

    lines = [json.loads(line) for line in _child('{"format": "json", "level": "warning"}')]
    assert [r["event"] for r in lines] == ["careful", "library says ***@example.org"]

    console = _child('{"format": "console"}')
    assert any("hello" in line and "recipient=***@example.org" in line for line in console)
    assert not any(line.startswith("{") for line in console)


def _records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))  # every line is one JSON object: a parse error fails the test
    return out


async def _until(check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.2)


async def test_one_json_record_per_delivery_attempt_without_addresses(db_dsn, tmp_path, smtp_receiver) -> None:
    rx = smtp_receiver(Behaviour(reject_users={"nobody@example.net"}))
    cfg = tmp_path / "engine.toml"
    cfg.write_text(
        '[logging]\nformat = "json"\n'
        '[http]\nlisten = "127.0.0.1:0"\n'
        '[[smtp.listeners]]\nname = "local"\nlisten = "127.0.0.1:0"\ntrusted = true\n'
        f'[routing.static]\n"example.net" = "{rx.address}:{rx.port}"\n'
        '[delivery]\npoll_interval = "100ms"\nflush_interval = "20ms"\n'
        '[[pools]]\nname = "default"\n[[pools.sources]]\nname = "mta1"\n'
    )
    log_path = tmp_path / "engine.log"
    env = {**os.environ, "DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home")}
    with log_path.open("w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "engine", "--config", str(cfg), "run", "--workers", "1"],
                                env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        started = await _until(lambda: [r for r in _records(log_path) if r["event"] == "engine_started"], 60)
        assert started, log_path.read_text()
        host, port = started[0]["smtp"]["local"]
        await aiosmtplib.send(
            b"From: App <app@sender.test>\r\nTo: ann@example.net\r\nSubject: hi\r\n\r\nhello\r\n",
            sender="app@sender.test", recipients=["ann@example.net", "nobody@example.net"],
            hostname=host, port=port, timeout=30,
        )

        def attempts() -> list[dict[str, Any]]:
            # The two recipients' attempts (not the DSN the bounce sends to app@sender.test, which has no route).
            found = [r for r in _records(log_path) if r["event"] == "delivery_attempt"
                     and str(r.get("recipient", "")).endswith("@example.net")]
            return found if len(found) >= 2 else []

        records = await _until(attempts, 60)
        assert records, log_path.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    by_type = {r["type"]: r for r in records}
    assert set(by_type) == {"Delivery", "Bounce"}
    ok, bounce = by_type["Delivery"], by_type["Bounce"]
    assert ok["code"] == 250 and bounce["code"] == 550 and bounce["status"] == "5.1.1"
    assert ok["message_id"] == bounce["message_id"] and ok["recipient_id"] != bounce["recipient_id"]
    for r in (ok, bounce):
        assert r["level"] == "info" and r["provider"] == "example.net" and r["source"] == "mta1" and r["pool"] == "default"
        assert f"[{rx.address}]:{rx.port}" in r["mx"] and isinstance(r["duration_ms"], int) and r["attempt"] == 1
        assert r["recipient"].startswith("***@example.net") and r["sender"] == "***@sender.test"
    everything = log_path.read_text()
    for address in ("ann@example.net", "nobody@example.net", "app@sender.test"):
        assert address not in everything
