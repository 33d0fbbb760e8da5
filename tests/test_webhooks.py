"""The webhook dispatcher with real parts: engine, Postgres, aiohttp receivers, aiosmtpd MX.

Every test runs a real :class:`engine.webhooks.dispatcher.Dispatcher` as a task over its own
pool, on a :class:`tests.webhook_receiver.FakeClock` that only the test moves: a retry is due
exactly when the schedule says, and nothing is retried before the clock gets there. Events
come from the real writers (the acceptor's ``accepted``, tracking's ``opened``, the delivery
worker's ``delivered``). Faults come from the receivers: 500, 429/503 + Retry-After, 410, a
redirect, a hang past the timeout, a refused connection, a dispatcher killed with SIGKILL.

"Not before" is checked by state, not by waiting: a canary event of another recipient is
claimed by the same lane worker in the same round as anything due; once the canary is
delivered, a retry that had been due would have been sent too.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from engine.deliver.scheduler import DeliveryWorker
from engine.webhooks.dispatcher import SystemClock
from tests.receivers import smtp_receiver, tls_ca  # noqa: F401
from tests.webhook_receiver import Reply, Stack, toml_section, verify, webhook_receiver, webhook_stack  # noqa: F401


def at(text: str | None) -> datetime:
    assert text is not None
    return datetime.fromisoformat(text)


def address_of(events: list[dict[str, Any]]) -> str:
    return str(events[0]["data"]["address"])


async def started(st: Stack, rx: Any, **body: Any) -> dict[str, Any]:
    """An endpoint for ``rx`` (whose secret the receiver verifies with) and a dispatcher running."""
    ep = await st.endpoint(rx.url, **body)
    rx.secrets.append(ep["secret"])
    if not st.dispatchers:
        await st.start_dispatcher()
    return ep


async def canary_delivered(st: Stack, ep: dict[str, Any], name: str) -> None:
    """An event of a recipient the receiver accepts: once delivered, the lane has looked at the clock's now."""
    rid = (await st.submit([f"{name}@example.net"]))[f"{name}@example.net"]
    (evt,) = await st.event_ids(rid)
    await st.wait_delivery(ep["id"], evt, lambda d: d["state"] == "delivered")


# ---- the happy path -------------------------------------------------------------------------------


async def test_a_delivery_to_the_mx_reaches_the_endpoint_as_a_signed_email_delivered(
    webhook_stack, webhook_receiver, smtp_receiver,
) -> None:
    mx = smtp_receiver()
    rx = await webhook_receiver()
    st = await webhook_stack(
        extra=f'[routing.static]\n"example.net" = "{mx.address}:{mx.port}"\n'
        '[delivery]\nflush_interval = "20ms"\npoll_interval = "100ms"\n'
    )
    ep = await started(st, rx, events=["email.delivered"])
    ids = await st.submit(["ann@example.net"], metadata={"order": 42})
    worker = DeliveryWorker(st.eng.settings, st.pool, owner="w1", dsn=st.dsn)
    task = asyncio.create_task(worker.run())
    try:
        await rx.wait_for(lambda: bool(rx.accepted), timeout=30)
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
    assert len(mx.messages) == 1

    (req,) = rx.requests  # the endpoint asked for deliveries only: no email.accepted
    (event,) = req.events
    delivered = await st.pool.fetchval("SELECT id FROM events WHERE type = 'delivered'")
    assert event["id"] == f"evt_{delivered}" == req.headers["webhook-id"]
    assert req.verified  # the receiver's own Standard Webhooks code, with the secret shown at creation
    assert not verify(ep["secret"], req.headers, req.body + b" ")  # and it can say no
    assert event["type"] == "email.delivered"
    data = event["data"]
    msg_id = await st.pool.fetchval("SELECT message_id FROM recipients WHERE id = $1", ids["ann@example.net"])
    assert data["address"] == "ann@example.net" and data["recipient_id"] == ids["ann@example.net"]
    assert data["message_id"] == str(msg_id) and data["stream"] == "default" and data["metadata"] == {"order": 42}
    assert data["smtp_code"] == 250 and data["attempt"] == 1

    d = await st.wait_delivery(ep["id"], event["id"], lambda d: d["state"] == "delivered")
    assert d["attempts"] == 1 and d["last_status"] == 200
    # The webhook and GET /v1/events say the same thing about the event.
    page = (await st.http.get("/v1/events", params={"type": "email.delivered"})).json()
    assert page["events"] == [event]


