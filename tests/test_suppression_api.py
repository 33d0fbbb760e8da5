"""/v1/suppressions over a real socket: scopes, validation, and queued mail stopped by an add."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from engine.cli import main as cli_main
from tests.configs import BULK_WITHOUT_CONSENT, TRACKING_KEYS


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def api(engine_factory) -> Any:
    eng = await engine_factory(BULK_WITHOUT_CONSENT + TRACKING_KEYS)
    admin, _ = await eng.apikeys.create("admin", ["admin"])
    reader, _ = await eng.apikeys.create("reader", ["read"])
    sender, _ = await eng.apikeys.create("sender", ["send"])
    host, port = eng.http_address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as client:
        client.engine, client.admin, client.reader, client.sender = eng, admin, reader, sender  # type: ignore[attr-defined]
        yield client


async def submit(api, to: list[str], stream: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"from": "app@sender.test", "to": to, "subject": "Hi", "text": "Hello"}
    if stream:
        body["stream"] = stream
    r = await api.post("/v1/messages", json=body, headers=auth(api.sender))
    assert r.status_code == 202, r.text
    return r.json()


async def test_add_list_remove_and_queued_mail_stopped(api) -> None:
    queued = await submit(api, ["Zed@Example.net", "amy@example.net"])
    bulk = await submit(api, ["zed@example.net"], stream="bulk")
    r = await api.post("/v1/suppressions", json={"address": "ZED@example.NET", "scope": "default", "reason": "asked by phone"},
                       headers=auth(api.admin))
    assert r.status_code == 201, r.text
    assert r.json() == {"address": "zed@example.net", "scope": "default", "created": True, "pending_suppressed": 1}
    amy = await api.engine.pool.fetchval("SELECT state FROM recipients WHERE address = 'amy@example.net'")
    assert amy == "queued"
    rows = await api.engine.pool.fetch("SELECT message_id::text, state FROM recipients WHERE lower(address) = 'zed@example.net'")
    assert {r["message_id"]: r["state"] for r in rows} == {queued["id"]: "suppressed", bulk["id"]: "queued"}
    # Again: already there (200), nothing more to stop.
    r = await api.post("/v1/suppressions", json={"address": "zed@example.net", "scope": "default"}, headers=auth(api.admin))
    assert r.status_code == 200 and r.json()["created"] is False
    # Later submissions report it (default stream only).
    later = await submit(api, ["zed@example.net"])
    assert later["recipients"][0]["state"] == "suppressed"
    assert (await submit(api, ["zed@example.net"], stream="bulk"))["recipients"][0]["state"] == "queued"

    r = await api.get("/v1/suppressions", params={"address": "Zed@example.net"}, headers=auth(api.reader))
    assert r.status_code == 200
    [item] = r.json()["suppressions"]
    assert item["address"] == "zed@example.net" and item["scope"] == "default"
    assert item["reason"] == "asked by phone" and item["source"] == "api:admin"

    r = await api.delete("/v1/suppressions/zed@example.net", params={"scope": "bulk"}, headers=auth(api.admin))
    assert r.status_code == 404 and r.json()["error"]
    r = await api.delete("/v1/suppressions/ZED@example.net", headers=auth(api.admin))
    assert r.status_code == 200 and r.json() == {"address": "zed@example.net", "removed_scopes": ["default"]}
    assert (await submit(api, ["zed@example.net"]))["recipients"][0]["state"] == "queued"


async def test_global_scope_stops_every_stream(api) -> None:
    a = await submit(api, ["yan@example.org"])
    b = await submit(api, ["yan@example.org"], stream="bulk")
    r = await api.post("/v1/suppressions", json={"address": "yan@example.org"}, headers=auth(api.admin))
    assert r.status_code == 201 and r.json()["scope"] == "*" and r.json()["pending_suppressed"] == 2
    events = await api.engine.pool.fetch("SELECT type, message_id::text, data FROM events ORDER BY id")
    assert sorted(e["message_id"] for e in events if e["type"] == "suppressed") == sorted([a["id"], b["id"]])


async def test_scopes_and_validation(api) -> None:
    r = await api.post("/v1/suppressions", json={"address": "x@example.org"}, headers=auth(api.reader))
    assert r.status_code == 403
    r = await api.post("/v1/suppressions", json={"address": "x@example.org"}, headers=auth(api.sender))
    assert r.status_code == 403
    r = await api.get("/v1/suppressions")
    assert r.status_code == 401
    r = await api.delete("/v1/suppressions/x@example.org", headers=auth(api.reader))
    assert r.status_code == 403
    for body, field in (
        ({"address": "not an address"}, "address"),
        ({"address": "x@example.org", "scope": "Bad Scope!"}, "scope"),
        ({"address": "x@example.org", "scope": "bulkk"}, "scope"),
        ({"address": "x@example.org", "reason": ""}, "reason"),
        ({"address": "x@example.org", "extra": 1}, "extra"),
        ({}, "address"),
    ):
        r = await api.post("/v1/suppressions", json=body, headers=auth(api.admin))
        assert r.status_code == 422, (body, r.text)
        assert r.json()["field"] == field, r.json()
    r = await api.post("/v1/suppressions", content=b"{not json", headers={**auth(api.admin), "content-type": "application/json"})
    assert r.status_code == 400
    r = await api.get("/v1/suppressions", params={"limit": 0}, headers=auth(api.reader))
    assert r.status_code == 422
    r = await api.get("/v1/suppressions", params={"address": "bad"}, headers=auth(api.reader))
    assert r.status_code == 422 and r.json()["field"] == "address"
    assert (await api.get("/openapi.json")).json()["paths"]["/v1/suppressions"]


async def test_cli_add_stops_queued_mail(api, db_dsn, tmp_path, capsys) -> None:
    out = await submit(api, ["cli@example.com"])
    import asyncio
    import os

    env = {"DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "cli-home")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        code = await asyncio.to_thread(cli_main, ["suppress", "add", "CLI@example.com", "--reason", "manual"])
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert code == 0
    printed = capsys.readouterr().out
    assert "suppressed: CLI@example.com (*)" in printed and "1 queued recipient(s) will not be sent" in printed
    state = await api.engine.pool.fetchval("SELECT state FROM recipients WHERE message_id = $1::uuid", out["id"])
    assert state == "suppressed"


async def test_unknown_stream_scope_is_refused(api) -> None:
    r = await api.post("/v1/suppressions", json={"address": "x@example.org", "scope": "bulkk"}, headers=auth(api.admin))
    assert r.status_code == 422 and r.json()["field"] == "scope", r.text
    streams = sorted(api.engine.settings.queue.streams)
    assert "bulkk" in r.json()["error"] and all(s in r.json()["error"] for s in streams)
    assert await api.engine.pool.fetchval("SELECT count(*) FROM suppressions") == 0


async def test_cli_add_refuses_unknown_scope(api, db_dsn, tmp_path, capsys, monkeypatch) -> None:
    import asyncio

    monkeypatch.setenv("DATABASE_URL", db_dsn)
    monkeypatch.setenv("ENGINE_HOME", str(tmp_path / "cli-home"))
    code = await asyncio.to_thread(cli_main, ["suppress", "add", "cli@example.com", "--scope", "bulkk"])
    assert code == 1
    err = capsys.readouterr().err
    assert "unknown scope 'bulkk'" in err and "bulk" in err.replace("'bulkk'", "")
    assert await api.engine.pool.fetchval("SELECT count(*) FROM suppressions") == 0
    assert await asyncio.to_thread(cli_main, ["suppress", "add", "cli@example.com", "--scope", "bulk"]) == 0
    assert await api.engine.pool.fetchval("SELECT scope FROM suppressions") == "bulk"
