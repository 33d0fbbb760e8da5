"""/v1/templates over a real socket, and submit-time template checks (existence, variables, pinning)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIG = f'[templates]\ndirectory = "{REPO / "templates"}"\nmax_part_size = "4k"\n'

PROMO = {
    "subject": "Hello {{ first_name }}",
    "html": '<p>Hi {{ first_name }}, use <a href="https://shop.example/{{ code }}">your code</a>.</p>'
            "{% if coupon is defined %}<p>{{ coupon }}</p>{% endif %}",
}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _client(eng: Any) -> httpx.AsyncClient:
    host, port = eng.http_address
    return httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10)


@pytest.fixture
async def api(engine_factory) -> Any:
    eng = await engine_factory(CONFIG)
    admin, _ = await eng.apikeys.create("admin", ["admin"])
    send, _ = await eng.apikeys.create("sender", ["send"])
    read, _ = await eng.apikeys.create("reader", ["read"])
    async with await _client(eng) as client:
        client.engine, client.admin_key, client.send_key, client.read_key = eng, admin, send, read  # type: ignore[attr-defined]
        yield client


def msg(template: str, **extra: Any) -> dict[str, Any]:
    return {"from": "app@example.com", "to": ["a@example.net"], "template": template, **extra}


async def stored_template(conn, message_id: str) -> str:
    content = await conn.fetchval("SELECT content FROM messages WHERE id = $1", uuid.UUID(message_id))
    import json

    return (json.loads(content) if isinstance(content, str) else content)["template"]


async def test_upload_then_submit_and_missing_variable(api, conn) -> None:
    r = await api.post("/v1/templates", json={"name": "promo", "parts": PROMO}, headers=auth(api.admin_key))
    assert r.status_code == 201, r.text
    assert r.json() == {"name": "promo", "version": 1, "required_variables": ["code", "first_name"]}

    ok = msg("promo", vars={"first_name": "Ann", "code": "X1"})
    r = await api.post("/v1/messages", json=ok, headers=auth(api.send_key))
    assert r.status_code == 202, r.text
    assert await stored_template(conn, r.json()["id"]) == "promo@1"

    r = await api.post("/v1/messages", json=msg("promo", vars={"code": "X1"}), headers=auth(api.send_key))
    assert r.status_code == 422
    assert r.json()["field"] == "vars.first_name" and "first_name" in r.json()["error"]

    # Per-recipient vars merge over message vars: only the recipient lacking it is named.
    mixed = msg("promo", vars={"code": "X1"},
                to=[{"email": "a@example.net", "vars": {"first_name": "A"}}, "b@example.net"])
    r = await api.post("/v1/messages", json=mixed, headers=auth(api.send_key))
    assert r.status_code == 422 and r.json()["field"] == "to[1].vars.first_name", r.text
    everyone = msg("promo", vars={"code": "X1"},
                   to=[{"email": "a@example.net", "vars": {"first_name": "A"}},
                       {"email": "b@example.net", "vars": {"first_name": "B"}}])
    r = await api.post("/v1/messages", json=everyone, headers=auth(api.send_key))
    assert r.status_code == 202, r.text

    batch = {"messages": [ok, msg("promo", vars={"first_name": "x"})]}
    r = await api.post("/v1/messages/batch", json=batch, headers=auth(api.send_key))
    assert r.status_code == 422 and r.json()["field"] == "messages[1].vars.code", r.text
    # Nothing of a refused batch is stored.
    assert await conn.fetchval("SELECT count(*) FROM messages") == 2


async def test_unknown_template_and_version(api, conn) -> None:
    for ref in ("nope", "nope@1", "bad name!"):
        r = await api.post("/v1/messages", json=msg(ref), headers=auth(api.send_key))
        assert r.status_code == 422, (ref, r.text)
        assert r.json()["field"] == "template", r.text
    assert await conn.fetchval("SELECT count(*) FROM messages") == 0


async def test_syntax_error_names_part_and_line(api) -> None:
    bad = {"subject": "Hi", "html": "<p>ok</p>\n<p>{% if x %}never closed</p>\n"}
    r = await api.post("/v1/templates", json={"name": "broken", "parts": bad}, headers=auth(api.admin_key))
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["field"] == "parts.html"
    assert "'broken'" in body["error"] and "part 'html', line 2" in body["error"], body
    r = await api.get("/v1/templates/broken", headers=auth(api.read_key))
    assert r.status_code == 404


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ x['__class__'] }}",
    "{{ x|attr('__class__') }}",
])
async def test_sandbox_escape_rejected(api, source) -> None:
    r = await api.post("/v1/templates", json={"name": "evil", "parts": {"subject": "s", "text": source}},
                       headers=auth(api.admin_key))
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "parts.text" and "private attribute" in r.json()["error"]
    assert "line 1" in r.json()["error"]


async def test_upload_checks(api) -> None:
    r = await api.post("/v1/templates", json={"name": "promo", "parts": PROMO}, headers=auth(api.send_key))
    assert r.status_code == 403
    r = await api.post("/v1/templates", json={"name": "Bad Name", "parts": PROMO}, headers=auth(api.admin_key))
    assert r.status_code == 422 and r.json()["field"] == "name"
    r = await api.post("/v1/templates", json={"name": "t", "parts": {"html": "<p>x</p>"}}, headers=auth(api.admin_key))
    assert r.status_code == 422 and "subject" in r.json()["error"]
    r = await api.post("/v1/templates", json={"name": "t", "parts": {"subject": "s", "body": "x"}}, headers=auth(api.admin_key))
    assert r.status_code == 422 and "unknown parts" in r.json()["error"]
    big = {"subject": "s", "text": "x" * 5000}
    r = await api.post("/v1/templates", json={"name": "big", "parts": big}, headers=auth(api.admin_key))
    assert r.status_code == 422 and "over the limit" in r.json()["error"] and r.json()["field"] == "parts.text"
    r = await api.post("/v1/templates", json={"name": "t", "parts": {"subject": "s", "text": "{% extends 'nope/html.html' %}"}},
                       headers=auth(api.admin_key))
    assert r.status_code == 422 and "unknown template" in r.json()["error"]


async def test_versions_kept_and_pinned(api, conn) -> None:
    for n in (1, 2):
        parts = {"subject": f"v{n} {{{{ first_name }}}}", "text": f"version {n}"}
        r = await api.post("/v1/templates", json={"name": "news", "parts": parts}, headers=auth(api.admin_key))
        assert r.status_code == 201 and r.json()["version"] == n
    r = await api.post("/v1/messages", json=msg("news", vars={"first_name": "A"}), headers=auth(api.send_key))
    assert await stored_template(conn, r.json()["id"]) == "news@2"
    r = await api.post("/v1/messages", json=msg("news@1", vars={"first_name": "A"}), headers=auth(api.send_key))
    assert r.status_code == 202 and await stored_template(conn, r.json()["id"]) == "news@1"
    r = await api.post("/v1/messages", json=msg("news@3", vars={"first_name": "A"}), headers=auth(api.send_key))
    assert r.status_code == 422 and r.json()["field"] == "template"

    listing = (await api.get("/v1/templates", headers=auth(api.read_key))).json()["templates"]
    by_name = {t["name"]: t for t in listing}
    assert by_name["news"]["latest_version"] == 2 and by_name["news"]["source"] == "upload"
    assert by_name["welcome"]["source"] == "file"
    versions = (await api.get("/v1/templates/news", headers=auth(api.read_key))).json()["versions"]
    assert [v["version"] for v in versions] == [1, 2]
    one = (await api.get("/v1/templates/news/1", headers=auth(api.read_key))).json()
    assert one["parts"]["text"] == "version 1" and one["required_variables"] == ["first_name"]
    assert (await api.get("/v1/templates/news/7", headers=auth(api.read_key))).status_code == 404
    assert (await api.get("/v1/templates/news/1", headers=auth(api.send_key))).status_code == 403


async def test_file_template_submit(api, conn) -> None:
    good = msg("welcome", vars={"name": "Ann", "product": "Engine", "login_url": "https://app.example/login"})
    r = await api.post("/v1/messages", json=good, headers=auth(api.send_key))
    assert r.status_code == 202, r.text
    assert await stored_template(conn, r.json()["id"]) == "welcome"
    r = await api.post("/v1/messages", json=msg("welcome", vars={"name": "Ann", "product": "E"}), headers=auth(api.send_key))
    assert r.status_code == 422 and r.json()["field"] == "vars.login_url"


async def test_upload_seen_by_another_engine_process(api, engine_factory, conn) -> None:
    """A second engine on the same database pins the version the first one stored."""
    other = await engine_factory(CONFIG)
    async with await _client(other) as c2:
        r = await api.post("/v1/templates", json={"name": "shared", "parts": {"subject": "s", "text": "{{ a }}"}},
                           headers=auth(api.admin_key))
        assert r.json()["version"] == 1
        r = await c2.post("/v1/messages", json=msg("shared", vars={"a": 1}), headers=auth(api.send_key))
        assert r.status_code == 202, r.text
        r = await c2.post("/v1/templates", json={"name": "shared", "parts": {"subject": "s", "text": "{{ b }}"}},
                          headers=auth(api.admin_key))
        assert r.json() == {"name": "shared", "version": 2, "required_variables": ["b"]}
        # The first engine sees version 2 as latest at once (and its variables).
        r = await api.post("/v1/messages", json=msg("shared", vars={"a": 1}), headers=auth(api.send_key))
        assert r.status_code == 422 and r.json()["field"] == "vars.b"
        r = await api.post("/v1/messages", json=msg("shared", vars={"b": 1}), headers=auth(api.send_key))
        assert await stored_template(conn, r.json()["id"]) == "shared@2"


async def test_unstorable_template_names_and_parts(api, conn) -> None:
    """NUL in a path or body never reaches Postgres: 404 for the path, 422 naming the part."""
    for path in ("/v1/templates/a%00b", "/v1/templates/a%00b/1", "/v1/templates/%00"):
        r = await api.get(path, headers=auth(api.read_key))
        assert r.status_code == 404, (path, r.text)
    r = await api.post("/v1/templates", headers=auth(api.admin_key),
                       json={"name": "nul", "parts": {"subject": "s", "html": "<p>\x00</p>"}})
    assert r.status_code == 422 and r.json()["field"] == "parts.html", r.text
    r = await api.post("/v1/templates", headers=auth(api.admin_key), json={"name": "a\x00b", "parts": {"subject": "s"}})
    assert r.status_code == 422 and r.json()["field"] == "name", r.text
    assert await conn.fetchval("SELECT count(*) FROM templates") == 0