# ---- retries ------------------------------------------------------------------------------------


async def test_retries_follow_the_schedule_on_the_clock_and_never_before_it(webhook_stack, webhook_receiver) -> None:
    schedule = [10, 60, 300]
    rx = await webhook_receiver()
    rx.respond = lambda evs: Reply(500) if address_of(evs) == "bad@example.net" else Reply()
    st = await webhook_stack(retry_schedule=["10s", "1m", "5m"], breaker_failures=100)
    ep = await started(st, rx)
    rid = (await st.submit(["bad@example.net"]))["bad@example.net"]
    (evt,) = await st.event_ids(rid)
    failed_at = st.clock.now()
    for i, delay in enumerate(schedule):
        d = await st.wait_delivery(ep["id"], evt, lambda d, n=i + 1: d["attempts"] == n and d["state"] in ("pending", "failed"))
        assert d["state"] == "pending" and d["last_status"] == 500 and d["last_error"] == "HTTP 500"
        assert at(d["next_attempt_at"]) == failed_at + timedelta(seconds=delay)
        assert len(rx.tried(evt)) == i + 1
        # One second before it is due, the lane sends a canary but not the retry.
        st.advance(delay - 1)
        await canary_delivered(st, ep, f"canary{i}")
        assert len(rx.tried(evt)) == i + 1
        assert (await st.delivery(ep["id"], evt))["attempts"] == i + 1  # type: ignore[index]
        failed_at = st.advance(1)
    # The last retry failed too: a dead letter, never dropped.
    d = await st.wait_delivery(ep["id"], evt, lambda d: d["state"] == "failed")
    assert d["attempts"] == len(schedule) + 1 and d["next_attempt_at"] is None
    tries = rx.tried(evt)
    assert len(tries) == len(schedule) + 1
    assert {r.headers["webhook-id"] for r in tries} == {evt}  # the same id on every retry
    assert all(r.verified for r in rx.arrivals)


async def test_the_default_schedule_starts_at_5s_then_5m(webhook_stack, webhook_receiver) -> None:
    """No retry_schedule in the config: the documented default (5s, 5m, ...) applies."""
    rx = await webhook_receiver()
    rx.respond = lambda evs: Reply(500)
    st = await webhook_stack()
    ep = await started(st, rx)
    evt = (await st.event_ids((await st.submit(["a@example.net"]))["a@example.net"]))[0]
    t0 = st.clock.now()
    d = await st.wait_delivery(ep["id"], evt, lambda d: d["attempts"] == 1 and d["state"] == "pending")
    assert at(d["next_attempt_at"]) == t0 + timedelta(seconds=5)
    t1 = st.advance(5)
    d = await st.wait_delivery(ep["id"], evt, lambda d: d["attempts"] == 2 and d["state"] == "pending")
    assert at(d["next_attempt_at"]) == t1 + timedelta(minutes=5)


async def test_retry_after_on_429_and_503_wins_over_the_schedule(webhook_stack, webhook_receiver) -> None:
    replies = {
        "r429@example.net": Reply(429, {"Retry-After": "120"}),
        "r503@example.net": Reply(503, {"Retry-After": "30"}),
        "huge@example.net": Reply(429, {"Retry-After": "999999"}),  # capped by max_retry_after
        "plain503@example.net": Reply(503),  # no Retry-After: the schedule
        "r500@example.net": Reply(500, {"Retry-After": "7"}),  # only 429/503 are honoured
    }
    rx = await webhook_receiver()
    rx.respond = lambda evs: replies[address_of(evs)]
    st = await webhook_stack(retry_schedule=["10s", "1m"], max_retry_after="1h", breaker_failures=100)
    ep = await started(st, rx)
    ids = await st.submit(list(replies))
    evts = {a: (await st.event_ids(rid))[0] for a, rid in ids.items()}
    t0 = st.clock.now()
    expected = {"r429@example.net": 120, "r503@example.net": 30, "huge@example.net": 3600,
                "plain503@example.net": 10, "r500@example.net": 10}
    for address, delay in expected.items():
        d = await st.wait_delivery(ep["id"], evts[address], lambda d: d["attempts"] == 1 and d["state"] == "pending")
        assert at(d["next_attempt_at"]) == t0 + timedelta(seconds=delay), address
        assert d["last_status"] == replies[address].status

    # At +30 the 503 goes again (and its Retry-After says 30 more); the 429 waits for +120.
    replies["r503@example.net"] = Reply()
    st.advance(30)
    await st.wait_delivery(ep["id"], evts["r503@example.net"], lambda d: d["state"] == "delivered")
    assert len(rx.tried(evts["r429@example.net"])) == 1
    replies["r429@example.net"] = Reply()
    st.advance(90)
    await st.wait_delivery(ep["id"], evts["r429@example.net"], lambda d: d["state"] == "delivered")
    assert len(rx.tried(evts["huge@example.net"])) == 1


