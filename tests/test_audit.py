"""The audit log: every admin action from the REST API and the CLI lands in it, with who, from
where, what and before/after (never a secret, never an email address in clear); it is append-only
in the database itself; ``GET /v1/audit`` pages by cursor in commit order and streams NDJSON;
``engine audit`` prints it for people and SIEMs.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from engine import audit
from engine.app import _reload
from engine.audit import Actor, AuditLog
from engine.cli import main as cli_main
from engine.db.pool import acquire

DEADLINE = 30.0
CLI_ACTOR = f"cli:{pwd.getpwuid(os.getuid()).pw_name}"
TEMPLATE = {"subject": "Hello {{ name }}", "text": "Hi {{ name }}"}
HOOK_URL = "http://127.0.0.1:9/hook?token=s3cr3t-in-url"


def _config(tmp_path: Path) -> str:
    shaping = tmp_path / "shaping.toml"
    shaping.write_text("[default]\nconnection_limit = 10\n")
    return f'[webhooks]\nallow_private_targets = true\n[shaping]\nfile = "{shaping}"\n'


async def _until(check: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Poll ``check`` until it returns something truthy (rows show once older transactions end)."""
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while True:
        got = await check()
        if got:
            return got
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.1)


@pytest.fixture
async def api(engine_factory: Any, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    eng = await engine_factory(_config(tmp_path))
    key, key_id = await eng.apikeys.create("ops-admin", ["admin"])
    host, port = eng.http_address
    async with httpx.AsyncClient(
        base_url=f"http://{host}:{port}", timeout=10, headers={"Authorization": f"Bearer {key}"}
    ) as client:
        client.engine, client.key, client.key_id = eng, key, key_id  # type: ignore[attr-defined]
        yield client


async def _entries(api: httpx.AsyncClient, n: int, **params: Any) -> list[dict[str, Any]]:
    async def page() -> list[dict[str, Any]] | None:
        r = await api.get("/v1/audit", params={"limit": 1000, **params})
        assert r.status_code == 200, r.text
        got: list[dict[str, Any]] = r.json()["entries"]
        return got if len(got) >= n else None

    found: list[dict[str, Any]] = await _until(page, f"{n} audit rows")
    return found


async def test_every_admin_action_over_http_is_recorded(api: httpx.AsyncClient) -> None:
    ndjson = {"Content-Type": "application/x-ndjson"}
    grant = {"purpose": "marketing", "status": "granted", "legal_basis": "consent", "source": "crm:test",
             "captured_at": "2026-11-01T10:00:00Z"}
    assert (await api.post("/v1/templates", json={"name": "promo", "parts": TEMPLATE})).status_code == 201
    r = await api.post("/v1/suppressions", json={"address": "Zed@Example.net", "reason": "asked by phone"})
    assert r.status_code == 201, r.text
    assert (await api.delete("/v1/suppressions/zed@example.net")).status_code == 200
    lines = b'{"address": "imp1@example.net"}\n{"address": "imp2@example.net", "reason": "list"}\n'
    r = await api.post("/v1/suppressions/import", content=lines, headers=ndjson)
    assert r.status_code == 200 and r.json()["new"] == 2, r.text
    assert (await api.post("/v1/consent", json={"address": "Amy@Example.net", **grant})).status_code == 200
    lines = (json.dumps({"address": "c1@example.net", **grant}) + "\n").encode()
    assert (await api.post("/v1/consent/import", content=lines, headers=ndjson)).status_code == 200
    r = await api.post("/v1/webhooks", json={"url": HOOK_URL})
    assert r.status_code == 201, r.text
    hook, first_secret = r.json()["id"], r.json()["secret"]
    assert (await api.patch(f"/v1/webhooks/{hook}", json={"enabled": False})).status_code == 200
    r = await api.post(f"/v1/webhooks/{hook}/rotate-secret")
    assert r.status_code == 200, r.text
    second_secret = r.json()["secret"]
    assert (await api.post(f"/v1/webhooks/{hook}/replay", json={"dead_letters": True})).status_code == 202
    assert (await api.delete(f"/v1/webhooks/{hook}")).status_code == 204
    r = await api.delete("/v1/contacts/amy@example.net")
    assert r.status_code == 200, r.text
    erased_hash = r.json()["address_hash"]
    await _reload(api.engine)  # type: ignore[attr-defined]  # what SIGHUP runs

    actions = [
        "template.upload", "suppression.add", "suppression.remove", "suppression.import", "consent.change",
        "consent.import", "webhook.create", "webhook.update", "webhook.rotate", "webhook.replay", "webhook.delete",
        "contact.erase", "shaping.reload",
    ]
    rows = await _entries(api, len(actions))
    assert [e["action"] for e in rows] == actions
    by = {e["action"]: e for e in rows}
    for e in rows[:-1]:
        assert e["actor"] == "ops-admin" and e["actor_key_id"] == api.key_id  # type: ignore[attr-defined]
        assert e["source_ip"] == "127.0.0.1" and e["at"] and e["cursor"]
    assert by["shaping.reload"]["actor"] == "signal:SIGHUP" and by["shaping.reload"]["source_ip"] is None

    assert by["template.upload"]["target"] == "promo@1"
    assert by["template.upload"]["after"]["parts"] == {"subject": len(TEMPLATE["subject"]), "text": len(TEMPLATE["text"])}
    # Addresses are named by the erasure hash: the same person correlates across rows...
    assert by["contact.erase"]["target"] == by["consent.change"]["target"] == f"sha256:{erased_hash}"
    assert by["contact.erase"]["after"]["consent_rows"] >= 1
    assert by["suppression.add"]["target"] == by["suppression.remove"]["target"]
    assert by["suppression.add"]["target"].startswith("sha256:")
    assert by["suppression.add"]["after"]["reason"] == "asked by phone" and by["suppression.add"]["before"]["suppressed"] is False
    assert by["suppression.remove"]["before"] == {"scopes": ["*"]}
    assert by["suppression.import"]["after"]["new"] == 2 and by["consent.import"]["after"]["lines"] == 1
    assert by["consent.change"]["before"] == {"purpose": "marketing", "status": None}
    assert by["consent.change"]["after"]["outcomes"]["new"] == 1
    # ... and found by address (hashed on the way in), with any spelling.
    found = (await api.get("/v1/audit", params={"target": "ZED@example.NET"})).json()["entries"]
    assert [e["action"] for e in found] == ["suppression.add", "suppression.remove"]
    # Webhooks: before/after without the secret, the URL's query values redacted.
    assert by["webhook.create"]["target"] == hook
    assert by["webhook.create"]["after"]["url"] == "http://127.0.0.1:9/hook?token=…"
    assert by["webhook.update"]["before"]["enabled"] is True and by["webhook.update"]["after"]["enabled"] is False
    assert by["webhook.delete"]["before"]["id"] == hook
    assert by["webhook.replay"]["after"]["dead_letters"] is True

    text = json.dumps(rows)
    for secret in (first_secret, second_secret, "s3cr3t-in-url", api.key, api.key[:10]):  # type: ignore[attr-defined]
        assert secret not in text
    for address in ("amy@example.net", "zed@example.net", "imp1@example.net", "c1@example.net"):
        assert address not in text.lower()
    # The erased address is nowhere in the log, whatever column.
    pool = api.engine.pool  # type: ignore[attr-defined]
    assert await pool.fetchval(
        "SELECT count(*) FROM audit_log WHERE lower(concat_ws(' ', target, before::text, after::text)) LIKE '%amy@%'"
    ) == 0


async def test_read_scope_cannot_read_the_log_and_filters_are_checked(api: httpx.AsyncClient) -> None:
    reader, _ = await api.engine.apikeys.create("reader", ["read"])  # type: ignore[attr-defined]
    r = await api.get("/v1/audit", headers={"Authorization": f"Bearer {reader}"})
    assert r.status_code == 403 and "admin" in r.json()["error"]
    r = await api.get("/v1/audit", params={"action": "queue.explode"})
    assert r.status_code == 422 and r.json()["field"] == "action"
    r = await api.get("/v1/audit", params={"after": "!!"})
    assert r.status_code == 422 and r.json()["field"] == "after"
    r = await api.get("/v1/audit", params={"target": "not an@address@x"})
    assert r.status_code == 422 and r.json()["field"] == "target"


async def test_cursor_pages_ndjson_and_filters(api: httpx.AsyncClient) -> None:
    log = AuditLog(api.engine.pool)  # type: ignore[attr-defined]
    alice = Actor.api_key("alice", 7, "192.0.2.7")
    for i in range(5):
        await log.record(alice, "queue.hold", f"domain=d{i}.test", after={"recipients": i})
    await log.record(Actor.cli(), "queue.release", "all", after={"recipients": 0})
    await log.record(alice, "shaping.reload", "/etc/engine/shaping.toml")
    everything = await _entries(api, 7)
    assert len(everything) == 7

    seen: list[int] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"after": after} if after else {})}
        page = (await api.get("/v1/audit", params=params)).json()
        seen += [e["id"] for e in page["entries"]]
        after = page["next"]
        if not page["has_more"]:
            break
    assert seen == [e["id"] for e in everything]
    again = (await api.get("/v1/audit", params={"after": after})).json()
    assert again["entries"] == [] and again["next"] == after  # an empty page keeps the cursor

    r = await api.get("/v1/audit", params={"format": "ndjson"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert [e["id"] for e in lines] == seen
    r = await api.get("/v1/audit", params={"format": "ndjson", "after": lines[2]["cursor"]})
    assert [json.loads(line)["id"] for line in r.text.splitlines()] == seen[3:]

    def ids(params: dict[str, Any]) -> Awaitable[httpx.Response]:
        return api.get("/v1/audit", params=params)

    family = (await ids({"action": "queue.*"})).json()["entries"]
    assert [e["action"] for e in family] == ["queue.hold"] * 5 + ["queue.release"]
    assert len((await ids({"action": "queue.hold"})).json()["entries"]) == 5
    mine = (await ids({"actor": "alice"})).json()["entries"]
    assert len(mine) == 6 and all(e["source_ip"] == "192.0.2.7" and e["actor_key_id"] == 7 for e in mine)
    assert (await ids({"target": "domain=d3.test"})).json()["entries"][0]["after"] == {"recipients": 3}
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert (await ids({"since": future})).json()["entries"] == []
    assert len((await ids({"until": future})).json()["entries"]) == 7


async def test_a_row_committing_late_is_never_skipped(api: httpx.AsyncClient, db_dsn: str) -> None:
    pool = api.engine.pool  # type: ignore[attr-defined]
    log = AuditLog(pool)
    actor = Actor.cli()
    slow = await asyncpg.connect(db_dsn)
    try:
        tx = slow.transaction()
        await tx.start()
        early = await audit.record(slow, actor, "queue.hold", "early")  # its transaction starts first...
        late = await log.record(actor, "queue.release", "late")  # ...and commits after this one
        page = (await api.get("/v1/audit")).json()
        assert late not in [e["id"] for e in page["entries"]]  # held back while 'early' may still commit
        cursor = page["next"]
        await tx.commit()
    finally:
        await slow.close()

    async def both() -> list[int] | None:
        got = [e["id"] for e in (await api.get("/v1/audit", params={"after": cursor})).json()["entries"]]
        return got if late in got else None

    assert await _until(both, "both rows after the slow transaction commits") == [early, late]


async def test_the_table_is_append_only(pool: asyncpg.Pool) -> None:
    log = AuditLog(pool)
    first = await log.record(Actor.cli(), "queue.hold", "a")
    await pool.execute("SELECT pg_sleep(0.01)")
    second = await log.record(Actor.cli(), "queue.hold", "b")
    for statement in ("UPDATE audit_log SET actor = 'someone else'", "DELETE FROM audit_log", "TRUNCATE audit_log"):
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await pool.execute(statement)
    at_second = await pool.fetchval("SELECT at FROM audit_log WHERE id = $1", second)
    async with acquire(pool) as conn:
        assert await audit.prune(conn, at_second - timedelta(days=400)) == 0
        assert await audit.prune(conn, at_second) == 1  # only what is older than the cut
        # The permission ended with prune's transaction.
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute("DELETE FROM audit_log")
    assert [r["id"] for r in await pool.fetch("SELECT id FROM audit_log")] == [second]
    assert first != second


def test_scrub_and_redact_drop_secrets() -> None:
    got = audit.scrub({"id": 1, "secret": "x", "nested": [{"key": "k", "Password": "p", "ok": True}], "prefix": "ek_abc"})
    assert got == {"id": 1, "nested": [{"ok": True}]}
    assert audit.redact_url("https://user:pw@hooks.example:8443/in/x?token=abc&b=") == "https://hooks.example:8443/in/x?token=…&b=…"
    assert audit.redact_url("https://[2001:db8::1]/h") == "https://[2001:db8::1]/h"
    with pytest.raises(Exception, match="unknown audit action"):
        asyncio.run(audit.record(None, Actor.cli(), "key.steal"))  # type: ignore[arg-type]


Cli = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
async def cli(db_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.setenv("DATABASE_URL", db_dsn)
    monkeypatch.setenv("ENGINE_HOME", str(tmp_path / "cli-home"))
    config = tmp_path / "cli.toml"
    config.write_text(_config(tmp_path))

    async def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = await asyncio.to_thread(cli_main, ["--config", str(config), *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


async def test_every_admin_action_from_the_cli_is_recorded(cli: Cli) -> None:
    secrets: list[str] = []

    async def ok(*args: str) -> str:
        code, out, err = await cli(*args)
        assert code == 0, (args, err)
        return out

    secrets.append((await ok("apikey", "create", "--name", "crm", "--scopes", "send,read", "--allow", "10.0.0.0/8")).split()[-1])
    secrets.append((await ok("apikey", "rotate", "--name", "crm", "--grace", "1h")).split()[-1])
    await ok("apikey", "allow", "--name", "crm", "127.0.0.0/8")
    await ok("apikey", "revoke", "--name", "crm")
    await ok("suppress", "add", "Bob@Example.org", "--reason", "phoned")
    await ok("suppress", "remove", "bob@example.org")
    for action in ("hold", "release", "retry", "purge"):
        await ok("queue", action, "--domain", "example.org")
    await ok("reload", "--wait", "0")
    out = await ok("webhooks", "add", HOOK_URL, "--json")
    hook = json.loads(out)
    secrets.append(hook["secret"])
    await ok("webhooks", "disable", hook["id"])
    await ok("webhooks", "enable", hook["id"])
    secrets.append((await ok("webhooks", "rotate", hook["id"])).splitlines()[0].split()[-1])
    await ok("webhooks", "replay", hook["id"], "--dead")
    await ok("webhooks", "rm", hook["id"])

    actions = [
        "apikey.create", "apikey.rotate", "apikey.allow", "apikey.revoke", "suppression.add", "suppression.remove",
        "queue.hold", "queue.release", "queue.retry", "queue.purge", "shaping.reload", "webhook.create",
        "webhook.update", "webhook.update", "webhook.rotate", "webhook.replay", "webhook.delete",
    ]

    async def exported() -> list[dict[str, Any]] | None:
        rows = [json.loads(line) for line in (await ok("audit", "--json")).splitlines()]
        return rows if len(rows) >= len(actions) else None

    rows = await _until(exported, "the CLI's audit rows")
    assert [e["action"] for e in rows] == actions
    assert all(e["actor"] == CLI_ACTOR and e["actor_key_id"] is None and e["source_ip"] is None for e in rows)
    by = {e["action"]: e for e in rows}
    assert by["apikey.create"]["target"] == "crm" and by["apikey.create"]["after"]["allow"] == ["10.0.0.0/8"]
    assert by["apikey.rotate"]["after"]["grace_seconds"] == 3600 and by["apikey.rotate"]["after"]["old_valid_until"]
    assert by["apikey.allow"]["before"]["allow"] == ["10.0.0.0/8"] and by["apikey.allow"]["after"]["allow"] == ["127.0.0.0/8"]
    assert len(by["apikey.revoke"]["after"]["revoked"]) == 2  # the current key and the one in its grace
    assert by["queue.hold"]["target"] == "domain=example.org" and by["queue.hold"]["after"]["recipients"] == 0
    assert by["queue.purge"]["after"]["states"] == ["held"]
    assert by["shaping.reload"]["target"].endswith("shaping.toml") and len(by["shaping.reload"]["after"]["sha256"]) == 64
    assert [e["after"]["enabled"] for e in rows if e["action"] == "webhook.update"] == [False, True]
    text = json.dumps(rows)
    for secret in secrets:
        assert secret not in text
    assert "bob@example.org" not in text.lower() and "s3cr3t-in-url" not in text

    # Filters, the table for people, and resuming after a cursor.
    queue = [json.loads(line) for line in (await ok("audit", "--json", "--action", "queue.*")).splitlines()]
    assert [e["action"] for e in queue] == ["queue.hold", "queue.release", "queue.retry", "queue.purge"]
    bob = [json.loads(line) for line in (await ok("audit", "--json", "--target", "BOB@example.org")).splitlines()]
    assert [e["action"] for e in bob] == ["suppression.add", "suppression.remove"]
    rest = [json.loads(line) for line in (await ok("audit", "--json", "--after", rows[-3]["cursor"])).splitlines()]
    assert [e["id"] for e in rest] == [e["id"] for e in rows[-2:]]
    assert (await ok("audit", "--json", "--since", "1h", "--actor", "nobody")) == ""
    table = await ok("audit", "--since", "1h", "--limit", "3")
    assert table.splitlines()[0].split()[:4] == ["AT", "ACTOR", "FROM", "ACTION"]
    assert len(table.splitlines()) == 4 and "apikey.create" in table
    code, _, err = await cli("audit", "--action", "nope")
    assert code == 1 and "unknown action" in err
