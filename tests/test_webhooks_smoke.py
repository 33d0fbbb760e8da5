"""First light: one API call creates an endpoint; a delivered message reaches it as a signed event."""

from __future__ import annotations

import httpx

from tests.receivers import smtp_receiver, tls_ca  # noqa: F401
from tests.webhook_receiver import webhook_receiver  # noqa: F401


async def test_delivered_mail_reaches_the_endpoint_signed(engine_factory, smtp_receiver, webhook_receiver) -> None:
    mx = smtp_receiver()
    rx = await webhook_receiver()
    eng = await engine_factory(
        f'[webhooks]\nallow_private_targets = true\npoll_interval = "50ms"\n'
        f'[routing.static]\n"example.net" = "{mx.address}:{mx.port}"\n'
        '[delivery]\nflush_interval = "20ms"\npoll_interval = "100ms"\n'
    )
    key, _ = await eng.apikeys.create("admin", ["send", "read", "admin"])
    base = f"http://{eng.http_address[0]}:{eng.http_address[1]}"
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}) as http:
        r = await http.post("/v1/webhooks", json={"url": rx.url})
        assert r.status_code == 201, r.text
        rx.secrets.append(r.json()["secret"])
        r = await http.post("/v1/messages", json={"from": "app@sender.test", "to": ["ann@example.net"], "subject": "Hi", "text": "x"})
        assert r.status_code in (200, 201, 202), r.text
        import asyncio

        from engine.deliver.scheduler import DeliveryWorker
        w = DeliveryWorker(eng.settings, eng.pool, owner="w1", dsn=eng.dsn)
        t = asyncio.create_task(w.run())
        try:
            await rx.wait_for(lambda: any(e["type"] == "email.delivered" for e in rx.accepted), timeout=20)
        finally:
            w.request_stop()
            await t
        types = [e["type"] for e in rx.accepted]
        assert types == ["email.accepted", "email.delivered"], types
        assert all(r.verified for r in rx.requests)
        d = rx.accepted[1]["data"]
        assert d["address"] == "ann@example.net" and d["smtp_code"] == 250 and d["attempt"] == 1
        assert rx.requests[1].headers["webhook-id"] == rx.accepted[1]["id"]
        page = (await http.get("/v1/events")).json()
        assert [e["type"] for e in page["events"]] == types
