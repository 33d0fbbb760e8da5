"""``/v1/webhooks`` and ``engine webhooks``: endpoint management against a real engine and Postgres.

Every check of an input (URL, event types, streams, batching) lives in
:class:`engine.webhooks.endpoints.Endpoints`, so the API and the CLI answer alike; these
tests go through both front doors and look at the result through the other one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.cli import main
from engine.events.public import PUBLIC_TYPES
from tests.webhook_receiver import Stack, toml_section, webhook_receiver, webhook_stack  # noqa: F401

URL = "https://93.184.215.14/hooks"  # a public literal: creation needs no DNS


async def keyed(st: Stack, *scopes: str) -> httpx.AsyncClient:
    key, _ = await st.eng.apikeys.create("-".join(scopes) or "none", list(scopes))
    return httpx.AsyncClient(base_url=str(st.http.base_url), headers={"Authorization": f"Bearer {key}"})


async def test_create_minimal_then_narrowed_and_every_field_is_there(webhook_stack) -> None:
    st = await webhook_stack(allow_private_targets=False)
    r = await st.http.post("/v1/webhooks", json={"url": URL})
    assert r.status_code == 201, r.text
    ep = r.json()
    assert ep["secret"].startswith("whsec_") and len(base64.b64decode(ep["secret"][6:])) >= 24
    uuid.UUID(ep["id"])
    assert ep["url"] == URL and ep["events"] is None and ep["streams"] is None and ep["enabled"] is True
    assert ep["disabled_reason"] is None and ep["description"] == "" and ep["secret_rotation_ends_at"] is None
    assert ep["batch"] == {"max_events": 1, "max_wait_ms": 1000}
    assert ep["created_at"] and ep["updated_at"]

    r = await st.http.post("/v1/webhooks", json={
        "url": URL, "events": ["email.delivered", "email.bounced"], "streams": ["transactional"],
        "description": "crm", "batch": {"max_events": 50, "max_wait_ms": 200},
    })
    assert r.status_code == 201, r.text
    narrow = r.json()
    assert narrow["events"] == ["email.bounced", "email.delivered"] and narrow["streams"] == ["transactional"]
    assert narrow["batch"] == {"max_events": 50, "max_wait_ms": 200} and narrow["description"] == "crm"
    assert narrow["secret"] != ep["secret"]

    every = sorted(PUBLIC_TYPES.values())
    r = await st.http.post("/v1/webhooks", json={"url": URL, "events": every})
    assert r.status_code == 201 and r.json()["events"] == every


async def test_bad_input_is_422_naming_the_field(webhook_stack) -> None:
    st = await webhook_stack(allow_private_targets=False)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"url": URL, "events": ["email.nope"]}, "events"),
        ({"url": URL, "events": ["delivered"]}, "events"),  # engine names are not public types
        ({"url": URL, "events": []}, "events"),
        ({"url": URL, "streams": ["marketing"]}, "streams"),
        ({"url": URL, "streams": []}, "streams"),
        ({"url": "ftp://93.184.215.14/x"}, "url"),
        ({"url": "javascript:alert(1)"}, "url"),
        ({"url": "not a url"}, "url"),
        ({"url": "https://user:pass@93.184.215.14/hooks"}, "url"),
        ({"url": "https://93.184.215.14/hooks#frag"}, "url"),
        ({"url": "https:///nohost"}, "url"),
        ({"url": URL, "batch": {"max_events": 0}}, "batch.max_events"),
        ({"url": URL, "batch": {"max_events": 1001}}, "batch.max_events"),
        ({"url": URL, "batch": {"max_wait_ms": -1}}, "batch.max_wait_ms"),
        ({"url": URL, "secret": "whsec_mine"}, "secret"),  # unknown fields are refused, not ignored
        ({}, "url"),
    ]
    for body, field in cases:
        r = await st.http.post("/v1/webhooks", json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["field"] == field, (body, r.json())
    assert (await st.http.get("/v1/webhooks")).json() == {"webhooks": []}  # nothing half-made


async def test_list_get_patch_delete(webhook_stack) -> None:
    st = await webhook_stack(allow_private_targets=False)
    a = (await st.http.post("/v1/webhooks", json={"url": URL, "description": "a"})).json()
    b = (await st.http.post("/v1/webhooks", json={"url": URL + "/b", "events": ["email.opened"]})).json()

    listed = (await st.http.get("/v1/webhooks")).json()["webhooks"]
    assert [w["id"] for w in listed] == [a["id"], b["id"]]
    assert all("secret" not in w for w in listed)
    assert a["secret"] not in json.dumps(listed)
    one = (await st.http.get(f"/v1/webhooks/{a['id']}")).json()
    assert "secret" not in one and one["status"]["pending"] == 0 and one["status"]["dead_letters"] == 0

    # PATCH changes only what it is given.
    r = await st.http.patch(f"/v1/webhooks/{b['id']}", json={"description": "opens"})
    assert r.status_code == 200, r.text
    after = r.json()
    assert after["description"] == "opens" and after["events"] == ["email.opened"] and after["url"] == URL + "/b"
    assert after["batch"] == b["batch"] and after["updated_at"] >= b["updated_at"]
    r = await st.http.patch(f"/v1/webhooks/{b['id']}", json={"events": None, "streams": ["bulk"]})
    assert r.json()["events"] is None and r.json()["streams"] == ["bulk"] and r.json()["description"] == "opens"
    r = await st.http.patch(f"/v1/webhooks/{b['id']}", json={"batch": {"max_events": 10, "max_wait_ms": 50}})
    assert r.json()["batch"] == {"max_events": 10, "max_wait_ms": 50} and r.json()["streams"] == ["bulk"]
    for body, field in (({"url": None}, "url"), ({"enabled": None}, "enabled"), ({"events": ["x"]}, "events"),
                        ({"streams": ["nope"]}, "streams"), ({"url": "http://10.0.0.1/"}, "url")):
        r = await st.http.patch(f"/v1/webhooks/{b['id']}", json=body)
        assert r.status_code == 422 and r.json()["field"] == field, (body, r.text)
    assert (await st.http.get(f"/v1/webhooks/{b['id']}")).json()["streams"] == ["bulk"]  # a refused PATCH changed nothing

    # Disabled by a 410 (as the dispatcher records it), then re-enabled: the reason goes away.
    assert await st.eng.svc.webhooks.disable(uuid.UUID(a["id"]), "410 Gone at 2026-01-01T00:00:00+00:00")
    gone = (await st.http.get(f"/v1/webhooks/{a['id']}")).json()
    assert gone["enabled"] is False and gone["disabled_reason"].startswith("410 Gone")
    r = await st.http.patch(f"/v1/webhooks/{a['id']}", json={"enabled": True})
    assert r.json()["enabled"] is True and r.json()["disabled_reason"] is None and r.json()["description"] == "a"
    r = await st.http.patch(f"/v1/webhooks/{a['id']}", json={"enabled": False})
    assert r.json()["enabled"] is False and r.json()["disabled_reason"] is None

    # Rotation: a new secret, shown once; the old one still signs for a while.
    r = await st.http.post(f"/v1/webhooks/{a['id']}/rotate-secret")
    assert r.status_code == 200 and r.json()["secret"].startswith("whsec_") and r.json()["secret"] != a["secret"]
    assert r.json()["secret_rotation_ends_at"]

    assert (await st.http.delete(f"/v1/webhooks/{b['id']}")).status_code == 204
    assert (await st.http.get(f"/v1/webhooks/{b['id']}")).status_code == 404
    assert (await st.http.delete(f"/v1/webhooks/{b['id']}")).status_code == 404
    assert (await st.http.patch(f"/v1/webhooks/{b['id']}", json={"description": "x"})).status_code == 404
    assert (await st.http.post(f"/v1/webhooks/{b['id']}/rotate-secret")).status_code == 404
    assert (await st.http.get(f"/v1/webhooks/{b['id']}/deliveries")).status_code == 404
    assert (await st.http.post(f"/v1/webhooks/{b['id']}/replay", json={"dead_letters": True})).status_code == 404
    assert [w["id"] for w in (await st.http.get("/v1/webhooks")).json()["webhooks"]] == [a["id"]]


async def test_deliveries_and_replay_check_their_input(webhook_stack) -> None:
    st = await webhook_stack(allow_private_targets=False)
    ep = (await st.http.post("/v1/webhooks", json={"url": URL})).json()
    base = f"/v1/webhooks/{ep['id']}"
    r = await st.http.get(f"{base}/deliveries", params={"state": "lost"})
    assert r.status_code == 422 and r.json()["field"] == "state"
    assert (await st.http.get(f"{base}/deliveries", params={"state": "failed"})).json() == {
        "deliveries": [], "next_before": None}
    for body, field in (({}, "body"), ({"event_ids": ["evt_x"]}, "event_ids"), ({"event_ids": ["42abc"]}, "event_ids"),
                        ({"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "until"),
                        ({"dead_letters": True, "extra": 1}, "extra")):
        r = await st.http.post(f"{base}/replay", json=body)
        assert r.status_code == 422 and r.json()["field"] == field, (body, r.text)
    r = await st.http.post(f"{base}/replay", json={"dead_letters": True})
    assert r.status_code == 202 and r.json() == {"queued": 0}


async def test_the_admin_scope_is_required(webhook_stack) -> None:
    st = await webhook_stack(allow_private_targets=False)
    ep = (await st.http.post("/v1/webhooks", json={"url": URL})).json()
    calls = [
        ("POST", "/v1/webhooks", {"url": URL}), ("GET", "/v1/webhooks", None), ("GET", f"/v1/webhooks/{ep['id']}", None),
        ("PATCH", f"/v1/webhooks/{ep['id']}", {"description": "x"}), ("DELETE", f"/v1/webhooks/{ep['id']}", None),
        ("POST", f"/v1/webhooks/{ep['id']}/rotate-secret", None), ("GET", f"/v1/webhooks/{ep['id']}/deliveries", None),
        ("POST", f"/v1/webhooks/{ep['id']}/replay", {"dead_letters": True}),
    ]
    reader, sender = await keyed(st, "read"), await keyed(st, "send")
    async with httpx.AsyncClient(base_url=str(st.http.base_url)) as anon, reader, sender:
        for method, path, body in calls:
            assert (await anon.request(method, path, json=body)).status_code == 401, (method, path)
            for client in (reader, sender):
                r = await client.request(method, path, json=body)
                assert r.status_code == 403, (method, path, r.text)
    got = (await st.http.get(f"/v1/webhooks/{ep['id']}")).json()
    assert got["description"] == "" and len((await st.http.get("/v1/webhooks")).json()["webhooks"]) == 1


# ---- the command line -----------------------------------------------------------------------------


class Cli:
    """``engine ...`` in this process (the real ``engine.cli.main``), on the test's database and home."""

    def __init__(self, capsys: pytest.CaptureFixture[str], config: Path) -> None:
        self.capsys, self.config = capsys, config

    async def __call__(self, *args: str, config: Path | None = None) -> tuple[int, str, str]:
        self.capsys.readouterr()
        rc = await asyncio.to_thread(main, ["--config", str(config or self.config), *args])
        out = self.capsys.readouterr()
        return rc, out.out, out.err

    async def json(self, *args: str) -> Any:
        """``--json`` output: JSON Lines, one object per line (every command the same way)."""
        rc, out, err = await self(*args, "--json")
        assert rc == 0, err
        return [json.loads(line) for line in out.splitlines()]