async def test_410_disables_the_endpoint_with_a_reason_and_nothing_more_is_sent(webhook_stack, webhook_receiver) -> None:
    gone = await webhook_receiver()
    gone.respond = lambda evs: Reply(410)
    other = await webhook_receiver()
    st = await webhook_stack()
    ep = await started(st, gone)
    watcher = await started(st, other)  # proves the dispatcher kept working meanwhile
    first = (await st.event_ids((await st.submit(["a@example.net"]))["a@example.net"]))[0]

    async def disabled() -> dict[str, Any] | None:
        body = (await st.http.get(f"/v1/webhooks/{ep['id']}")).json()
        return body if body["enabled"] is False else None

    body = await st.until(disabled, what="410 disables the endpoint")
    assert "410" in body["disabled_reason"]
    # Not the event's fault: the delivery waits, untried, for a re-enable.
    d = await st.wait_delivery(ep["id"], first, lambda d: d["state"] != "sending")
    assert d["state"] == "pending" and d["attempts"] == 0 and d["last_status"] == 410

    later = (await st.event_ids((await st.submit(["b@example.net"]))["b@example.net"]))[0]
    await st.wait_delivery(watcher["id"], later, lambda d: d["state"] == "delivered")
    await st.wait_delivery(watcher["id"], first, lambda d: d["state"] == "delivered")
    assert {e["id"] for r in gone.arrivals for e in r.events} == {first}  # nothing new after the 410

    # Re-enabled (the receiver is back): the reason is cleared and the waiting delivery goes out.
    gone.respond = lambda evs: Reply()
    r = await st.http.patch(f"/v1/webhooks/{ep['id']}", json={"enabled": True})
    assert r.status_code == 200 and r.json()["enabled"] is True and r.json()["disabled_reason"] is None
    await st.wait_delivery(ep["id"], first, lambda d: d["state"] == "delivered")
    assert gone.accepted_ids() == [first]


async def test_a_redirect_is_a_failure_and_is_not_followed(webhook_stack, webhook_receiver) -> None:
    rx = await webhook_receiver()
    reply = Reply(302, {"Location": rx.url.replace("/hooks", "/followed")})
    rx.respond = lambda evs: reply
    st = await webhook_stack(retry_schedule=["10s"])
    ep = await started(st, rx)
    evt = (await st.event_ids((await st.submit(["a@example.net"]))["a@example.net"]))[0]
    t0 = st.clock.now()
    d = await st.wait_delivery(ep["id"], evt, lambda d: d["attempts"] == 1 and d["state"] == "pending")
    assert d["last_status"] == 302 and "redirect" in d["last_error"]
    assert at(d["next_attempt_at"]) == t0 + timedelta(seconds=10)
    assert [r.path for r in rx.arrivals] == ["/hooks"]  # the Location was never asked for

    reply = Reply()
    st.advance(10)
    await st.wait_delivery(ep["id"], evt, lambda d: d["state"] == "delivered")
    assert [r.path for r in rx.arrivals] == ["/hooks", "/hooks"] and rx.accepted_ids() == [evt]


