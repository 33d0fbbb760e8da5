"""One event stream: every change of a recipient's state writes its event with the change.

Real outbox, real worker, real SMTP receivers on 127.0.0.x (a greylisting one answers 451 then
250, a strict one 550 5.1.1), real Postgres. The events are read back in id order, as a webhook
dispatcher or an export would read them.
"""

from __future__ import annotations

from typing import Any

from engine.outbox import Outbox
from engine.suppression import Suppressions
from tests.receivers import Behaviour, smtp_receiver, tls_ca  # noqa: F401
from tests.test_delivery import final, harness, routes  # noqa: F401


async def _events(pool: Any, address: str) -> list[tuple[str, dict[str, Any]]]:
    rows = await pool.fetch(
        "SELECT e.type, e.data FROM events e JOIN recipients r ON r.id = e.recipient_id WHERE r.address = $1 "
        "ORDER BY e.id",
        address,
    )
    return [(r["type"], r["data"]) for r in rows]


async def test_deferred_then_delivered_and_bounced_each_leave_their_events(harness, smtp_receiver) -> None:
    grey = smtp_receiver(Behaviour(greylist=True))
    strict = smtp_receiver(Behaviour(reject_users={"gone@strict.test"}))
    h = await harness(routes(grey_test=grey, strict_test=strict))
    await h.submit(["ann@grey.test"])
    await h.submit(["gone@strict.test"])
    h.start_worker()
    st = await h.wait(final, 30)
    assert st == {"ann@grey.test": "delivered", "gone@strict.test": "bounced"}

    ann = await _events(h.pool, "ann@grey.test")
    assert [t for t, _ in ann] == ["accepted", "deferred", "delivered"]
    deferred = ann[1][1]
    assert deferred["attempt"] == 1 and deferred["code"] == 451 and deferred["status"] == "4.7.1"
    assert "Greylisted" in deferred["reply"] and deferred["mx"] and deferred["next_attempt_at"]
    assert ann[2][1]["code"] == 250 and ann[2][1]["v"] == 1

    gone = await _events(h.pool, "gone@strict.test")
    assert [t for t, _ in gone] == ["accepted", "bounced"]
    bounced = gone[1][1]
    assert bounced["category"] == "unknown_user" and bounced["hard"] is True and bounced["permanent"] is True
    assert bounced["code"] == 550 and bounced["suppressed"] == "*"

    # Every event has its own id; each recipient's history is in the order it happened.
    ids = await h.pool.fetch("SELECT id FROM events ORDER BY id")
    assert len({r["id"] for r in ids}) == len(ids)


async def test_suppressed_at_submit_and_later_and_operator_actions_leave_events(harness, smtp_receiver) -> None:
    rx = smtp_receiver()
    h = await harness(routes(example_net=rx))
    sup = Suppressions(h.pool)
    h.acceptor.suppressions = sup  # as the engine wires it: suppression is checked at submit
    await sup.add("blocked@example.net", "*", "manual", "test")
    await h.submit(["blocked@example.net", "held@example.net", "late@example.net"])
    outbox = Outbox(h.pool, 3600)
    assert await outbox.manage("hold", domain="example.net") == 2
    # A suppression added while mail waits stops it, with an event.
    await sup.add("late@example.net", "*", "manual", "test")
    assert await outbox.manage("release", domain="example.net") == 1
    h.start_worker()
    st = await h.wait(final, 20)
    assert st["held@example.net"] == "delivered"

    blocked = await _events(h.pool, "blocked@example.net")
    assert [t for t, _ in blocked] == ["suppressed"]
    assert blocked[0][1]["at"] == "submit" and blocked[0][1]["reason"]
    late = await _events(h.pool, "late@example.net")
    assert [t for t, _ in late] == ["accepted", "held", "suppressed"]
    assert late[2][1]["pending"] is True and late[2][1]["scope"] == "*"
    held = await _events(h.pool, "held@example.net")
    assert [t for t, _ in held] == ["accepted", "held", "released", "delivered"]


async def test_purge_reports_each_row_as_bounced_by_operator(harness) -> None:
    h = await harness("")
    await h.submit(["a@nowhere.test", "b@nowhere.test"])
    outbox = Outbox(h.pool, 3600)
    await outbox.manage("hold", domain="nowhere.test")
    assert await outbox.manage("purge", domain="nowhere.test", states=("held",)) == 2
    for address in ("a@nowhere.test", "b@nowhere.test"):
        ev = await _events(h.pool, address)
        assert [t for t, _ in ev] == ["accepted", "held", "bounced"]
        assert ev[2][1]["origin"] == "operator" and ev[2][1]["category"] == "purged"
