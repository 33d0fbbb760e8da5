"""What one-shot CLI commands share: the event loop runner and a small migrated pool.

Commands (``engine/commands/``) import this module; no domain module does, so the
command line sits on top of the house and nothing below it imports upwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import asyncpg

from engine.config import Settings


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop when available: it is markedly faster for socket-heavy work."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)


@contextlib.asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A small migrated pool for one-shot commands."""
    from engine.app import Engine

    announce_home(settings)
    small = settings.model_copy(update={"database": settings.database.model_copy(update={"pool_min": 1, "pool_max": 2})})
    engine = Engine(small)
    await engine.connect(retry_for=3)
    try:
        yield engine.pool
    finally:
        await engine.close_pool()


def announce_home(settings: Settings) -> None:
    """One stderr line naming the state directory in use, so a command run elsewhere cannot fool anyone."""
    db = "external database" if settings.database.url else f"embedded database in {settings.home / 'pg'}"
    print(f"engine: home {settings.home} ({db})", file=sys.stderr)


def print_json(obj: Any) -> None:
    """One JSON line (values such as datetimes and UUIDs as strings)."""
    print(json.dumps(obj, default=str))