async def test_a_receiver_that_hangs_past_the_timeout_fails_and_is_retried(webhook_stack, webhook_receiver) -> None:
    rx = await webhook_receiver()
    reply = Reply(200, hang=30)  # answers 200, but long after the dispatcher stopped waiting
    rx.respond = lambda evs: reply
    st = await webhook_stack(timeout="1s", retry_schedule=["10s"])
    ep = await started(st, rx)
    evt = (await st.event_ids((await st.submit(["a@example.net"]))["a@example.net"]))[0]
    t0 = st.clock.now()
    d = await st.wait_delivery(ep["id"], evt, lambda d: d["attempts"] == 1 and d["state"] == "pending")
    assert d["last_status"] is None and "timed out" in d["last_error"]
    assert at(d["next_attempt_at"]) == t0 + timedelta(seconds=10)
    assert not rx.requests and len(rx.arrivals) == 1  # it arrived; no answer was waited for

    reply = Reply()
    st.advance(10)
    await st.wait_delivery(ep["id"], evt, lambda d: d["state"] == "delivered" and d["attempts"] == 2)
    assert rx.accepted_ids() == [evt]


# ---- dead letters and replay ----------------------------------------------------------------------


async def test_exhausted_retries_are_dead_letters_and_replay_sends_them_under_their_ids(
    webhook_stack, webhook_receiver, tmp_path, db_dsn,
) -> None:
    rx = await webhook_receiver()
    reply = Reply(500)
    rx.respond = lambda evs: reply
    st = await webhook_stack(retry_schedule=["1s", "2s"], breaker_failures=100)
    ep = await started(st, rx)
    ids = await st.submit(["a@example.net", "b@example.net", "c@example.net"])
    evts = [(await st.event_ids(rid))[0] for rid in ids.values()]
    for n, step in ((1, 1), (2, 2), (3, None)):
        for e in evts:
            await st.wait_delivery(ep["id"], e, lambda d, n=n: d["attempts"] == n and d["state"] in ("pending", "failed"))
        if step:
            st.advance(step)

    dead = await st.deliveries(ep["id"], state="failed")
    assert sorted(d["event_id"] for d in dead) == sorted(evts)
    assert all(d["attempts"] == 3 and d["last_status"] == 500 and d["next_attempt_at"] is None for d in dead)
    assert await st.deliveries(ep["id"], state="pending") == []
    status = (await st.http.get(f"/v1/webhooks/{ep['id']}")).json()["status"]
    assert status["dead_letters"] == 3 and status["pending"] == 0
    (row,) = await st.eng.svc.webhook_deliveries.status(st.clock.now(), None)
    assert row["failed"] == 3 and row["pending"] == 0
    cli = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "engine", "webhooks", "status", "--json"], capture_output=True, text=True,
        timeout=60, env={**os.environ, "DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home")},
    )
    assert cli.returncode == 0, cli.stderr
    (shown,) = [json.loads(line) for line in cli.stdout.splitlines()]
    assert shown["id"] == ep["id"] and shown["failed"] == 3 and shown["url"] == rx.url

    # The receiver is fixed; every dead letter goes again under its original webhook-id.
    reply = Reply()
    r = await st.http.post(f"/v1/webhooks/{ep['id']}/replay", json={"dead_letters": True})
    assert r.status_code == 202 and r.json() == {"queued": 3}
    st.clock.catch_up()  # the API marked them due at (real) now
    st.wake()
    await rx.wait_for(lambda: sorted(rx.accepted_ids()) == sorted(evts))
    assert all(r.headers["webhook-id"] == r.events[0]["id"] for r in rx.requests)
    assert await st.deliveries(ep["id"], state="failed") == []
    await st.until(lambda: _all_delivered(st, ep["id"]), what="replayed dead letters recorded")
    status = (await st.http.get(f"/v1/webhooks/{ep['id']}")).json()["status"]
    assert status["dead_letters"] == 0 and status["delivered_last_hour"] == 3 and status["lag_p95_seconds"] > 0

    # By event id: a new delivery of that event, same webhook-id.
    r = await st.http.post(f"/v1/webhooks/{ep['id']}/replay", json={"event_ids": [evts[1]]})
    assert r.json() == {"queued": 1}
    st.clock.catch_up()
    st.wake()
    await rx.wait_for(lambda: rx.accepted_ids().count(evts[1]) == 2)
    # By time range: every event in [since, until).
    stamps = sorted(e["timestamp"] for e in rx.accepted)
    since, until = at(stamps[0].replace("Z", "+00:00")), at(stamps[-1].replace("Z", "+00:00")) + timedelta(seconds=1)
    r = await st.http.post(
        f"/v1/webhooks/{ep['id']}/replay", json={"since": since.isoformat(), "until": until.isoformat()},
    )
    assert r.json() == {"queued": 3}
    st.clock.catch_up()
    st.wake()
    want = {evts[0]: 2, evts[1]: 3, evts[2]: 2}  # dead-letter replay, + by id, + by range
    await rx.wait_for(lambda: {e: rx.accepted_ids().count(e) for e in evts} == want)
    replays = [d for d in await st.deliveries(ep["id"]) if d["replay"]]
    assert sorted(d["event_id"] for d in replays) == sorted(evts * 2 + [evts[1]])
    assert {r.headers["webhook-id"] for r in rx.requests} == set(evts)
    assert all(r.verified for r in rx.arrivals)


