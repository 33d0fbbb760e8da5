"""The `engine` command line against a real database."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def engine(db_dsn: str, tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env, timeout=60)


def test_apikey_lifecycle_and_queue_stats(db_dsn, tmp_path) -> None:
    out = engine(db_dsn, tmp_path, "apikey", "create", "--name", "crm", "--scopes", "send,read")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("ek_") and len(key) > 40

    listed = engine(db_dsn, tmp_path, "apikey", "list", "--json")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["name"] for r in rows] == ["crm"] and rows[0]["scopes"] == ["read", "send"]
    assert key not in listed.stdout  # the secret is never shown again

    dup = engine(db_dsn, tmp_path, "apikey", "create", "--name", "crm")
    assert dup.returncode == 1 and "already exists" in dup.stderr
    bad = engine(db_dsn, tmp_path, "apikey", "create", "--name", "x", "--scopes", "send,root")
    assert bad.returncode == 1 and "root" in bad.stderr

    assert engine(db_dsn, tmp_path, "apikey", "revoke", "--name", "crm").returncode == 0
    assert engine(db_dsn, tmp_path, "apikey", "revoke", "--name", "crm").returncode == 1
    assert "revoked" in engine(db_dsn, tmp_path, "apikey", "list").stdout

    stats = engine(db_dsn, tmp_path, "queue", "stats")
    assert stats.returncode == 0 and "queue is empty" in stats.stdout


def test_migrate_reports_versions(db_dsn, tmp_path) -> None:
    out = engine(db_dsn, tmp_path, "migrate")
    assert out.returncode == 0 and "0001 init" in out.stdout and "up to date" in out.stdout


def test_unreachable_database_is_a_clear_error(tmp_path) -> None:
    out = engine("postgresql://nobody@127.0.0.1:1/none", tmp_path, "queue", "stats")
    assert out.returncode == 1 and "database unavailable" in out.stderr


async def test_queue_management(db_dsn, tmp_path, pool) -> None:
    from engine.ids import uuid7
    from engine.outbox import NewMessage, NewRecipient, Outbox

    ob = Outbox(pool, 3600)
    msgs = [NewMessage(id=uuid7(), source="http", mail_from="a@x.test", stream="default", priority=5,
                       recipients=[NewRecipient(f"u{i}@{d}", d)], content={"subject": "s", "text": "t"})
            for i, d in enumerate(["a.test", "a.test", "b.test"])]
    await ob.enqueue(msgs)
    await pool.execute("UPDATE recipients SET state = 'deferred', attempts = 1, next_attempt_at = now() + interval '1 hour'")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        out = engine(db_dsn, tmp_path, "queue", *args)
        assert out.returncode == 0, out.stderr
        return out

    stats = run("stats").stdout
    assert "deferred=3" in stats and "a.test" in stats and "b.test" in stats
    assert "hold: 2" in run("hold", "--domain", "A.test").stdout
    assert engine(db_dsn, tmp_path, "queue", "hold").returncode == 1  # refuses without a filter
    listed = [json.loads(line) for line in run("list", "--state", "held", "--json").stdout.splitlines()]
    assert {r["address"] for r in listed} == {"u0@a.test", "u1@a.test"}
    assert "release: 2" in run("release", "--domain", "a.test").stdout
    assert "retry: 3" in run("retry").stdout
    assert await pool.fetchval("SELECT count(*) FROM recipients WHERE next_attempt_at <= now()") == 3
    assert "purge: 1" in run("purge", "--domain", "b.test", "--states", "deferred").stdout
    row = await pool.fetchrow("SELECT state, last_reply FROM recipients WHERE domain = 'b.test'")
    assert row["state"] == "bounced" and "purged" in row["last_reply"]
    bad = engine(db_dsn, tmp_path, "queue", "list", "--message", "nope")
    assert bad.returncode == 1 and "UUID" in bad.stderr


def test_revoked_apikey_name_can_be_reused(db_dsn, tmp_path) -> None:
    assert engine(db_dsn, tmp_path, "apikey", "create", "--name", "crm", "--scopes", "send").returncode == 0
    assert engine(db_dsn, tmp_path, "apikey", "revoke", "--name", "crm").returncode == 0
    again = engine(db_dsn, tmp_path, "apikey", "create", "--name", "crm", "--scopes", "send")
    assert again.returncode == 0, again.stderr
    new_key = again.stdout.strip().splitlines()[-1]
    # Only one active key may carry a name.
    dup = engine(db_dsn, tmp_path, "apikey", "create", "--name", "crm", "--scopes", "send")
    assert dup.returncode == 1 and "an API key named 'crm' already exists" in dup.stderr
    rows = [json.loads(line) for line in engine(db_dsn, tmp_path, "apikey", "list", "--json").stdout.splitlines()]
    assert [(r["name"], r["revoked_at"] is None) for r in rows] == [("crm", False), ("crm", True)]
    assert new_key not in json.dumps(rows)
    # Revoke by name acts on the active key, once.
    assert engine(db_dsn, tmp_path, "apikey", "revoke", "--name", "crm").returncode == 0
    assert engine(db_dsn, tmp_path, "apikey", "revoke", "--name", "crm").returncode == 1
