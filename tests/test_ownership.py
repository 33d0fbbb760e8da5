"""One writer per table: each table the engine writes has one owner module, and only it writes.

Reads ``engine/db/queries.sql`` (every statement the engine runs, by name), finds the tables each
statement writes (INSERT / UPDATE / DELETE), then reads every module of ``engine/`` and fails when a
module uses a writing statement of a table it does not own, or builds write SQL in Python.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from engine.db.queries import QUERIES

ENGINE = Path(__file__).resolve().parent.parent / "engine"

OWNERS: dict[str, str] = {
    "messages": "engine/outbox.py",
    "recipients": "engine/outbox.py",
    "attempts": "engine/outbox.py",
    "events": "engine/events/store.py",
    "suppressions": "engine/suppression.py",
    "api_keys": "engine/apikeys.py",
    "idempotency_keys": "engine/accept.py",
    "templates": "engine/templates_db.py",
    "throttles": "engine/shaping/throttle.py",
    "connection_leases": "engine/shaping/throttle.py",
    "connection_waiters": "engine/shaping/throttle.py",
    "warmup_state": "engine/shaping/warmup.py",
    "suspensions": "engine/deliver/scheduler.py",
    "reputation_counters": "engine/outcome/reputation.py",
    "shaping_decisions": "engine/shaping/automation.py",
    "shaping_rule_hits": "engine/shaping/automation.py",
    "campaign_counters": "engine/shaping/automation.py",
    "workers": "engine/workers.py",
    "webhook_endpoints": "engine/webhooks/endpoints.py",
    "webhook_deliveries": "engine/webhooks/deliveries.py",
    "webhook_cursor": "engine/webhooks/deliveries.py",
    "consent": "engine/consent/store.py",
    "consent_history": "engine/consent/store.py",
    "do_not_mail": "engine/consent/erasure.py",
    "export_state": "engine/export/exporter.py",
    "export_batches": "engine/export/exporter.py",
    "audit_log": "engine/audit.py",
}

_WRITE_RE = re.compile(r"\b(?:INSERT\s+INTO|(?<!DO\s)(?<!FOR\s)UPDATE|DELETE\s+FROM)\s+([a-z_]+)", re.IGNORECASE)
_PYTHON_WRITE_RE = re.compile(r"\b(?:INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM)\b", re.IGNORECASE)
_PYTHON_SQL_ALLOWED = {"engine/db/migrate.py"}  # the migration runner's own bookkeeping table


def written_tables(sql: str) -> set[str]:
    return {m.group(1).lower() for m in _WRITE_RE.finditer(sql)} - {"set"}


def _query_uses(tree: ast.AST) -> set[str]:
    """Query names a module passes to ``q(...)`` (an f-string prefix matches every name it can make).

    A name the test cannot read (a variable) is reported as ``<dynamic>``, which no table's owner
    rule can clear: name the statement where it runs.
    """
    used: set[str] = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name != "q":
            continue
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            used.add(arg.value)
        elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
            prefix = str(arg.values[0].value)
            used |= {n for n in QUERIES if n.startswith(prefix)}
        else:
            used.add(f"<dynamic at line {node.lineno}>")
    return used


def _modules() -> dict[str, ast.AST]:
    root = ENGINE.parent
    return {str(p.relative_to(root)): ast.parse(p.read_text(), str(p)) for p in sorted(ENGINE.rglob("*.py"))}


def test_write_detection_reads_the_statements_it_should() -> None:
    assert written_tables(QUERIES["claim"].sql) == {"recipients"}  # FOR UPDATE SKIP LOCKED is no write
    assert written_tables(QUERIES["throttle_take"].sql) == {"throttles"}  # nor ON CONFLICT DO UPDATE
    assert written_tables(QUERIES["get_message"].sql) == set()
    assert written_tables("WITH m AS (UPDATE recipients SET x = 1 RETURNING id) INSERT INTO events SELECT 1") == {
        "recipients", "events"}


def test_every_written_table_has_one_owner_and_only_it_writes() -> None:
    writes = {name: written_tables(query.sql) for name, query in QUERIES.items()}
    unowned = sorted({t for ts in writes.values() for t in ts} - set(OWNERS))
    assert not unowned, f"tables written without an owner in OWNERS: {unowned}"
    trespass = []
    for path, tree in _modules().items():
        for name in sorted(_query_uses(tree)):
            assert name in QUERIES, f"{path} uses a query the test cannot check: {name!r}"
            for table in sorted(writes[name]):
                if OWNERS[table] != path:
                    trespass.append(f"{path} runs {name!r}, which writes {table} (owner: {OWNERS[table]})")
    assert not trespass, "\n".join(trespass)


def test_no_write_sql_built_in_python() -> None:
    found = []
    for path, tree in _modules().items():
        if path in _PYTHON_SQL_ALLOWED:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _PYTHON_WRITE_RE.search(node.value):
                if not (node.value.lstrip().startswith(("-", "#")) or "\n" not in node.value and len(node.value) > 200):
                    found.append(f"{path}:{node.lineno}: {node.value[:80]!r}")
    assert not found, "write SQL outside engine/db/queries.sql:\n" + "\n".join(found)
