"""The dispatcher's DNS resolver for webhook targets: aiohttp's, minus every non-public address.

Apart from :mod:`engine.webhooks.safety` (the checks endpoints and the API use) so that
importing those does not import aiohttp: the CLI starts faster.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from engine.webhooks.safety import is_public


class SafeResolver(AbstractResolver):
    """aiohttp's resolver, minus every non-public address (checked at each connection)."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        public = [r for r in results if is_public(r["host"])]
        if not public:
            # With an errno, aiohttp's ClientConnectorError shows the message (else "[None]").
            raise OSError(
                errno.EACCES, f"{host} resolves only to non-public addresses; refused (see [webhooks] allow_private_targets)"
            )
        return public

    async def close(self) -> None:
        await self._inner.close()



def resolver(allow_private: bool) -> Any:
    return None if allow_private else SafeResolver()
