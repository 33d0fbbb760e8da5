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
    out = engine(f"postgresql://nobody@127.0.0.1:1/none", tmp_path, "queue", "stats")
    assert out.returncode == 1 and "database unavailable" in out.stderr
