"""The embedded Postgres (pgserver) under ``$ENGINE_HOME/pg``: started, supervised, stopped.

Used only without a database URL. pgserver shares one server per data directory between
processes and counts its users in ``pg/.handle_pids.json``; the last one to leave stops it.
That count goes wrong after a ``kill -9`` (the dead pid stays listed, so the server outlives
every later clean stop), and nothing restarts a server whose postmaster died. Here:

- :meth:`EmbeddedPostgres.start` drops pids of processes that are gone, then starts or
  attaches to the server and makes sure the engine's database exists;
- :meth:`EmbeddedPostgres.supervise` (a background task of ``engine run``) notices a dead
  postmaster and starts it again on the same data directory: crash recovery replays the
  WAL, so everything committed (every accepted message) is still there, and the socket
  path is the same, so the pools reconnect on their own;
- :meth:`EmbeddedPostgres.stop` releases this process's handle and stops the server when no
  other live process still holds one.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

EMBEDDED_DB_NAME = "engine"
HANDLE_LIST = ".handle_pids.json"  # pgserver's list of processes using the server


def _pgserver() -> Any:
    """pgserver, imported lazily: only needed without DATABASE_URL."""
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset (servers, CI)
        warnings.simplefilter("ignore")
        import pgserver

    return pgserver


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    import psutil  # type: ignore[import-untyped]  # no stubs; a dependency of pgserver

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


class EmbeddedPostgres:
    """One process's handle on the embedded server of one ``ENGINE_HOME``."""

    def __init__(self, home: Path, database: str = EMBEDDED_DB_NAME) -> None:
        self.pgdata = (home / "pg").resolve()
        self.database = database
        self.dsn = ""
        self._server: Any = None
        self._lock = threading.Lock()  # restart (in a thread) and stop never overlap in this process

    # -- pgserver's shared state (its inter-process lock guards the handle list) ------------

    def _interprocess_lock(self) -> Any:
        return _pgserver().postgres_server.PostgresServer._lock

    def _handles(self) -> list[int]:
        path = self.pgdata / HANDLE_LIST
        try:
            return [int(p) for p in json.loads(path.read_text())]
        except (FileNotFoundError, ValueError, TypeError):
            return []

    def _write_handles(self, pids: list[int]) -> None:
        (self.pgdata / HANDLE_LIST).write_text(json.dumps(pids))

    def _prune(self) -> list[int]:
        """Drop pids of processes that are gone (killed users never removed themselves); the live ones."""
        pids = self._handles()
        live = [pid for pid in pids if process_alive(pid)]
        if live != pids and (self.pgdata / HANDLE_LIST).exists():
            self._write_handles(live)
            log.info("embedded_postgres_stale_handles_pruned", pids=sorted(set(pids) - set(live)))
        return live

    def postmaster_pid(self) -> int | None:
        """The pid in ``postmaster.pid`` if that process runs, else None (never started, stopped or killed)."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        return pid if process_alive(pid) else None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> str:
        """Start (or attach to) the server, create the engine's database; returns its DSN."""
        pgserver = _pgserver()
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        if self.pgdata.exists():
            with self._interprocess_lock():
                self._prune()
        self._server = pgserver.get_server(self.pgdata, cleanup_mode="stop")
        exists = self._server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{self.database}';")
        if "(1 row)" not in exists:
            self._server.psql(f"CREATE DATABASE {self.database};")
        self.dsn = str(self._server.get_uri(self.database))
        return self.dsn

    def restart(self) -> bool:
        """Start the server again if its postmaster is gone; True when it runs afterwards.

        pgserver's own start-up is reused (same socket directory, hence the same DSN). A
        start that fails (the killed postmaster's backends may hold its shared memory for a
        moment) or outlasts pgserver's 10 s wait is simply tried again on the next check.
        """
        with self._lock, self._interprocess_lock():
            if self._server is None:
                return False
            if self.postmaster_pid() is None:
                with contextlib.suppress(subprocess.SubprocessError, AssertionError):
                    self._server.ensure_postgres_running()
            running = self.postmaster_pid() is not None
        if running:
            dsn = str(self._server.get_uri(self.database))
            if dsn != self.dsn:  # cannot happen with pgserver's socket choice; say so loudly if it does
                log.error("embedded_postgres_dsn_changed", old=self.dsn, new=dsn)
        return running

    async def supervise(self, stopping: asyncio.Event, interval: float = 1.0) -> None:
        """Background task: every ``interval`` check the postmaster; restart it when it is gone."""
        down_since: float | None = None
        while not stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=interval)
            if stopping.is_set():
                return
            if self.postmaster_pid() is not None:
                continue
            if down_since is None:
                down_since = time.monotonic()
                log.warning("embedded_postgres_down", pgdata=str(self.pgdata))
            try:
                running = await asyncio.to_thread(self.restart)
            except Exception:  # the supervisor must outlive any one failed attempt
                log.exception("embedded_postgres_restart_failed")
                continue
            if running:
                log.info("embedded_postgres_restarted", pid=self.postmaster_pid(),
                         down_seconds=round(time.monotonic() - down_since, 1))
                down_since = None

    def stop(self) -> None:
        """Release this process's handle; stop the server if no other live process holds one."""
        with self._lock:
            if self._server is None:
                return
            server, self._server = self._server, None
            atexit.unregister(server._cleanup)  # pgserver's own exit hook would decide on stale pids
            pgserver = _pgserver()
            with self._interprocess_lock():
                others = [pid for pid in self._prune() if pid != os.getpid()]
                self._write_handles(others)
                pgserver.postgres_server.PostgresServer._instances.pop(self.pgdata, None)
                if others:
                    log.info("embedded_postgres_left_running", users=others)
                    return
                pid = self.postmaster_pid()
                if pid is None:
                    return
                try:
                    pgserver._commands.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata,
                                              user=server.system_user, timeout=120)
                except subprocess.SubprocessError as exc:
                    log.warning("embedded_postgres_stop_failed", error=str(exc))
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGTERM)
                log.info("embedded_postgres_stopped", pid=pid)
