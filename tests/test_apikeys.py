"""API key lifecycle over the real doors: rotation with grace, expiry, IP allowlists and the
failed-authentication limit, on HTTP (a running engine) and SMTP AUTH (a real relay listener).

Keys are made and changed through the real CLI (``engine apikey ...``, in this process, as an
operator would), so the engine under test sees them the way it sees another process's changes:
through its key cache, whose TTL is short here. Nothing waits a fixed time: every "eventually
refused" is polled with a generous deadline.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosmtplib
import asyncpg
import httpx
import pytest

from engine import authlimit
from engine.accept import Acceptor
from engine.apikeys import ApiKeys
from engine.cli import main as cli_main
from engine.config import Settings, SmtpListener
from engine.outbox import Outbox
from engine.submit.server import SmtpListenerHandle
from engine.submit.smtp import close_smtp_listeners, start_smtp_listeners

DEADLINE = 30.0
# AUTH without TLS (trusted listener) while loopback itself is not trusted to relay: AUTH decides.
AUTH_LISTENER = SmtpListener(name="auth", listen=("127.0.0.1", 0), trusted=True, trusted_networks=["10.0.0.0/8"])
RAW = b"From: a@sender.test\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nhello\r\n"

Cli = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
async def cli(db_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """``await cli("apikey", "create", ...)`` -> (exit code, stdout, stderr): the real command line, in-process."""
    monkeypatch.setenv("DATABASE_URL", db_dsn)
    monkeypatch.setenv("ENGINE_HOME", str(tmp_path / "cli-home"))
    monkeypatch.delenv("ENGINE_CONFIG", raising=False)

    async def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = await asyncio.to_thread(cli_main, list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


async def _create(cli: Cli, *args: str) -> str:
    code, out, err = await cli("apikey", "create", *args)
    assert code == 0, err
    return out.strip().splitlines()[-1]


@pytest.fixture
async def http(engine_factory: Any) -> AsyncIterator[httpx.AsyncClient]:
    eng = await engine_factory('[api]\nkey_cache_ttl = "100ms"\nauth_failures_per_minute = 50\n')
    host, port = eng.http_address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as client:
        client.engine = eng  # type: ignore[attr-defined]
        yield client


async def _status(http: httpx.AsyncClient, key: str) -> int:
    return (await http.get("/v1/events", headers={"Authorization": f"Bearer {key}"})).status_code


async def _until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.1)


def _listed(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


# -- rotation, expiry, re-creation ---------------------------------------------------------


async def test_rotation_keeps_the_old_key_for_its_grace_then_refuses_it(http: httpx.AsyncClient, cli: Cli) -> None:
    old = await _create(cli, "--name", "crm", "--scopes", "read")
    assert await _status(http, old) == 200
    code, out, err = await cli("apikey", "rotate", "--name", "crm", "--grace", "1h")
    assert code == 0, err
    new = out.strip().splitlines()[-1]
    assert new.startswith("ek_") and new != old and "works until" in out
    # Within the grace both work, under the same name.
    assert await _status(http, new) == 200
    assert await _status(http, old) == 200
    rows = _listed((await cli("apikey", "list", "--json"))[1])
    assert [(r["name"], r["status"]) for r in rows] == [("crm", "rotated"), ("crm", "active")]
    assert rows[0]["expires_at"] is not None and rows[1]["expires_at"] is None
    assert rows[1]["scopes"] == ["read"]

    # A short grace: the rotated-out key is refused once it ends; the new one goes on.
    code, out, err = await cli("apikey", "rotate", "--name", "crm", "--grace", "2s")
    assert code == 0, err
    newest = out.strip().splitlines()[-1]

    async def refused() -> bool:
        return await _status(http, new) == 401

    await _until(refused, "the rotated-out key to be refused after its 2 s grace")
    assert await _status(http, newest) == 200
    assert await _status(http, old) == 200  # the first rotation's grace (1 h) is not cut short
    r = await http.get("/v1/events", headers={"Authorization": f"Bearer {new}"})
    assert "expired" in r.json()["error"]


async def test_revoke_after_rotation_ends_every_key_of_the_name_and_the_name_is_reusable(
    http: httpx.AsyncClient, cli: Cli
) -> None:
    old = await _create(cli, "--name", "erp", "--scopes", "read")
    code, out, _ = await cli("apikey", "rotate", "--name", "erp", "--grace", "1h")
    new = out.strip().splitlines()[-1]
    assert (await cli("apikey", "revoke", "--name", "erp"))[0] == 0

    async def both_refused() -> bool:
        return await _status(http, old) == 401 and await _status(http, new) == 401

    await _until(both_refused, "both keys of a revoked name to be refused")
    assert (await cli("apikey", "revoke", "--name", "erp"))[0] == 1  # nothing left to revoke
    # Re-creating a revoked name works.
    again = await _create(cli, "--name", "erp", "--scopes", "read")
    assert await _status(http, again) == 200
    code, _, err = await cli("apikey", "rotate", "--name", "nobody")
    assert code == 1 and "no current API key named 'nobody'" in err


async def test_expiry_refuses_a_key_even_while_it_is_cached(engine_factory: Any, cli: Cli) -> None:
    # A long cache TTL: the expiry must still win, on the first use after it.
    eng = await engine_factory('[api]\nkey_cache_ttl = "1h"\n')
    host, port = eng.http_address
    key, _ = await eng.apikeys.create("temp", ["read"], expires_at=datetime.now(UTC) + timedelta(seconds=8))
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as client:
        assert await _status(client, key) == 200  # cached from here on

        async def refused() -> bool:
            return await _status(client, key) == 401

        await _until(refused, "a key past its --ttl to be refused")
    code, _, err = await cli("apikey", "create", "--name", "old", "--expires", "2020-01-01")
    assert code == 1 and "in the past" in err
    code, _, err = await cli("apikey", "create", "--name", "old", "--expires", "next tuesday")
    assert code == 1 and "not a date" in err
    assert (await cli("apikey", "create", "--name", "later", "--scopes", "read", "--ttl", "90d"))[0] == 0
    rows = {r["name"]: r for r in _listed((await cli("apikey", "list", "--json"))[1])}
    assert rows["temp"]["status"] == "expired" and rows["later"]["status"] == "active"
    later = datetime.fromisoformat(rows["later"]["expires_at"])
    assert timedelta(days=89) < later - datetime.now(UTC) <= timedelta(days=90)
    assert "expired" in (await cli("apikey", "list"))[1]


async def test_last_used_at_is_shown(http: httpx.AsyncClient, cli: Cli) -> None:
    key = await _create(cli, "--name", "dash", "--scopes", "read")
    assert "never" in (await cli("apikey", "list"))[1]
    assert await _status(http, key) == 200
    [row] = _listed((await cli("apikey", "list", "--json"))[1])
    assert row["last_used_at"] is not None
    table = (await cli("apikey", "list"))[1]
    assert "LAST USED" in table and "never" not in table
    assert key not in table and key[:20] not in json.dumps(row)


# -- IP allowlists --------------------------------------------------------------------------


async def test_allowlist_over_http(http: httpx.AsyncClient, cli: Cli) -> None:
    key = await _create(cli, "--name", "ops", "--scopes", "read", "--allow", "10.0.0.0/8")
    r = await http.get("/v1/events", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 403
    assert "127.0.0.1" in r.json()["error"] and "allowlist" in r.json()["error"]
    code, out, err = await cli("apikey", "allow", "--name", "ops", "10.0.0.0/8", "127.0.0.0/8")
    assert code == 0 and "127.0.0.0/8" in out, err

    async def allowed() -> bool:
        return await _status(http, key) == 200

    await _until(allowed, "the widened allowlist to take 127.0.0.1")
    [row] = _listed((await cli("apikey", "list", "--json"))[1])
    assert row["allow"] == ["10.0.0.0/8", "127.0.0.0/8"]
    assert (await cli("apikey", "allow", "--name", "ops", "--any"))[0] == 0
    [row] = _listed((await cli("apikey", "list", "--json"))[1])
    assert row["allow"] == []
    code, _, err = await cli("apikey", "allow", "--name", "ops", "10.0.0.300/8")
    assert code == 1 and "10.0.0.300/8" in err
    code, _, err = await cli("apikey", "allow", "--name", "ops")
    assert code == 1 and "--any" in err


@pytest.fixture
async def relay(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Callable[..., Awaitable[SmtpListenerHandle]]]:
    """Start the real relay on 127.0.0.1 with an ApiKeys of a given failure limit."""
    started: list[SmtpListenerHandle] = []

    async def start(failures_per_minute: int = 0) -> SmtpListenerHandle:
        s = settings.model_copy(update={"smtp": settings.smtp.model_copy(update={"listeners": [AUTH_LISTENER]})})
        apikeys = ApiKeys(pool, 0.1, failures_per_minute)
        handles = await start_smtp_listeners(s, Acceptor(s, Outbox(pool, s.queue.max_age)), apikeys)
        started.extend(handles)
        return handles[0]

    yield start
    await close_smtp_listeners(started)


def _client(handle: SmtpListenerHandle) -> aiosmtplib.SMTP:
    host, port = handle.address
    return aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10)


async def test_allowlist_over_smtp_auth(relay: Any, pool: asyncpg.Pool) -> None:
    handle = await relay()
    far, _ = await ApiKeys(pool).create("far", ["send"], allow=["10.0.0.0/8"])
    near, near_id = await ApiKeys(pool).create("near", ["send"], allow=["127.0.0.0/8"])
    client = _client(handle)
    await client.connect()
    await client.ehlo()
    try:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
            await client.auth_plain("far", far)
        assert refused.value.code == 535 and "5.7.8" in refused.value.message
        assert "allowlist" in refused.value.message
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as info:
            await client.mail("a@sender.test")  # not authenticated, loopback not trusted: no relay
        assert info.value.code == 530
        await client.auth_plain("near", near)
        _, reply = await client.sendmail("a@sender.test", ["b@example.net"], RAW)
        assert "queued as" in reply
    finally:
        client.close()
    assert await pool.fetchval("SELECT api_key_id FROM messages") == near_id


async def test_narrowed_allowlist_stops_an_authenticated_smtp_session(relay: Any, pool: asyncpg.Pool, cli: Cli) -> None:
    handle = await relay()
    key = await _create(cli, "--name", "app", "--scopes", "send", "--allow", "127.0.0.0/8")
    client = _client(handle)
    await client.connect()
    await client.ehlo()
    try:
        await client.auth_plain("app", key)
        await client.sendmail("a@sender.test", ["b@example.net"], RAW)
        assert (await cli("apikey", "allow", "--name", "app", "10.0.0.0/8"))[0] == 0
        await asyncio.sleep(0.2)  # past the relay's 0.1 s key cache: the next MAIL re-reads the key
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as info:
            await client.mail("a@sender.test")
        assert info.value.code == 530 and "no longer allowed from this address" in info.value.message
    finally:
        client.close()


# -- failed authentications, limited per client address ---------------------------------


async def test_failed_http_authentications_are_limited_per_address(engine_factory: Any, cli: Cli) -> None:
    eng = await engine_factory("[api]\nauth_failures_per_minute = 3\n")
    good = await _create(cli, "--name", "good", "--scopes", "read")
    before = authlimit.counts()
    host, port = eng.http_address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as client:
        for i in range(3):
            assert await _status(client, f"ek_guess{i}") == 401
        r = await client.get("/v1/events", headers={"Authorization": f"Bearer {good}"})
        assert r.status_code == 429, r.text  # refused before the (valid) key is even looked up
        assert int(r.headers["Retry-After"]) >= 1 and "too many failed" in r.json()["error"]
        # No key at all is refused the same way while the address is over the limit.
        assert (await client.get("/v1/events")).status_code == 429
    after = authlimit.counts()
    assert after.get(("http", "failed"), 0) - before.get(("http", "failed"), 0) == 3
    assert after.get(("http", "rate_limited"), 0) - before.get(("http", "rate_limited"), 0) == 2


async def test_failed_smtp_authentications_are_limited_per_address(relay: Any, pool: asyncpg.Pool) -> None:
    handle = await relay(failures_per_minute=2)
    good, _ = await ApiKeys(pool).create("good", ["send"])
    before = authlimit.counts()
    client = _client(handle)
    await client.connect()
    await client.ehlo()
    try:
        for guess in ("ek_one", "ek_two"):
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as info:
                await client.auth_plain("api", guess)
            assert info.value.code == 535
    finally:
        client.close()
    # A new connection from the same address, with the right key: still refused, temporarily.
    client = _client(handle)
    await client.connect()
    await client.ehlo()
    try:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as info:
            await client.auth_plain("good", good)
        assert info.value.code == 454 and "4.7.0" in info.value.message and "try again" in info.value.message
    finally:
        client.close()
    after = authlimit.counts()
    assert after.get(("smtp", "failed"), 0) - before.get(("smtp", "failed"), 0) == 2
    assert after.get(("smtp", "rate_limited"), 0) - before.get(("smtp", "rate_limited"), 0) == 1


def test_limiter_window_and_ipv6_grouping() -> None:
    now = [1000.0]
    lim = authlimit.AuthFailures(2, clock=lambda: now[0])
    lim.failed("2001:db8::1", "http")
    lim.failed("2001:db8::2", "http")  # the same /64
    assert lim.retry_after("2001:db8::99") == pytest.approx(60.0)
    assert lim.retry_after("2001:db8:0:1::1") == 0  # another /64
    assert lim.retry_after("192.0.2.1") == 0
    now[0] += 30
    assert lim.retry_after("2001:db8::1") == pytest.approx(30.0)
    now[0] += 30.5
    assert lim.retry_after("2001:db8::1") == 0
    assert authlimit.AuthFailures(0).retry_after("192.0.2.1") == 0  # 0: no limit

