"""A deep queue (issue 14): what a claim reads when its destinations are saturated, and stats that
do not count every row of a large table. Real Postgres; plans are read from EXPLAIN, never timed."""

from __future__ import annotations

import json
from typing import Any

from engine.db.queries import q
from engine.ids import uuid7
from engine.outbox import NewMessage, NewRecipient, Outbox


def _msgs(domain: str, n: int, per_message: int = 50) -> list[NewMessage]:
    return [
        NewMessage(
            id=uuid7(), source="http", mail_from="s@example.com", stream="default", priority=5,
            recipients=[NewRecipient(f"r{m}-{i}@{domain}", domain) for i in range(min(per_message, n - m))],
            content={"subject": "x", "text": "y"},
        )
        for m in range(0, n, per_message)
    ]


def _scanned(plan: dict[str, Any]) -> int:
    """Rows every scan node of ``recipients`` produced or threw away, over all loops."""
    total = 0
    if plan.get("Relation Name") == "recipients":
        loops = plan.get("Actual Loops", 1)
        total += (plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)
                  + plan.get("Rows Removed by Index Recheck", 0)) * loops
    for child in plan.get("Plans", []):
        total += _scanned(child)
    return total


async def _claim_reads(conn, skip: list[str]) -> tuple[int, int]:
    """(rows the claim statement read from recipients, rows it leased), in a rolled-back transaction."""
    sql, *args = q("claim", owner="probe", limit=50, lease_seconds=60, skip_domains=skip, rule_streams=[],
                   rule_purposes=[], rule_kinds=[], require_reconfirm=False)
    tr = conn.transaction()
    await tr.start()
    try:
        raw = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, *args)
    finally:
        await tr.rollback()
    plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
    return _scanned(plan), plan["Actual Rows"]


async def test_claim_with_only_saturated_destinations_waiting_reads_almost_nothing(pool, conn) -> None:
    ob = Outbox(pool, 3600)
    await ob.enqueue(_msgs("busy.example", 3000))
    await conn.execute("ANALYZE recipients")
    read, leased = await _claim_reads(conn, ["busy.example"])
    assert leased == 0
    # Before: every waiting row of the skipped domain was read and thrown away (3000 here, 1M at depth).
    assert read < 50, read


async def test_claim_with_a_saturated_destination_still_finds_the_others(pool, conn) -> None:
    ob = Outbox(pool, 3600)
    # Domains before and after the skipped one in the walk's (alphabetical) order, and one whose only
    # row is not due yet: it must not stop the walk.
    await ob.enqueue(_msgs("m-busy.example", 500) + _msgs("a-early.example", 2) + _msgs("z-late.example", 3))
    later = (await ob.enqueue(_msgs("b-later.example", 1)))[0][0].id
    await conn.execute("UPDATE recipients SET next_attempt_at = now() + interval '1 hour' WHERE id = $1", later)
    rows = await ob.claim("w", 100, 60, ["m-busy.example"])
    assert sorted(r["domain"] for r in rows) == ["a-early.example"] * 2 + ["z-late.example"] * 3
    assert await ob.claim("w", 100, 60, ["m-busy.example"]) == []  # only the skipped and the not-due are left
    assert len(await ob.claim("w", 100, 60, ["a-early.example"])) == 100  # m-busy is no longer skipped
    assert len(await ob.claim("w", 1000, 60)) == 400


async def test_stats_of_a_large_table_are_a_labelled_estimate(pool, conn) -> None:
    ob = Outbox(pool, 3600)
    await ob.enqueue(_msgs("big.example", 4000))
    await conn.execute("ANALYZE recipients")
    exact = await ob.stats(exact_rows=1000, exact=True)
    assert [(r["state"], r["n"], r["estimate"]) for r in exact] == [("queued", 4000, False)]
    rows = await ob.stats(exact_rows=1000, sample_rows=1000)
    assert rows and all(r["estimate"] for r in rows)
    assert {(r["state"], r["domain"]) for r in rows} == {("queued", "big.example")}
    assert 0 < sum(r["n"] for r in rows)
    small = await ob.stats()  # under the default threshold: exact, as before
    assert [(r["n"], r["estimate"]) for r in small] == [(4000, False)]
