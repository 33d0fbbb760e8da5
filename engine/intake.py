"""Intake on every core: the HTTP API and SMTP listeners served by several processes.

One Python process serves one core. ``engine run`` with ``[server] intake_processes``
above one binds every listening socket itself (so a port in use fails at once, with
one clear line, and port ``0`` resolves once for everybody), then starts that many
``engine intake`` children that inherit the sockets and accept on them: the pre-fork
model of Postfix's ``master`` and of gunicorn. The kernel hands each connection to
whichever child accepts first, so a busy child takes fewer; a child that dies loses
no queued connection (the backlog belongs to the shared socket) and is started again.

Each child is a whole intake: its own pool, group commit, API key cache and
listeners; accepted still means committed. Housekeeping, the webhook dispatcher,
the exporter, retention and the bounce/FBL listener stay in the supervisor, whose
event loop no longer carries intake.

The sockets reach the children as inherited descriptors named in
``ENGINE_INTAKE_FDS`` (``http=5,smtp:submission=6``), read by :mod:`engine.config`.
"""

from __future__ import annotations

import errno
import socket
import time
from dataclasses import dataclass, field

from engine.config import Settings
from engine.errors import EngineError

BACKLOG = 1024
BIND_RETRY = 5.0
"""Seconds to retry an address in use: after a kill -9, the old children release it as they stop."""


class BindError(EngineError):
    """A listening address could not be bound (in use, not ours, permission denied)."""


@dataclass
class ListenerSockets:
    """Listening sockets by name: ``http`` and ``smtp:<listener name>``."""

    sockets: dict[str, socket.socket] = field(default_factory=dict)

    def fds(self) -> list[int]:
        return [s.fileno() for s in self.sockets.values()]

    def environment(self) -> str:
        """The value of ``ENGINE_INTAKE_FDS`` for the children."""
        return ",".join(f"{name}={s.fileno()}" for name, s in self.sockets.items())

    def address(self, name: str) -> tuple[str, int]:
        host, port = self.sockets[name].getsockname()[:2]
        return str(host), int(port)

    def close(self) -> None:
        for s in self.sockets.values():
            s.close()
        self.sockets.clear()


def listen_socket(host: str, port: int, label: str, *, retry_for: float = 0.0) -> socket.socket:
    """A listening TCP socket on ``host:port`` (not inheritable; pass it down explicitly)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + retry_for
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(BACKLOG)
            sock.setblocking(False)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                raise  # `engine run` names the taken address in one line (engine/commands/server.py)
            raise BindError(f"{label} cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def bind_listeners(settings: Settings, *, retry_for: float = BIND_RETRY) -> ListenerSockets:
    """Bind every listener intake serves: all or nothing."""
    bound = ListenerSockets()
    try:
        if settings.http.enabled:
            host, port = settings.http.listen
            bound.sockets["http"] = listen_socket(host, port, "the HTTP API", retry_for=retry_for)
        if settings.smtp.enabled:
            for listener in settings.smtp.listeners:
                host, port = listener.listen
                bound.sockets[f"smtp:{listener.name}"] = listen_socket(
                    host, port, f"SMTP listener {listener.name!r}", retry_for=retry_for
                )
    except BaseException:
        bound.close()
        raise
    return bound


def prepare_shared(settings: Settings) -> None:
    """Make, once and before any child starts, the files every intake child reads.

    The engine's secret key (dashboard sessions, webhook secrets) and the self-signed
    certificates of STARTTLS listeners are created on first use; several children
    starting together would each make their own (a cookie sealed by one would not open
    in another, a certificate could be paired with another child's key).
    """
    from engine.submit.tls import ensure_self_signed
    from engine.webhooks.secrets import engine_key

    engine_key(settings)
    if settings.smtp.enabled:
        for listener in settings.smtp.listeners:
            if listener.tls == "starttls" and (listener.cert_file is None or listener.key_file is None):
                ensure_self_signed(settings.home / "tls", settings.server.hostname)


def inherited(settings: Settings) -> ListenerSockets:
    """The sockets an intake child was given (``ENGINE_INTAKE_FDS``), adopted as socket objects."""
    adopted = ListenerSockets()
    for name, fd in settings.intake_fds.items():
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        adopted.sockets[name] = sock
    return adopted


def intake_count(settings: Settings, workers: int) -> int:
    """Processes that serve intake: ``[server] intake_processes``, else a share of the cores we may use.

    A node that only accepts (``workers == 0``) gives intake every core. A node that also
    delivers gives it half: on this project's 2-core benchmark machine (Postgres, workers,
    sink and load generator on the same cores) two intake processes beside two workers
    delivered 0.84-0.91x Postfix where one gave 0.94-1.14x (each process has its own group
    commit, so two halve the batches and nearly double Postgres' CPU), while with delivery
    off two intake processes took 1.95x the REST batch rate and 1.16x the per-connection
    SMTP rate of one (README, Benchmarks).
    """
    from engine.supervise import cpu_budget

    n = settings.server.intake_processes
    if n is not None:
        return n
    cores = cpu_budget()
    return cores if workers == 0 else max(1, cores // 2)
