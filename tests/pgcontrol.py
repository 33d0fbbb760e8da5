"""A private Postgres server a test may stop and start (the shared one must stay up).

Used by tests that take the database away mid-run: the engine must answer
"try later" meanwhile and recover by itself when the server comes back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pgserver
from pgserver import _commands


class PrivatePostgres:
    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        self.server: Any = pgserver.get_server(pgdata, cleanup_mode=None)  # the fixture stops and deletes it
        info = self.server.get_postmaster_info()
        self.socket_dir = info.socket_dir
        self.server.psql("ALTER SYSTEM SET fsync = off;")
        self.server.psql("SELECT pg_reload_conf();")

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres:@/{database}?host={self.socket_dir}"

    def create_database(self, name: str) -> str:
        self.server.psql(f'CREATE DATABASE "{name}";')
        return self.dsn(name)

    def stop(self, mode: str = "immediate") -> None:
        """``immediate`` is a crash from the clients' point of view."""
        _commands.pg_ctl(["-w", "-m", mode, "stop"], pgdata=self.pgdata, user=self.server.system_user, timeout=30)

    def start(self) -> None:
        _commands.pg_ctl(
            ["-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.pgdata / "log"), "start"],
            pgdata=self.pgdata,
            user=self.server.system_user,
            timeout=30,
        )