@pytest.fixture
def cli(capsys, monkeypatch, db_dsn, tmp_path) -> Cli:
    # The engine under test and the CLI share the database and ENGINE_HOME (the key sealing secrets).
    monkeypatch.setenv("DATABASE_URL", db_dsn)
    monkeypatch.setenv("ENGINE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ENGINE_SECRET_KEY", raising=False)
    cfg = tmp_path / "cli.toml"
    cfg.write_text(toml_section("webhooks", {"allow_private_targets": True}))
    return Cli(capsys, cfg)


async def test_cli_add_list_status_replay_rotate_rm(webhook_stack, webhook_receiver, cli, tmp_path) -> None:
    rx = await webhook_receiver()
    st = await webhook_stack()
    (made,) = await cli.json("webhooks", "add", rx.url, "--events", "email.accepted", "email.opened",
                          "--streams", "default", "--description", "crm")
    rx.secrets.append(made["secret"])
    assert made["secret"].startswith("whsec_") and made["events"] == ["email.accepted", "email.opened"]
    assert made["streams"] == ["default"] and made["description"] == "crm"
    eid = made["id"]
    # The API sees what the CLI made, and the other way round.
    assert (await st.http.get(f"/v1/webhooks/{eid}")).json()["events"] == ["email.accepted", "email.opened"]
    api_made = await st.endpoint(rx.url + "/api", events=["email.bounced"])
    listed = await cli.json("webhooks", "list")
    assert [w["id"] for w in listed] == [eid, api_made["id"]]
    assert all("secret" not in w for w in listed) and made["secret"] not in json.dumps(listed)
    rc, out, _ = await cli("webhooks", "list")
    assert rc == 0 and eid in out and "email.accepted,email.opened" in out and "enabled" in out

    # Refusals name what is wrong, as the API's do.
    strict = tmp_path / "strict.toml"
    strict.write_text(toml_section("webhooks", {"allow_private_targets": False}))
    rc, _, err = await cli("webhooks", "add", "http://10.0.0.1/hooks", config=strict)
    assert rc == 1 and "allow_private_targets" in err
    rc, _, err = await cli("webhooks", "add", rx.url, "--events", "email.nope")
    assert rc == 1 and "email.nope" in err
    rc, _, err = await cli("webhooks", "add", rx.url, "--streams", "nope")
    assert rc == 1 and "nope" in err
    rc, _, err = await cli("webhooks", "add", "https://user:pw@example.com/")
    assert rc == 1 and "credentials" in err
    assert len(await cli.json("webhooks", "list")) == 2

    # An event written now; replayed by id from the CLI before any dispatcher fanned it out.
    ids = await st.submit(["ann@example.net"])
    (evt,) = await st.event_ids(ids["ann@example.net"])
    rc, out, err = await cli("webhooks", "replay", eid, "--event", evt)
    assert rc == 0 and "queued 1" in out, err
    (row,) = await cli.json("webhooks", "deliveries", eid)
    assert row["event_id"] == evt and row["replay"] is True and row["state"] == "pending"
    status = {r["id"]: r for r in await cli.json("webhooks", "status")}
    assert status[eid]["pending"] == 1 and status[eid]["failed"] == 0 and status[eid]["url"] == rx.url
    assert status[api_made["id"]]["pending"] == 0
    rc, out, _ = await cli("webhooks", "status", eid)
    assert rc == 0 and eid in out and api_made["id"] not in out

    # A dispatcher now sends both: the replay and the fan-out's own delivery, under one webhook-id.
    await st.start_dispatcher()
    st.clock.catch_up()
    st.wake()
    await rx.wait_for(lambda: rx.accepted_ids() == [evt, evt])
    assert {r.headers["webhook-id"] for r in rx.requests} == {evt} and all(r.verified for r in rx.requests)
    rc, out, _ = await cli("webhooks", "replay", eid, "--dead")
    assert rc == 0 and "queued 0" in out
    rc, out, _ = await cli("webhooks", "replay", eid, "--since", "2000-01-01T00:00:00Z")
    assert rc == 0 and "queued 1" in out  # the one event of a matching type

    rc, out, _ = await cli("webhooks", "disable", api_made["id"])
    assert rc == 0 and (await st.http.get(f"/v1/webhooks/{api_made['id']}")).json()["enabled"] is False
    rc, out, _ = await cli("webhooks", "enable", api_made["id"])
    assert rc == 0 and (await st.http.get(f"/v1/webhooks/{api_made['id']}")).json()["enabled"] is True
    rc, out, _ = await cli("webhooks", "rotate", api_made["id"])
    assert rc == 0 and "whsec_" in out and api_made["secret"] not in out

    rc, out, _ = await cli("webhooks", "rm", eid)
    assert rc == 0 and f"deleted webhook {eid}" in out
    assert (await st.http.get(f"/v1/webhooks/{eid}")).status_code == 404
    rc, _, err = await cli("webhooks", "rm", eid)
    assert rc == 1 and "no webhook endpoint" in err
    rc, _, err = await cli("webhooks", "replay", eid, "--dead")
    assert rc == 1 and "no webhook endpoint" in err
    assert [w["id"] for w in await cli.json("webhooks", "list")] == [api_made["id"]]
