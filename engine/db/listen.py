"""LISTEN on a connection of its own until told to stop, reconnecting after a drop.

Delivery workers (enqueue hints, shaping reloads) and webhook dispatchers (wake-ups) both
need it. A pooled connection is not used: it would go back to the pool with listeners
attached when the task is cancelled. NOTIFY is only a hint: every listener also polls,
so the gap while reconnecting loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg
import structlog

log = structlog.get_logger(__name__)

RETRY_SECONDS = 1.0


async def listen_until(dsn: str, handlers: Mapping[str, Callable[..., Any]], stop: asyncio.Event) -> None:
    """Call ``handlers[channel]`` for each NOTIFY on its channel until ``stop`` is set."""
    while not stop.is_set():
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
            for channel, handler in handlers.items():
                await conn.add_listener(channel, handler)
            while not (stop.is_set() or conn.is_closed()):
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=RETRY_SECONDS)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.debug("listen_reconnecting", channels=sorted(handlers), error=str(exc))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=RETRY_SECONDS)
        finally:
            if conn is not None and not conn.is_closed():
                with contextlib.suppress(Exception):
                    await asyncio.shield(conn.close(timeout=2))
