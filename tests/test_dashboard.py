"""The dashboard, driven in a real headless Chromium (Debian's ``chromium``) with Playwright.

A real engine (HTTP on loopback, real Postgres), a real delivery worker and a real SMTP receiver:
a person logs in with a read key and an admin key, is sent to the login page when not logged in,
watches a provider's numbers change as mail is delivered (without reloading the page), holds and
releases a domain's queue through the confirmation step while forged POSTs (no CSRF token, a
wrong one, another origin, a read key) are refused, and opens ``/docs`` with every request kept
on 127.0.0.1 (requests to anywhere else are recorded and aborted, and the test asserts there
were none). Screenshots go to ``test-artifacts/dashboard/`` (``$ENGINE_TEST_ARTIFACTS``).

Browser tests skip when Chromium or Playwright is missing, except in CI (``CI=true``), where
``make test`` installs Chromium and they must run. The HTTP-level checks at the end need no browser.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from engine.apikeys import hash_key
from engine.dashboard.session import COOKIE, Sessions, safe_next, same_origin
from engine.deliver.scheduler import DeliveryWorker
from tests.receivers import Behaviour, Receiver, smtp_receiver, tls_ca  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("ENGINE_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("ENGINE_TEST_ARTIFACTS", REPO / "test-artifacts")) / "dashboard"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Chromium without its background traffic (the closed network refuses it anyway).
CHROMIUM_ARGS = ["--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-quic", "--disable-features=Translate,OptimizationHints,MediaRouter"]
WAIT_MS = 60_000
# A browser, an engine and a worker share two loaded cores with the rest of the suite: room beyond the default 120 s.
pytestmark = pytest.mark.timeout(300)

SHAPING = """
[provider.bigmail]
match = [{DomainSuffix = "bigmail.test"}]
provider_max_message_rate = "600/min"
provider_connection_limit = 3

