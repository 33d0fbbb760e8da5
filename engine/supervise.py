"""Child processes of ``engine run``: started, watched, restarted, stopped; and the child's side of it.

``engine run`` is a supervisor of two kinds of children, both ``python -m engine <role>``:
delivery workers (``engine worker``) and, with ``[server] intake_processes`` above one,
intake processes (``engine intake``) that serve the HTTP API and the SMTP listeners on
sockets the supervisor bound and passes down. A child that dies is started again in
its slot; SIGTERM is passed on and each child drains within ``[server] shutdown_timeout``.

A child must never outlive its supervisor holding what it does not own (a listening
socket keeps the port busy, so the next ``engine run`` could not bind it): each child
asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG`` on Linux) and,
everywhere, polls its parent id as a backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable, Sequence

import structlog

from engine import metrics
from engine.config import Settings, child_environment

log = structlog.get_logger(__name__)

PR_SET_PDEATHSIG = 1


class ChildSupervisor:
    """Starts, watches and restarts ``count`` children running ``engine <role>``."""

    def __init__(
        self,
        settings: Settings,
        dsn: str,
        count: int,
        *,
        role: str = "worker",
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.settings, self.dsn, self.count, self.role = settings, dsn, count, role
        self.env = env or {}
        self.pass_fds = tuple(pass_fds)
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "engine"]
        if self.settings.config_path:
            cmd += ["--config", str(self.settings.config_path)]
        return [*cmd, self.role]

    async def _spawn(self, slot: int) -> None:
        env = child_environment(
            DATABASE_URL=self.dsn, ENGINE_WORKER_SLOT=str(slot), ENGINE_PARENT_PID=str(os.getpid()), **self.env
        )
        self.procs[slot] = await asyncio.create_subprocess_exec(*self._command(), env=env, pass_fds=self.pass_fds)
        log.info(f"{self.role}_started", slot=slot, pid=self.procs[slot].pid)

    async def start(self) -> None:
        for slot in range(self.count):
            await self._spawn(slot)
        if self.count:
            self._watch = asyncio.create_task(self._supervise(), name=f"{self.role}-supervisor")

    async def _supervise(self) -> None:
        while not self._stopping:
            await asyncio.sleep(1)
            for slot, proc in list(self.procs.items()):
                if proc.returncode is not None and not self._stopping:
                    log.warning(f"{self.role}_died", slot=slot, pid=proc.pid, returncode=proc.returncode)
                    metrics.mark_dead(proc.pid)
                    await self._spawn(slot)

    def alive(self) -> int:
        """How many children run now."""
        return sum(1 for p in self.procs.values() if p.returncode is None)

    async def stop(self, timeout: float) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), timeout=timeout)
            except TimeoutError:
                log.error(f"{self.role}_killed_after_timeout", pid=proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when our parent dies (Linux); elsewhere the poll below does it."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):  # no libc found: the parent poll still stops us
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


async def stop_when_orphaned(stop: Callable[[], None], parent: int | None = None) -> None:
    """A supervised child stops when its supervisor is gone (even after a kill -9).

    ``parent`` is the supervisor's pid as it told us; if it died before we asked the
    kernel to signal us, ``getppid`` already differs and we stop at the first check.
    """
    expected = parent if parent is not None else os.getppid()
    while True:
        if os.getppid() != expected:
            log.warning("supervisor_gone_stopping")
            stop()
            return
        await asyncio.sleep(1)
