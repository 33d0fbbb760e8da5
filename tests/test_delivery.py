"""Delivery end to end: real outbox, real worker, real SMTP receivers on 127.0.0.x, real DNS."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from engine.accept import Acceptor
from engine.apikeys import ApiKey
from engine.config import Settings, load_settings
from engine.deliver.scheduler import DeliveryWorker
from engine.outbox import Outbox
from engine.submit.models import MessageIn
from tests.receivers import Behaviour, Receiver, refusing_endpoint, smtp_receiver, tls_ca  # noqa: F401

KEY = ApiKey(1, "test", frozenset({"send"}))
FAST_DELIVERY = (
    "retry_schedule = [\"0.3s\"]\nretry_jitter = 0\nflush_interval = \"20ms\"\npoll_interval = \"100ms\"\n"
    "suspend_on_connection_failure = \"0.5s\"\n"
)
FAST_SMTP = "[delivery.smtp]\nconnect_timeout = 2\nbanner_timeout = 3\ndata_dot_timeout = 3\nidle_timeout = 5\n"


def routes(**domains: Receiver) -> str:
    lines = [f'"{d.replace("_", ".")}" = "{rx.address}:{rx.port}"' for d, rx in domains.items()]
    return "[routing.static]\n" + "\n".join(lines) + "\n"


class Harness:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, dsn: str) -> None:
        self.settings, self.pool, self.dsn = settings, pool, dsn
        self.acceptor = Acceptor(settings, Outbox(pool, settings.queue.max_age))
        self.workers: list[tuple[DeliveryWorker, asyncio.Task[None]]] = []

    async def submit(self, to: list[str], **fields: Any) -> str:
        item = MessageIn.model_validate({"from": "app@sender.test", "to": to, "subject": "Hi", "text": "Hello", **fields})
        msg = self.acceptor.build_http_message(item, KEY)
        await self.acceptor.commit([msg])
        return str(msg.id)

    async def submit_smtp(self, mail_from: str, to: list[str], data: bytes) -> str:
        msg = self.acceptor.build_smtp_message(mail_from, to, data, None)
        await self.acceptor.commit([msg])
        return str(msg.id)

    def start_worker(self, owner: str = "w1") -> DeliveryWorker:
        w = DeliveryWorker(self.settings, self.pool, owner=owner, dsn=self.dsn)
        self.workers.append((w, asyncio.create_task(w.run())))
        return w

    async def stop(self) -> None:
        for w, t in self.workers:
            w.request_stop()
        for w, t in self.workers:
            await asyncio.wait_for(t, 30)
        self.workers.clear()

    async def states(self) -> dict[str, str]:
        return {r["address"]: r["state"] for r in await self.pool.fetch("SELECT address, state FROM recipients")}

    async def wait(self, predicate: Callable[[dict[str, str]], bool], timeout: float = 20) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            st = await self.states()
            if predicate(st) or time.monotonic() > deadline:
                return st
            await asyncio.sleep(0.05)


@pytest.fixture
async def harness(db_dsn: str, tmp_path: Path) -> AsyncIterator[Callable[[str], Any]]:
    made: list[Harness] = []
    pools: list[asyncpg.Pool] = []

    async def make(toml: str, delivery: str = "") -> Harness:
        cfg = tmp_path / f"d{len(made)}.toml"
        cfg.write_text("[delivery]\n" + FAST_DELIVERY + delivery + FAST_SMTP + toml)
        settings = load_settings(cfg, env={"DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home")})
        from engine.db.pool import create_pool

        pool = await create_pool(db_dsn, settings)
        pools.append(pool)
        h = Harness(settings, pool, db_dsn)
        made.append(h)
        return h

    yield make
    for h in made:
        await h.stop()
    for p in pools:
        await p.close()


def final(st: dict[str, str]) -> bool:
    return all(s in ("delivered", "bounced", "expired") for s in st.values())


async def test_delivers_with_connection_reuse_and_records_attempts(harness, smtp_receiver) -> None:
    rx = smtp_receiver()
    h = await harness(routes(example_net=rx))
    ids = [await h.submit([f"u{i}@example.net", f"v{i}@example.net"]) for i in range(20)]
    h.start_worker()
    st = await h.wait(final)
    assert set(st.values()) == {"delivered"} and len(st) == 40
    assert len(rx.messages) == 20  # one transaction per message carrying both recipients
    assert all(len(m.rcpt_tos) == 2 for m in rx.messages)
    assert rx.sessions < 20  # connections were reused
    row = await h.pool.fetchrow("SELECT attempts, last_code, last_reply FROM recipients LIMIT 1")
    assert row["attempts"] == 1 and row["last_code"] == 250 and row["last_reply"].startswith("250")
    n = await h.pool.fetchval("SELECT count(*) FROM attempts WHERE outcome = 'delivered' AND mx IS NOT NULL")
    assert n == 40
    assert ids


async def test_per_recipient_results_and_bounce(harness, smtp_receiver) -> None:
    rx = smtp_receiver(Behaviour(reject_users={"gone@example.net"}))
    h = await harness(routes(example_net=rx))
    await h.submit(["ok1@example.net", "gone@example.net", "ok2@example.net"])
    h.start_worker()
    st = await h.wait(final)
    assert st == {"ok1@example.net": "delivered", "gone@example.net": "bounced", "ok2@example.net": "delivered"}
    row = await h.pool.fetchrow("SELECT last_code, last_status, last_reply, attempts FROM recipients WHERE address = 'gone@example.net'")
    assert row["last_code"] == 550 and row["last_status"] == "5.1.1" and "does not exist" in row["last_reply"]
    assert rx.messages[0].rcpt_tos == ("ok1@example.net", "ok2@example.net")


async def test_greylisting_defers_then_delivers(harness, smtp_receiver) -> None:
    rx = smtp_receiver(Behaviour(greylist=True))
    h = await harness(routes(example_net=rx))
    await h.submit(["a@example.net"])
    h.start_worker()
    st = await h.wait(final)
    assert st == {"a@example.net": "delivered"}
    outcomes = [r["outcome"] for r in await h.pool.fetch("SELECT outcome FROM attempts ORDER BY id")]
    assert outcomes == ["deferred", "delivered"]
    first = await h.pool.fetchrow("SELECT code, status, reply FROM attempts ORDER BY id LIMIT 1")
    assert first["code"] == 451 and first["status"] == "4.7.1"


async def test_dropped_connection_mid_data_is_retried(harness, smtp_receiver) -> None:
    rx = smtp_receiver(Behaviour(drop_data=1))
    h = await harness(routes(example_net=rx))
    await h.submit(["a@example.net"])
    h.start_worker()
    st = await h.wait(final)
    assert st == {"a@example.net": "delivered"}
    assert rx.dropped == 1 and len(rx.messages) == 1
    reply = await h.pool.fetchval("SELECT reply FROM attempts ORDER BY id LIMIT 1")
    assert "lost" in reply or "closed" in reply or "dropped" in reply, reply


async def test_421_destination_does_not_block_others(harness, smtp_receiver) -> None:
    bad = smtp_receiver(Behaviour(connect_reply="421 4.7.0 Try again later, closing connection"))
    # A destination that hangs in the banner for longer than the whole test also must not matter.
    slow = smtp_receiver(Behaviour(delay={"greeting": 60}))
    good = smtp_receiver()
    h = await harness(routes(bad_test=bad, slow_test=slow, good_test=good))
    for i in range(30):
        await h.submit([f"x{i}@bad.test"])
        await h.submit([f"y{i}@slow.test"])
        await h.submit([f"z{i}@good.test"])
    h.start_worker()
    st = await h.wait(lambda s: all(v == "delivered" for k, v in s.items() if k.endswith("@good.test")))
    assert all(v == "delivered" for k, v in st.items() if k.endswith("@good.test"))
    assert len(good.messages) == 30
    # The slow site is still hanging in its banner; the 421 site is deferred, not bounced.
    assert not slow.messages
    assert all(v in ("deferred", "queued", "leased") for k, v in st.items() if k.endswith("@bad.test"))
    # The 421 site was tried a bounded number of times (suspension), not once per message.
    assert bad.sessions <= 10


async def test_expiry_bounces_and_sends_one_dsn_to_relay_sender(harness, smtp_receiver) -> None:
    down = smtp_receiver(Behaviour(connect_reply="421 4.3.2 Service shutting down"))
    sender_mx = smtp_receiver()
    h = await harness(routes(gone_test=down, sender_test=sender_mx) + "[queue]\nmax_age = \"1s\"\n")
    raw = b"From: alice@sender.test\r\nTo: bob@gone.test\r\nSubject: hello\r\nMessage-ID: <m1@sender.test>\r\n\r\nhi\r\n"
    await h.submit_smtp("alice@sender.test", ["bob@gone.test"], raw)
    await h.submit_smtp("", ["carol@gone.test"], raw)  # null sender: never a DSN
    h.start_worker()
    st = await h.wait(lambda s: s.get("bob@gone.test") == "expired" and s.get("carol@gone.test") == "expired"
                      and s.get("alice@sender.test") == "delivered")
    assert st["bob@gone.test"] == "expired" and st["carol@gone.test"] == "expired"
    assert st.get("alice@sender.test") == "delivered", st
    assert len(sender_mx.messages) == 1
    dsn = sender_mx.messages[0]
    assert dsn.mail_from in ("", "<>") and dsn.rcpt_tos == ("alice@sender.test",)
    assert b"multipart/report" in dsn.data and b"Final-Recipient: rfc822; bob@gone.test" in dsn.data
    assert b"Subject: hello" in dsn.data  # the original headers are quoted
    from engine.feedback import parse_report

    report = parse_report(dsn.data)
    assert report.kind == "dsn" and report.recipients[0].recipient == "bob@gone.test"


async def test_mx_from_dns_with_preference_and_fallback(harness, smtp_receiver, dns_server, refusing_endpoint) -> None:
    good = smtp_receiver()
    dead_addr, _ = refusing_endpoint()
    # Both MX hosts share the receiver's port (routing.mx_port); the preferred one refuses.
    zone = {
        "example.org": {"MX": ["10 mx1.example.org.", "20 mx2.example.org."]},
        "mx1.example.org": {"A": dead_addr},
        "mx2.example.org": {"A": good.address},
        "nullmx.test": {"MX": ["0 ."]},
    }
    host, port = dns_server(zone)
    h = await harness(f'[routing]\nnameservers = ["{host}:{port}"]\nmx_port = {good.port}\ntimeout = "2s"\n')
    await h.submit(["a@example.org"])
    await h.submit(["b@nullmx.test"])
    await h.submit(["c@nxdomain.test"])
    h.start_worker()
    st = await h.wait(final)
    assert st == {"a@example.org": "delivered", "b@nullmx.test": "bounced", "c@nxdomain.test": "bounced"}
    assert good.messages[0].rcpt_tos == ("a@example.org",)
    reply = await h.pool.fetchval("SELECT last_reply FROM recipients WHERE address = 'b@nullmx.test'")
    assert "null MX" in reply


async def test_transactional_stream_goes_first(harness, smtp_receiver) -> None:
    rx = smtp_receiver()
    h = await harness(routes(example_net=rx), delivery="claim_batch = 5\ndestination_concurrency = 1\n")
    for i in range(10):  # the default stream (priority 5) behind transactional (priority 0)
        await h.submit([f"bulk{i}@example.net"], stream="default")
    for i in range(5):
        await h.submit([f"tx{i}@example.net"], stream="transactional")
    h.start_worker()
    await h.wait(final)
    order = [m.rcpt_tos[0] for m in rx.messages]
    assert all(a.startswith("tx") for a in order[:5]), order


async def test_sigterm_style_stop_releases_unstarted(harness, smtp_receiver) -> None:
    slow = smtp_receiver(Behaviour(delay={"data": 1.0}))
    h = await harness(routes(example_net=slow) + "[server]\nshutdown_timeout = \"5s\"\n", delivery="destination_concurrency = 1\n")
    for i in range(10):
        await h.submit([f"u{i}@example.net"])
    w = h.start_worker()
    await h.wait(lambda s: "leased" in s.values())
    await asyncio.sleep(0.3)
    await h.stop()
    st = await h.states()
    assert "leased" not in st.values()  # every lease is settled or handed back
    assert list(st.values()).count("delivered") == len(slow.messages) >= 1
    assert set(st.values()) <= {"delivered", "queued"}
    assert w.inflight >= 0


async def test_rows_leased_by_a_lost_claim_reply_run_out_and_are_delivered(harness, smtp_receiver) -> None:
    # A claim whose COMMIT reached the server but whose reply was lost leases rows to the worker's
    # name that the worker never learns of. Its heartbeat must renew only the rows it knows, so
    # these run out and are reclaimed (then sent), while the rows it is busy with keep their lease.
    rx = smtp_receiver(Behaviour(delay={"data": 0.2}))
    h = await harness(routes(example_net=rx) + '[queue]\nlease_duration = "1s"\n', delivery="destination_concurrency = 1\n")
    for i in range(3):
        await h.submit([f"lost{i}@example.net"])
    lost = await Outbox(h.pool, h.settings.queue.max_age).claim("w1", 10, 1.0)  # the reply w1 never saw
    assert len(lost) == 3
    for i in range(15):
        await h.submit([f"u{i}@example.net"])
    h.start_worker("w1")
    # The busy worker needs ~3 s (three leases) for its own 15 rows; the lost ones must not wait for ever.
    st = await h.wait(lambda s: all(s[f"lost{i}@example.net"] != "leased" for i in range(3)), timeout=30)
    assert all(st[f"lost{i}@example.net"] != "leased" for i in range(3)), st
    st = await h.wait(final, timeout=60)
    assert set(st.values()) == {"delivered"}, st
    await asyncio.sleep(0.5)  # a lapsed lease of a held row would be reclaimed and sent twice meanwhile
    await h.stop()
    sent = [m.rcpt_tos[0] for m in rx.messages]
    assert sorted(sent) == sorted(st) and len(sent) == len(set(sent)) == 18


async def test_message_status_shows_each_attempt(harness, smtp_receiver, engine_factory) -> None:
    import httpx

    rx = smtp_receiver(Behaviour(greylist=True))
    h = await harness(routes(example_net=rx))
    mid = await h.submit(["a@example.net"])
    h.start_worker()
    await h.wait(final)
    eng = await engine_factory()
    key, _ = await eng.apikeys.create("r", ["read"])
    host, port = eng.http_address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as c:
        body = (await c.get(f"/v1/messages/{mid}", headers={"Authorization": f"Bearer {key}"})).json()
    rcpt = body["recipients"][0]
    assert rcpt["state"] == "delivered" and rcpt["attempts"] == 2
    assert [a["outcome"] for a in rcpt["history"]] == ["deferred", "delivered"]
    assert rcpt["history"][0]["code"] == 451 and "Greylisted" in rcpt["history"][0]["reply"]
    assert rcpt["history"][1]["mx"]


async def test_leases_of_a_busy_worker_do_not_lapse(harness, smtp_receiver) -> None:
    # 30 messages through one connection at ~0.1 s each take ~3 s: three times the lease. The
    # worker's heartbeat keeps its leases; without it, its own reclaim would resend them.
    rx = smtp_receiver(Behaviour(delay={"data": 0.1}))
    h = await harness(routes(example_net=rx) + '[queue]\nlease_duration = "1s"\n', delivery="destination_concurrency = 1\n")
    for i in range(30):
        await h.submit([f"u{i}@example.net"])
    h.start_worker()
    st = await h.wait(final, timeout=30)
    assert set(st.values()) == {"delivered"}
    await asyncio.sleep(0.5)  # a lapsed lease would be re-claimed and sent again meanwhile
    await h.stop()
    sent = [m.rcpt_tos[0] for m in rx.messages]
    assert len(sent) == len(set(sent)) == 30
