"""``engine run``, ``engine worker``, ``engine intake`` and ``engine migrate``: start the engine, bring its schema up to date.

The heavy imports (the app, logging setup) happen inside the commands, so
``engine --help`` and the one-shot commands do not pay for the server.
"""

from __future__ import annotations

import argparse
import errno
import socket

from engine.commands import Subparsers
from engine.config import Settings
from engine.db.queries import q
from engine.errors import ConfigError
from engine.runtime import database, run_async


class ListenError(ConfigError):
    """A configured address is taken: exit 2 with one line (the node must not run as configured)."""


def register(sub: Subparsers) -> None:
    p = sub.add_parser("run", help="run the engine (HTTP API, SMTP relay, delivery)")
    p.add_argument("--workers", type=int, default=None, help="delivery processes (default [delivery] workers, else one per core; 0 = none)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("worker", help="run one delivery worker process (engine run starts these itself)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("intake", help="serve the listeners engine run passes down (engine run starts these itself)")
    p.set_defaults(func=cmd_intake)

    p = sub.add_parser("migrate", help="apply database migrations")
    p.set_defaults(func=cmd_migrate)


def cmd_run(args: argparse.Namespace) -> int:
    from engine.logging import configure

    configure(args.settings.logging)
    try:
        run_async(_serve(args.settings, args.workers))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise ListenError(_in_use(args.settings, exc)) from None
    return 0


async def _serve(settings: Settings, workers: int | None) -> None:
    """The engine, and next to it the development capture sink when ``[dev] capture_sink`` asks for one."""
    import structlog

    from engine.app import serve

    log = structlog.get_logger("engine")
    log.info("engine_home", home=str(settings.home), config=str(settings.config_path) if settings.config_path else None,
             database="external" if settings.database.url else f"embedded in {settings.home / 'pg'}")
    sink = None
    if settings.dev.capture_sink is not None:
        from engine.devsink import sink_dir, start_sink

        sink = await start_sink(settings.dev.capture_sink, settings.home)
        log.info("capture_sink_started", listen="%s:%d" % settings.dev.capture_sink, directory=str(sink_dir(settings.home)))
    try:
        await serve(settings, workers)
    finally:
        if sink is not None:
            sink.close()
            await sink.wait_closed()


def _in_use(settings: Settings, exc: OSError) -> str:
    """Which configured address is taken: probe each (the bind error itself often does not say)."""
    wanted: list[tuple[str, tuple[str, int]]] = []
    if settings.http.enabled:
        wanted.append(("[http] listen", settings.http.listen))
    if settings.smtp.enabled:
        wanted += [(f"[[smtp.listeners]] {x.name!r}", x.listen) for x in settings.smtp.listeners]
    if settings.feedback.inbound.enabled:
        wanted.append(("[feedback.inbound] listen", settings.feedback.inbound.listen))
    if settings.dev.capture_sink is not None:
        wanted.append(("[dev] capture_sink", settings.dev.capture_sink))
    taken = [f"{what} {host}:{port}" for what, (host, port) in wanted if port and not _free(host, port)]
    where = ", ".join(taken) if taken else str(exc)
    return f"cannot listen: address already in use ({where}); is another engine running? stop it or change the port"


def _free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def cmd_worker(args: argparse.Namespace) -> int:
    from engine.app import run_worker
    from engine.logging import configure

    configure(args.settings.logging)
    run_async(run_worker(args.settings))
    return 0


def cmd_intake(args: argparse.Namespace) -> int:
    from engine.app import run_intake
    from engine.logging import configure

    configure(args.settings.logging)
    run_async(run_intake(args.settings))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Connecting migrates (:func:`engine.runtime.database`); then list what is applied."""

    async def go() -> None:
        async with database(args.settings) as pool:
            rows = await pool.fetch(*q("schema_versions"))
        for r in rows:
            print(f"{r['version']:04d} {r['name']} applied {r['applied_at']:%Y-%m-%d %H:%M:%S}")
        print("database is up to date")

    run_async(go())
    return 0
