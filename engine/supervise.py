"""Child processes of ``engine run``: started, watched, restarted, stopped; and the child's side of it.

``engine run`` is a supervisor of children, each ``python -m engine <role>``: delivery
workers (``engine worker``); with ``[server] intake_processes`` above one, intake
processes (``engine intake``) that serve the HTTP API and the SMTP listeners on sockets
the supervisor bound and passes down; with ``[webhooks] own_process``, one webhook
dispatcher (``engine webhooks run``). A child that dies is started again in
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
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from engine import metrics
from engine.config import Settings, child_environment

log = structlog.get_logger(__name__)

PR_SET_PDEATHSIG = 1


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cpu_budget(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may use: the default count of intake and delivery children.

    ``os.cpu_count()`` is the host's: a container limited to one CPU on a 64-core node
    would start 64 of each. The affinity mask (cpusets) and the cgroup v2 quota
    (``cpu.max``: ``quota period``, as Kubernetes and ``docker --cpus`` set it) both bound it.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


class ChildSupervisor:
    """Starts, watches and restarts ``count`` children running ``engine <role>``."""

    def __init__(
        self,
        settings: Settings,
        dsn: str,
        count: int,
        *,
        role: str = "worker",
        command: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.settings, self.dsn, self.count, self.role = settings, dsn, count, role
        self.command = tuple(command) if command is not None else (role,)  # the `engine ...` subcommand
        self.env = env or {}
        self.pass_fds = tuple(pass_fds)
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None
        self._ready_pipes: list[int] = []

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "engine"]
        if self.settings.config_path:
            cmd += ["--config", str(self.settings.config_path)]
        return [*cmd, *self.command]

    async def _spawn(self, slot: int, ready_fd: int | None = None) -> None:
        extra = {"ENGINE_READY_FD": str(ready_fd)} if ready_fd is not None else {}
        env = child_environment(
            DATABASE_URL=self.dsn, ENGINE_WORKER_SLOT=str(slot), ENGINE_PARENT_PID=str(os.getpid()),
            **self.env, **extra,
        )
        fds = (*self.pass_fds, ready_fd) if ready_fd is not None else self.pass_fds
        self.procs[slot] = await asyncio.create_subprocess_exec(*self._command(), env=env, pass_fds=fds)
        log.info(f"{self.role}_started", slot=slot, pid=self.procs[slot].pid)

    async def start(self, *, with_ready_pipes: bool = False) -> None:
        """Start every child (and watch them). With ``with_ready_pipes``, each gets a pipe to say it serves.

        Readiness travels over one pipe per child (``ENGINE_READY_FD``, see :func:`report_ready`):
        one byte once it serves, end of file if it dies first. :meth:`wait_ready` reads them.
        """
        for slot in range(self.count):
            if not with_ready_pipes:
                await self._spawn(slot)
                continue
            r, w = os.pipe()
            self._ready_pipes.append(r)
            try:
                await self._spawn(slot, w)
            finally:
                os.close(w)  # the child holds the only write end: its death is our end of file
        if self.count:
            self._watch = asyncio.create_task(self._supervise(), name=f"{self.role}-supervisor")

    async def wait_ready(self, timeout: float) -> bool:
        """Until every child started ``with_ready_pipes`` serves, died, or ``timeout`` passed."""
        pipes, self._ready_pipes = self._ready_pipes, []
        loop = asyncio.get_running_loop()
        answers: list[asyncio.Future[bytes]] = []
        for r in pipes:
            answer: asyncio.Future[bytes] = loop.create_future()
            loop.add_reader(r, _read_once, r, answer)
            answers.append(answer)
        try:
            said = await asyncio.wait_for(asyncio.gather(*answers), timeout)
            return all(said)
        except TimeoutError:
            log.warning(f"{self.role}_not_ready", waited=timeout)
            return False
        finally:
            for r in pipes:
                loop.remove_reader(r)
                os.close(r)

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


def _read_once(fd: int, answer: asyncio.Future[bytes]) -> None:
    """The pipe is readable: one byte (ready) or end of file (the child died first)."""
    if not answer.done():
        try:
            answer.set_result(os.read(fd, 1))
        except OSError:
            answer.set_result(b"")


def report_ready(fd: int | None) -> None:
    """Tell the supervisor this child serves (see :meth:`ChildSupervisor.start`); no-op without a pipe."""
    if fd is None:
        return
    with contextlib.suppress(OSError):  # the supervisor stopped waiting: nothing to tell
        os.write(fd, b"1")
    with contextlib.suppress(OSError):
        os.close(fd)


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