async def _all_delivered(st: Stack, endpoint_id: str) -> bool:
    return all(d["state"] == "delivered" for d in await st.deliveries(endpoint_id))


# ---- order per recipient ----------------------------------------------------------------------------


async def test_one_recipient_failing_holds_only_its_own_later_events(webhook_stack, webhook_receiver) -> None:
    a, b = "ann@example.net", "bob@example.net"
    failing = {b}
    rx = await webhook_receiver()
    rx.respond = lambda evs: Reply(500) if address_of(evs) in failing else Reply()
    st = await webhook_stack(retry_schedule=["1s", "2s", "4s", "8s"])
    ep = await st.endpoint(rx.url)
    rx.secrets.append(ep["secret"])
    # Some events exist before any dispatcher runs: the first claim sees all of them due at once.
    ids = await st.submit([a, b])
    await st.record("opened", ids[a])
    await st.record("opened", ids[b])
    await st.start_dispatcher()
    first_b = (await st.event_ids(ids[b]))[0]
    await st.wait_delivery(ep["id"], first_b, lambda d: d["attempts"] == 1 and d["state"] == "pending")
    # More arrive while B's first event is retrying.
    for i in range(2):
        await st.record("clicked", ids[a], {"link_index": i, "url": "https://x.test/"})
        await st.record("clicked", ids[b], {"link_index": i, "url": "https://x.test/"})
    await st.record("opened", ids[a])
    await st.record("opened", ids[b])
    a_events, b_events = await st.event_ids(ids[a]), await st.event_ids(ids[b])
    assert len(a_events) == len(b_events) == 5 and b_events[0] == first_b

    # A's events all arrive, in stream order, while B's first event fails.
    await rx.wait_for(lambda: len(rx.accepted_ids(a)) == 5)
    assert rx.accepted_ids(a) == a_events
    assert {e["id"] for r in rx.arrivals for e in r.events if e["data"]["address"] == b} == {first_b}
    for later in b_events[1:]:  # held back, never tried
        d = await st.wait_delivery(ep["id"], later, lambda d: True)
        assert d["state"] == "pending" and d["attempts"] == 0

    # B's receiver side recovers: B's events arrive, in order.
    failing.clear()
    st.advance(60)
    await rx.wait_for(lambda: len(rx.accepted_ids(b)) == 5)
    assert rx.accepted_ids(b) == b_events
    assert rx.accepted_ids(a) == a_events  # nothing of A's twice


async def test_a_receiver_down_for_a_while_gets_every_event_later_in_order(webhook_stack, webhook_receiver) -> None:
    rx = await webhook_receiver()
    st = await webhook_stack(retry_schedule=["1s", "5s", "30s"])
    ep = await started(st, rx)
    warm = (await st.event_ids((await st.submit(["warm@example.net"]))["warm@example.net"]))[0]
    await rx.wait_for(lambda: rx.accepted_ids() == [warm])  # a keep-alive connection is open now

    port = rx.port
    await rx.stop()  # connection refused from now on
    people = ["p0@example.net", "p1@example.net", "p2@example.net"]
    ids = await st.submit(people)
    for i in range(2):
        for p in people:
            await st.record("opened", ids[p], {"n": i})
    expected = {p: await st.event_ids(ids[p]) for p in people}
    for p in people:  # each recipient's first event was tried and failed; the later ones wait behind it
        d = await st.wait_delivery(ep["id"], expected[p][0], lambda d: d["attempts"] >= 1 and d["state"] == "pending")
        assert d["last_status"] is None and d["last_error"]
    assert rx.accepted_ids() == [warm]

    await rx.start(port=port)  # back, on the same address
    st.advance(3600)
    await rx.wait_for(lambda: len(rx.accepted_ids()) == 1 + 3 * len(people), timeout=60)
    for p in people:
        assert rx.accepted_ids(p) == expected[p]
    assert all(r.verified for r in rx.requests)


