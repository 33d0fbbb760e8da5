"""``engine run``, ``engine worker``, ``engine intake`` and ``engine migrate``: start the engine, bring its schema up to date.

The heavy imports (the app, logging setup) happen inside the commands, so
``engine --help`` and the one-shot commands do not pay for the server.
"""

from __future__ import annotations

import argparse

from engine.commands import Subparsers
from engine.db.queries import q
from engine.runtime import database, run_async


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
    from engine.app import serve
    from engine.logging import configure

    configure(args.settings.logging)
    run_async(serve(args.settings, args.workers))
    return 0


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