[warmup.new-ip]
sources = ["default"]
schedule = [100, 200]
spread_over = "1s"
"""


def _need_browser() -> None:
    """Skip without Chromium or Playwright, unless in CI: there `make test` installs them and the tests must run."""
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        if IN_CI:
            pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (DEB_TEST_PKGS)")
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (`make deb-test` does) to run the browser tests")


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    _need_browser()
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


class Tab:
    """One browser context and page; every request that would leave 127.0.0.1 is recorded and aborted."""

    def __init__(self, context: Any, page: Any, base: str) -> None:
        self.context, self.page, self.base = context, page, base
        self.offsite: list[str] = []
        self.requests: list[str] = []
        self.console: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    @classmethod
    async def open(cls, browser: Any, base: str) -> Tab:
        context = await browser.new_context(viewport={"width": 1360, "height": 1000})
        tab = cls(context, await context.new_page(), base)

        async def guard(route: Any) -> None:
            url = route.request.url
            tab.requests.append(url)
            if urlsplit(url).hostname in ("127.0.0.1", "localhost"):
                await route.continue_()
            else:
                tab.offsite.append(url)
                await route.abort()

        await context.route("**/*", guard)
        return tab

    async def goto(self, path: str) -> Any:
        return await self.page.goto(self.base + path)

    async def login(self, key: str, path: str = "/dashboard") -> None:
        await self.goto(path)
        assert urlsplit(self.page.url).path == "/dashboard/login"
        await self.page.fill("#key", key)
        async with self.page.expect_navigation():
            await self.page.click("#login")

    async def shot(self, name: str, full_page: bool = True) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=full_page)
        assert path.stat().st_size > 1000
        return path

    async def cookie(self) -> str:
        values = [c["value"] for c in await self.context.cookies() if c["name"] == COOKIE]
        assert len(values) == 1
        return str(values[0])

    async def csrf(self) -> str:
        return str(await self.page.get_attribute("input[name=csrf]", "value"))

    async def text(self, selector: str) -> str:
        return str(await self.page.inner_text(selector)).strip()


async def _engine(engine_factory: Any, tmp_path: Path, rx: Receiver | None = None, webhooks: bool = False) -> tuple[Any, str]:
    (tmp_path / "shaping.toml").write_text(SHAPING)
    route = f'[routing.static]\n"bigmail.test" = "{rx.address}:{rx.port}"\n' if rx else ""
    eng = await engine_factory(
        f'[dashboard]\nrefresh = "1s"\n[webhooks]\nenabled = {str(webhooks).lower()}\n[shaping]\nfile = "shaping.toml"\n'
        '[delivery]\npoll_interval = "50ms"\nflush_interval = "20ms"\n' + route
    )
    host, port = eng.http_address
    return eng, f"http://{host}:{port}"


async def _submit(base: str, key: str, domain: str, n: int) -> None:
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=10) as c:
        for i in range(n):
            r = await c.post("/v1/messages", json={"from": "app@sender.test", "to": [f"u{i}@{domain}"],
                                                   "subject": "hello", "text": "hi"})
            assert r.status_code == 202, r.text


async def _states(eng: Any, domain: str) -> list[str]:
    return sorted(r["state"] for r in await eng.outbox.list(domain=domain))


async def _until(pred: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def _until_async(read: Any, expected: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := await read()) != expected:
        assert time.monotonic() < deadline, f"still {got!r}, expected {expected!r}"
        await asyncio.sleep(0.2)


# --------------------------------------------------------------------------- in the browser


async def test_login_with_read_key_redirect_and_logout(engine_factory, tmp_path, browser) -> None:
    eng, base = await _engine(engine_factory, tmp_path)
    read_key, _ = await eng.apikeys.create("viewer", ["read"])
    send_key, _ = await eng.apikeys.create("app", ["send"])
    tab = await Tab.open(browser, base)
    page = tab.page

    # Not logged in: every page sends the visitor to the login page, remembering where they were going.
    await tab.goto("/dashboard/queue")
    assert page.url == f"{base}/dashboard/login?next=%2Fdashboard%2Fqueue"
    await tab.shot("login")
    for wrong, why in (("ek_not-a-key", "Invalid or revoked API key."), (send_key, "lacks the 'read' scope")):
        await page.fill("#key", wrong)
        async with page.expect_navigation():
            await page.click("#login")
        assert why in await tab.text("#login-error")
        assert not await tab.context.cookies()

    await page.fill("#key", read_key)
    async with page.expect_navigation():
        await page.click("#login")
    assert page.url == f"{base}/dashboard/queue"
    assert await tab.text("#who") == "viewer · read"
    assert await page.locator("a[data-action]").count() == 0  # a read key is shown no actions
    cookies = await tab.context.cookies()
    assert [(c["name"], c["httpOnly"], c["secure"], c["sameSite"], c["path"]) for c in cookies] == [
        (COOKIE, True, True, "Strict", "/dashboard")]
    assert read_key not in cookies[0]["value"] and read_key[3:20] not in cookies[0]["value"]

    # A read key cannot reach the confirmation step either.
    response = await tab.goto("/dashboard/queue/confirm?action=hold&domain=example.net")
    assert response.status == 403
    assert "admin" in await tab.text("#refused")

    await tab.goto("/dashboard")
    assert await tab.text("h1") == "Overview"
    assert await tab.text("#rate-received") == "0"
    await tab.shot("overview-read")
    old_cookie = await tab.cookie()

    async with page.expect_navigation():
        await page.click("#logout")
    assert urlsplit(page.url).path == "/dashboard/login"
    assert not await tab.context.cookies()
    await tab.goto("/dashboard")
    assert urlsplit(page.url).path == "/dashboard/login"
    # The old cookie, replayed after logout, opens nothing.
    async with httpx.AsyncClient(base_url=base, cookies={COOKIE: old_cookie}) as c:
        r = await c.get("/dashboard")
        assert r.status_code == 303 and r.headers["location"].startswith("/dashboard/login")
    assert tab.offsite == []


async def test_provider_numbers_change_live_as_mail_is_delivered(engine_factory, tmp_path, browser, smtp_receiver) -> None:
    rx = smtp_receiver()
    eng, base = await _engine(engine_factory, tmp_path, rx)
    admin_key, _ = await eng.apikeys.create("ops", ["admin"])
    send_key, _ = await eng.apikeys.create("app", ["send"])
    tab = await Tab.open(browser, base)
    page = tab.page
    await tab.login(admin_key, "/dashboard/providers")
    assert page.url == f"{base}/dashboard/providers"
    assert await tab.text("#who") == "ops · admin"
    section = "section[data-provider=bigmail]"
    assert await tab.text(f"{section} [data-field=delivered]") == "0"
    assert "600/min" in await tab.text(section)
    # A mark in the page's JavaScript state: a reload would wipe it.
    await page.evaluate("window.__sameDocument = true")

    n = 5
    await _submit(base, send_key, "bigmail.test", n)
    worker = DeliveryWorker(eng.settings, eng.pool, owner="dashboard-test", dsn=eng.dsn)
    task = asyncio.create_task(worker.run())
    try:
        await _until(lambda: len(rx.messages) >= n)
        # Polled from here: the page's Content-Security-Policy forbids the string evaluation wait_for_function uses.
        await _until_async(lambda: tab.text(f"{section} [data-field=delivered]"), str(n))
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
    assert await page.evaluate("window.__sameDocument") is True
    assert int(await page.get_attribute("#live", "data-refreshes") or 0) >= 1
    assert page.url == f"{base}/dashboard/providers"
    replies = await tab.text(f"{section} table.replies")
    assert "delivered" in replies and "250" in replies
    assert float(await tab.text(f"{section} [data-field=rate]")) > 0
    await tab.shot("providers-after-delivery")

    await tab.goto("/dashboard")
    assert await tab.text("#rate-received") == str(n)
    assert await tab.text("#rate-delivered") == str(n)
    assert await tab.text("#queue-waiting") == "0"
    await tab.shot("overview-after-delivery")
    await tab.goto("/dashboard/warmup")
    ramp = "tr[data-ramp='new-ip:default']"
    cells = await tab.page.locator(f"{ramp} td").all_inner_texts()
    assert cells[:5] == ["new-ip", "default", "all", "1 of 2", cells[4]] and cells[6] == "100", cells  # step 1, cap 100
    assert 1 <= int(await tab.text(f"{ramp} [data-field=sent]")) <= 100
    await tab.shot("warmup")
    assert tab.offsite == []


async def test_hold_and_release_a_domain_with_confirmation_and_csrf(engine_factory, tmp_path, browser) -> None:
    eng, base = await _engine(engine_factory, tmp_path)  # no worker: the mail stays queued
    admin_key, _ = await eng.apikeys.create("ops", ["admin"])
    read_key, _ = await eng.apikeys.create("viewer", ["read"])
    send_key, _ = await eng.apikeys.create("app", ["send"])
    await _submit(base, send_key, "slow.example", 3)
    await _submit(base, send_key, "other.example", 1)

    tab = await Tab.open(browser, base)
    page = tab.page
    await tab.login(admin_key, "/dashboard/queue")
    row = "tr[data-domain='slow.example']"
    assert await tab.text(f"{row} [data-field=queued]") == "3"
    async with page.expect_navigation():
        await page.click(f"{row} a[data-action=hold]")
    assert "about 3 recipient(s)" in await tab.text("#confirm-count")
    await tab.shot("queue-confirm-hold")
    assert await _states(eng, "slow.example") == ["queued"] * 3  # nothing happens before the confirmation
    async with page.expect_navigation():
        await page.click("#confirm")
    assert urlsplit(page.url).path == "/dashboard/queue"
    assert await tab.text("#notice") == "hold: 3 recipient(s) changed"
    assert await tab.text(f"{row} [data-field=held]") == "3"
    assert await _states(eng, "slow.example") == ["held"] * 3
    assert await _states(eng, "other.example") == ["queued"]
    await tab.shot("queue-held")

    # Forged POSTs are refused and change nothing: no token, a wrong one, another origin, no origin at all.
    csrf, cookie = await tab.csrf(), await tab.cookie()
    form = {"action": "release", "domain": "slow.example", "confirm": "yes"}
    own = {"Origin": base, "Cookie": f"{COOKIE}={cookie}"}
    async with httpx.AsyncClient(base_url=base) as c:
        for headers, fields in (
            (own, form),
            (own, {**form, "csrf": "0" * 64}),
            (own, {**form, "csrf": csrf[:-1] + ("0" if csrf[-1] != "0" else "1")}),
            ({**own, "Origin": "http://evil.test"}, {**form, "csrf": csrf}),
            ({"Cookie": f"{COOKIE}={cookie}"}, {**form, "csrf": csrf}),
        ):
            r = await c.post("/dashboard/queue/action", data=fields, headers=headers)
            assert r.status_code == 403, (headers, fields, r.status_code)
    assert await _states(eng, "slow.example") == ["held"] * 3

    # A read key's session, with its own valid token, cannot act either.
    reader = await Tab.open(browser, base)
    await reader.login(read_key, "/dashboard/queue")
    async with httpx.AsyncClient(base_url=base) as c:
        r = await c.post("/dashboard/queue/action", data={**form, "csrf": await reader.csrf()},
                         headers={"Origin": base, "Cookie": f"{COOKIE}={await reader.cookie()}"})
        assert r.status_code == 403 and "admin" in r.text
        # The token of one session is no good with another's cookie.
        r = await c.post("/dashboard/queue/action", data={**form, "csrf": await reader.csrf()}, headers=own)
        assert r.status_code == 403
    assert await _states(eng, "slow.example") == ["held"] * 3

    # The admin releases them through the page.
    await tab.goto("/dashboard/queue")
    async with page.expect_navigation():
        await page.click(f"{row} a[data-action=release]")
    async with page.expect_navigation():
        await page.click("#confirm")
    assert await tab.text("#notice") == "release: 3 recipient(s) changed"
    # Each action taken through the dashboard is in the audit log, as the admin key, from the browser's address.
    audit = await eng.pool.fetch("SELECT actor, action, target, source_ip::text AS ip, after FROM audit_log "
                                 "WHERE action LIKE 'queue.%' ORDER BY id")
    assert [(a["action"], a["target"], a["after"]["changed"]) for a in audit] == [
        ("queue.hold", "domain:slow.example", 3), ("queue.release", "domain:slow.example", 3)]
    assert all(a["ip"].startswith("127.") for a in audit)
    assert await _states(eng, "slow.example") == ["queued"] * 3
    assert await tab.text(f"{row} [data-field=queued]") == "3"
    await tab.shot("queue-released")
    assert tab.offsite == [] and reader.offsite == []


async def test_search_shows_suppressions_and_consent(engine_factory, tmp_path, browser) -> None:
    eng, base = await _engine(engine_factory, tmp_path)
    read_key, _ = await eng.apikeys.create("viewer", ["read"])
    admin_key, _ = await eng.apikeys.create("ops", ["admin"])
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {admin_key}"}) as c:
        r = await c.post("/v1/suppressions", json={"address": "Ann@Example.com", "scope": "bulk", "reason": "asked by phone"})
        assert r.status_code in (200, 201), r.text
        r = await c.post("/v1/consent", json={"address": "ann@example.com", "purpose": "marketing", "status": "granted",
                                              "source": "signup-form", "legal_basis": "consent",
                                              "captured_at": "2026-11-01T10:00:00Z"})
        assert r.status_code == 200, r.text
    tab = await Tab.open(browser, base)
    await tab.login(read_key, "/dashboard/search")
    await tab.page.fill("#address", "ANN@example.com")
    async with tab.page.expect_navigation():
        await tab.page.click("#search")
    assert await tab.page.get_attribute("#result", "data-address") == "ann@example.com"
    sup = await tab.text("#suppressions")
    assert "bulk" in sup and "asked by phone" in sup
    consent = await tab.text("#consent")
    assert "marketing" in consent and "granted" in consent
    assert "none → granted" in await tab.text("#history")
    await tab.shot("search")
    assert tab.offsite == []


async def test_docs_render_offline(engine_factory, tmp_path, browser) -> None:
    eng, base = await _engine(engine_factory, tmp_path)
    tab = await Tab.open(browser, base)
    await tab.goto("/docs")
    try:
        await tab.page.wait_for_selector(".swagger-ui .info .title", timeout=WAIT_MS)
    except Exception:
        await tab.shot("docs-failed", full_page=False)
        raise AssertionError(f"Swagger UI did not render; console: {tab.console}; requests: {tab.requests}") from None
    assert (await tab.text(".swagger-ui .info .title")).startswith("engine")
    await tab.page.wait_for_selector(".opblock-summary-path[data-path='/v1/messages']", timeout=WAIT_MS)
    assert await tab.page.locator(".opblock-tag", has_text="webhooks").count() >= 1
    await tab.shot("docs", full_page=False)
    assert tab.offsite == []
    assert f"{base}/dashboard/static/swagger/swagger-ui-bundle.js" in tab.requests
    assert f"{base}/openapi.json" in tab.requests


# --------------------------------------------------------------------------- over HTTP, no browser


async def test_pages_need_a_session_and_send_security_headers(engine_factory, tmp_path) -> None:
    eng, base = await _engine(engine_factory, tmp_path, webhooks=True)
    key, _ = await eng.apikeys.create("viewer", ["read"])
    async with httpx.AsyncClient(base_url=base) as c:
        for path in ("/dashboard", "/dashboard/providers", "/dashboard/warmup", "/dashboard/queue", "/dashboard/search?address=a@b.c"):
            r = await c.get(path)
            assert r.status_code == 303, path
            assert r.headers["location"].startswith("/dashboard/login?next=%2Fdashboard"), r.headers["location"]
        assert (await c.get("/dashboard/live/overview")).status_code == 401
        assert (await c.get("/dashboard/live/nothing")).status_code == 404
        # A forged cookie is no session.
        r = await c.get("/dashboard", cookies={COOKIE: "gAAAAABforged"})
        assert r.status_code == 303
        # Login from another origin (login CSRF) is refused; from our own it works.
        r = await c.post("/dashboard/login", data={"key": key}, headers={"Origin": "http://evil.test"})
        assert r.status_code == 403 and "set-cookie" not in r.headers
        r = await c.post("/dashboard/login", data={"key": key, "next": "//evil.test/x"}, headers={"Origin": base})
        assert r.status_code == 303 and r.headers["location"] == "/dashboard"
        cookie = r.cookies.get(COOKIE)
        assert cookie and "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
        r = await c.get("/dashboard", cookies={COOKIE: cookie})
        assert r.status_code == 200
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"
        assert "https://" not in r.text and "http://" not in r.text
        assert 'id="event-lag"' in r.text and 'id="unsubscribe-lag"' in r.text  # webhooks on: their lag is shown
        live = await c.get("/dashboard/live/providers", cookies={COOKIE: cookie})
        assert live.status_code == 200 and 'data-provider="bigmail"' in live.text
        # Revoking the key ends its sessions (within the key cache's TTL).
        await eng.apikeys.revoke("viewer")
        eng.apikeys._cache.clear()
        r = await c.get("/dashboard", cookies={COOKIE: cookie})
        assert r.status_code == 303


async def test_docs_and_assets_are_local(engine_factory, tmp_path) -> None:
    eng, base = await _engine(engine_factory, tmp_path)
    async with httpx.AsyncClient(base_url=base) as c:
        r = await c.get("/docs")
        assert r.status_code == 200
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", r.text)
        assert urls and all(u.startswith("/") for u in urls), urls
        for asset in ("/dashboard/static/swagger/swagger-ui-bundle.js", "/dashboard/static/swagger/swagger-ui.css",
                      "/dashboard/static/dashboard.js", "/dashboard/static/dashboard.css"):
            got = await c.get(asset)
            assert got.status_code == 200 and len(got.content) > 500, asset
        assert (await c.get("/redoc")).status_code == 404  # ReDoc would load from a CDN: not served


async def test_dashboard_can_be_turned_off(engine_factory) -> None:
    eng = await engine_factory("[dashboard]\nenabled = false\n")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{eng.http_address[1]}") as c:
        assert (await c.get("/dashboard")).status_code == 404
        assert (await c.get("/docs")).status_code == 200


def test_session_cookie_is_sealed_and_expires() -> None:
    now = [1_000_000.0]
    sessions = Sessions(b"k" * 44, 3600, clock=lambda: now[0])
    cookie, session = sessions.issue("ek_secret")
    assert "ek_secret" not in cookie and session.key_digest == hash_key("ek_secret")
    opened = sessions.open(cookie)
    assert opened == session
    tampered = cookie[:40] + ("A" if cookie[40] != "A" else "B") + cookie[41:]
    assert sessions.open(tampered) is None
    assert Sessions(b"other" * 9, 3600, clock=lambda: now[0]).open(cookie) is None
    assert sessions.csrf_ok(session, sessions.csrf_token(session))
    assert not sessions.csrf_ok(session, "") and not sessions.csrf_ok(session, None)
    other_cookie, other = sessions.issue("ek_secret")
    assert sessions.csrf_token(other) != sessions.csrf_token(session)
    now[0] += 3601
    assert sessions.open(cookie) is None
    now[0] -= 3601
    sessions.end(session)
    assert sessions.open(cookie) is None and sessions.open(other_cookie) == other


def test_next_and_origin_checks() -> None:
    assert safe_next("/dashboard/queue?domain=a") == "/dashboard/queue?domain=a"
    for bad in ("//evil.test", "https://evil.test/dashboard", "/dashboardx", "/dashboard//evil", "/dashboard/\\evil", None, ""):
        assert safe_next(bad) == "/dashboard"
    public = "https://mail.example.com"
    assert same_origin({"origin": "http://127.0.0.1:8025", "host": "127.0.0.1:8025"}, public)
    assert same_origin({"referer": "http://127.0.0.1:8025/dashboard/queue", "host": "127.0.0.1:8025"}, public)
    assert same_origin({"origin": "https://mail.example.com", "host": "10.0.0.5:8025"}, public)  # behind a TLS proxy
    assert not same_origin({"origin": "http://evil.test", "host": "127.0.0.1:8025"}, public)
    assert not same_origin({"origin": "null", "host": "127.0.0.1:8025"}, public)
    assert not same_origin({"host": "127.0.0.1:8025"}, public)