# ---- lanes and batching ---------------------------------------------------------------------------


async def test_a_transactional_event_is_not_stuck_behind_a_slow_default_backlog(webhook_stack, webhook_receiver) -> None:
    gate = asyncio.Event()
    rx = await webhook_receiver()
    rx.respond = lambda evs: Reply() if evs[0]["data"]["stream"] == "transactional" else Reply(gate=gate)
    st = await webhook_stack(timeout="60s", concurrency=2)
    ep = await started(st, rx)
    try:
        backlog = await st.submit([f"m{i}@example.net" for i in range(100)])
        await rx.wait_for(lambda: len(rx.arrivals) >= 2)  # the default lane is busy with the slow receiver
        reset = (await st.submit(["reset@example.net"], stream="transactional"))["reset@example.net"]
        (evt,) = await st.event_ids(reset)
        await rx.wait_for(lambda: rx.accepted_ids() == [evt], timeout=30)
        # It arrived while the default backlog is still there: none of it delivered.
        states = [d["state"] for d in await st.deliveries(ep["id"]) if d["lane"] == "default"]
        assert len(states) == len(backlog) and "delivered" not in states
        assert (await st.delivery(ep["id"], evt))["lane"] == "transactional"  # type: ignore[index]
    finally:
        gate.set()
    await rx.wait_for(lambda: len(rx.accepted) == len(backlog) + 1, timeout=60)


async def test_batches_are_json_arrays_carrying_every_event_once(webhook_stack, webhook_receiver) -> None:
    rx = await webhook_receiver()
    st = await webhook_stack()
    ep = await st.endpoint(rx.url, batch={"max_events": 50, "max_wait_ms": 200})
    rx.secrets.append(ep["secret"])
    await st.start_dispatcher(clock=SystemClock())  # batching waits on real time
    people = [f"u{i}@example.net" for i in range(60)]
    ids = await st.submit(people)
    ids.update(await st.submit([f"v{i}@example.net" for i in range(60)]))
    for p in people[:10]:
        await st.record("opened", ids[p])
    expected = await st.event_ids()
    assert len(expected) == 130
    await rx.wait_for(lambda: len(rx.accepted) >= len(expected), timeout=60)
    got = rx.accepted_ids()
    assert sorted(got) == sorted(expected) and len(got) == len(set(got))  # every event once
    for r in rx.requests:
        assert isinstance(json.loads(r.body), list) and 1 <= len(r.events) <= 50
        assert r.verified and r.headers["webhook-id"].startswith("batch_")
    assert max(len(r.events) for r in rx.requests) > 1
    for p in people[:10]:  # one recipient's events stay in order across batches
        assert rx.accepted_ids(p) == await st.event_ids(ids[p])


# ---- kill -9 --------------------------------------------------------------------------------------


async def test_kill_9_during_dispatch_loses_nothing(webhook_stack, webhook_receiver, tmp_path, db_dsn) -> None:
    rx = await webhook_receiver()
    rx.respond = lambda evs: Reply(hang=0.5)  # slow, under the timeout
    st = await webhook_stack()
    ep = await st.endpoint(rx.url, batch={"max_events": 1, "max_wait_ms": 0})
    rx.secrets.append(ep["secret"])
    people = [f"k{i}@example.net" for i in range(40)]
    await st.submit(people)
    expected = set(await st.event_ids())
    assert len(expected) == len(people)

    cfg = tmp_path / "dispatcher.toml"
    cfg.write_text(toml_section("webhooks", {
        "allow_private_targets": True, "poll_interval": "50ms", "lease": "2s", "timeout": "1s", "concurrency": 4,
    }))
    env = {**os.environ, "DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home")}

    def dispatcher(name: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(
            [sys.executable, "-m", "engine", "--config", str(cfg), "webhooks", "run"], env=env, stdout=log, stderr=log,
        )

    first = dispatcher("first")
    try:
        await rx.wait_for(lambda: len(rx.arrivals) >= 6, timeout=60)
        first.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait, 30)
    finally:
        if first.poll() is None:
            first.kill()
    assert len(set(rx.accepted_ids())) < len(expected), "killed too late to prove anything"

    second = dispatcher("second")
    try:
        await rx.wait_for(lambda: set(rx.accepted_ids()) == expected, timeout=90)
        await st.until(lambda: _all_delivered(st, ep["id"]), timeout=60, what="all recorded delivered")
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(second.wait, 30)
        except subprocess.TimeoutExpired:
            second.kill()
    for r in rx.arrivals:  # duplicates are allowed, and carry the same webhook-id
        assert r.verified and r.headers["webhook-id"] == r.events[0]["id"]
    assert second.returncode == 0, Path(tmp_path / "second.log").read_text()[-2000:]


