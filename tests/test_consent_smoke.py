"""Consent first light: bulk mail needs granted marketing consent; a revocation stops queued mail;
contact ids reach events; erasure leaves the address nowhere but the hashed do-not-mail list."""

from __future__ import annotations

import asyncio

import httpx

from tests.receivers import smtp_receiver, tls_ca  # noqa: F401


async def _all_text(pool, needle: str) -> list[str]:
    """Every (table.column) whose text form contains ``needle`` (the erasure check)."""
    cols = await pool.fetch(
        "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = 'public' "
        "AND data_type IN ('text', 'jsonb', 'bytea', 'ARRAY', 'character varying')"
    )
    found = []
    for c in cols:
        t, col = c["table_name"], c["column_name"]
        if c["data_type"] == "bytea":  # bytea::text is hex: search the bytes themselves
            where = f'position(convert_to($1, \'UTF8\') IN "{col}") > 0'
        else:
            where = f'position($1 IN lower("{col}"::text)) > 0'
        n = await pool.fetchval(f'SELECT count(*) FROM "{t}" WHERE {where}', needle)
        if n:
            found.append(f"{t}.{col}")
    return found


async def test_consent_enforced_at_accept_and_claim_and_erasure(engine_factory, smtp_receiver) -> None:
    mx = smtp_receiver()
    eng = await engine_factory(
        f'[routing.static]\n"example.net" = "{mx.address}:{mx.port}"\n'
        '[delivery]\nflush_interval = "20ms"\npoll_interval = "100ms"\n[webhooks]\nenabled = false\n'
        '[mime]\nlist_unsubscribe_mailto = "unsubscribe@sender.test"\n'
        '[tracking]\ntrack_opens = false\n[[tracking.keys]]\nid = 1\nsecret = "0123456789abcdef0123456789abcdef-test"\n'
    )
    key, _ = await eng.apikeys.create("crm", ["send", "read", "consent", "admin"])
    base = f"http://{eng.http_address[0]}:{eng.http_address[1]}"
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}) as http:
        grant = {"purpose": "marketing", "status": "granted", "legal_basis": "consent", "source": "crm:test",
                 "captured_at": "2026-11-01T10:00:00Z", "policy_version": "2026-03"}
        r = await http.post("/v1/consent", json=[{"address": "Ann@Example.net", **grant}, {"address": "bob@example.net", **grant}])
        assert r.status_code == 200, r.text
        assert [x["outcome"] for x in r.json()["results"]] == ["new", "new"]
        msg = {"from": "news@sender.test", "subject": "Hi", "text": "x", "stream": "bulk",
               "to": [{"email": "ann@example.net", "contact_id": "crm-1", "external": {"segment": "s9"}},
                      {"email": "bob@example.net", "contact_id": "crm-2"},
                      {"email": "cy@example.net", "contact_id": "crm-3"}]}
        r = await http.post("/v1/messages", json=msg)
        assert r.status_code in (200, 201, 202), r.text
        states = {x["email"]: x["state"] for x in r.json()["recipients"]}
        assert states == {"ann@example.net": "queued", "bob@example.net": "queued", "cy@example.net": "suppressed"}
        # Bob revokes while his mail is queued: nothing is sent to him.
        r = await http.post("/v1/consent", json={"address": "bob@example.net", "purpose": "marketing", "status": "revoked",
                                                 "source": "crm:test", "captured_at": "2026-11-02T10:00:00Z"})
        assert r.json()["results"][0]["outcome"] == "changed"
        from engine.deliver.scheduler import DeliveryWorker
        w = DeliveryWorker(eng.settings, eng.pool, owner="w1", dsn=eng.dsn)
        t = asyncio.create_task(w.run())
        try:
            for _ in range(200):
                if mx.messages:
                    break
                await asyncio.sleep(0.05)
        finally:
            w.request_stop()
            await t
        assert [list(m.rcpt_tos) for m in mx.messages] == [["ann@example.net"]]
        reasons = dict(await eng.pool.fetch("SELECT address, reason FROM recipients WHERE reason IS NOT NULL"))
        assert reasons == {"bob@example.net": "consent:marketing", "cy@example.net": "consent:marketing"}
        # Events are readable once every older transaction on the server has ended (other tests' too).
        for _ in range(300):
            page = (await http.get("/v1/events", params={"recipient": "ann@example.net"})).json()
            if any(e["type"] == "email.delivered" for e in page["events"]):
                break
            await asyncio.sleep(0.1)
        assert {e["data"]["contact_id"] for e in page["events"]} == {"crm-1"}
        assert all(e["data"]["external"] == {"segment": "s9"} for e in page["events"])
        contact = (await http.get("/v1/contacts/bob@example.net")).json()
        assert contact["consent"]["marketing"]["status"] == "revoked"
        assert [h["status"] for h in contact["history"]] == ["revoked", "granted"]
        # Erasure: the address is nowhere but in the hashed do-not-mail list, and is refused after.
        r = await http.delete("/v1/contacts/ann@example.net")
        assert r.status_code == 200, r.text
        assert await _all_text(eng.pool, "ann@example.net") == []
        r = await http.post("/v1/messages", json={**msg, "stream": "transactional", "to": ["ann@example.net"]})
        assert r.json()["recipients"][0]["state"] == "suppressed"