# ---- safety ---------------------------------------------------------------------------------------


async def test_private_targets_are_refused_at_the_api_and_never_contacted(webhook_stack, webhook_receiver) -> None:
    strict = await webhook_stack(allow_private_targets=False)
    for url in ("http://127.0.0.1:8080/hooks", "https://10.0.0.1/x", "http://169.254.169.254/latest/meta-data",
                "http://[::1]:8080/", "http://localhost:8080/hooks", "http://[::ffff:127.0.0.1]/", "http://0.0.0.0/"):
        r = await strict.http.post("/v1/webhooks", json={"url": url})
        assert r.status_code == 422 and r.json()["field"] == "url", (url, r.text)
        assert "allow_private_targets" in r.json()["error"], url
    public = await strict.endpoint("https://93.184.215.14/hooks")  # a public literal: no DNS needed
    r = await strict.http.patch(f"/v1/webhooks/{public['id']}", json={"url": "http://192.168.1.1/"})
    assert r.status_code == 422 and r.json()["field"] == "url"
    await strict.http.delete(f"/v1/webhooks/{public['id']}")

    # Endpoints made while private targets were allowed are not contacted once they are not.
    rx = await webhook_receiver()
    lax = await webhook_stack()
    literal = await lax.endpoint(rx.url)
    named = await lax.endpoint(rx.url.replace("127.0.0.1", "localhost"))
    await lax.start_dispatcher(settings=strict.eng.settings)
    evt = (await lax.event_ids((await lax.submit(["a@example.net"]))["a@example.net"]))[0]
    d = await lax.wait_delivery(literal["id"], evt, lambda d: d["attempts"] >= 1)
    assert "not a public address" in d["last_error"]
    d = await lax.wait_delivery(named["id"], evt, lambda d: d["attempts"] >= 1)
    assert "non-public" in d["last_error"]
    assert rx.arrivals == []


async def test_after_a_secret_rotation_requests_carry_both_signatures(webhook_stack, webhook_receiver) -> None:
    rx = await webhook_receiver()
    st = await webhook_stack()
    ep = await started(st, rx)
    old = ep["secret"]
    first = (await st.event_ids((await st.submit(["a@example.net"]))["a@example.net"]))[0]
    await rx.wait_for(lambda: rx.accepted_ids() == [first])
    assert len(rx.requests[0].headers["webhook-signature"].split(" ")) == 1

    r = await st.http.post(f"/v1/webhooks/{ep['id']}/rotate-secret")
    assert r.status_code == 200, r.text
    new = r.json()["secret"]
    assert new.startswith("whsec_") and new != old and r.json()["secret_rotation_ends_at"]
    await st.dispatchers[0][0].sync_endpoints()  # the lane workers have the new keys before the next event
    rx.secrets[:] = [new]  # a receiver that switched already
    second = (await st.event_ids((await st.submit(["b@example.net"]))["b@example.net"]))[0]
    await rx.wait_for(lambda: second in rx.accepted_ids())
    req = rx.requests[-1]
    assert req.verified
    sigs = req.headers["webhook-signature"].split(" ")
    assert len(sigs) == 2

    def verifies(secret: str, sig: str) -> bool:
        return verify(secret, {**req.headers, "webhook-signature": sig}, req.body)

    assert [verifies(new, s) for s in sigs] == [True, False]
    assert [verifies(old, s) for s in sigs] == [False, True]
