"""Where webhooks may go: never to our own network unless the operator says so.

An endpoint URL is outside input: pointed at ``http://127.0.0.1:5432`` or a cloud metadata
address it would turn the dispatcher into a probe of the private network (SSRF). So a URL
whose host is, or resolves to, a loopback, private, link-local, multicast or reserved
address is refused when the endpoint is created or changed, and checked again at each
connection (:class:`engine.webhooks.resolver.SafeResolver`), since DNS can change between the two (rebinding).
``[webhooks] allow_private_targets = true`` lifts this for internal receivers and tests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from engine.errors import ValidationFailed

MAX_URL = 2048


def is_public(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return bool(addr.is_global) and not addr.is_multicast


def check_url(url: str, field: str = "url") -> tuple[str, int]:
    """Syntax of an endpoint URL: http(s), a host, no credentials, no fragment; returns (host, port)."""
    if len(url) > MAX_URL:
        raise ValidationFailed(f"URL longer than {MAX_URL} characters", field=field)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValidationFailed(f"not a URL: {exc}", field=field) from None
    if parts.scheme not in ("http", "https"):
        raise ValidationFailed("the URL must start with https:// (or http://)", field=field)
    if not parts.hostname:
        raise ValidationFailed("the URL has no host", field=field)
    if parts.username or parts.password:
        raise ValidationFailed("credentials in the URL are not allowed; the signature authenticates us", field=field)
    if parts.fragment:
        raise ValidationFailed("the URL must not have a #fragment", field=field)
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise ValidationFailed("the URL contains whitespace or control characters", field=field)
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


async def check_target(url: str, allow_private: bool, field: str = "url") -> None:
    """Refuse a URL that is malformed, or that resolves to a non-public address (unless allowed)."""
    host, port = check_url(url, field)
    if allow_private:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ValidationFailed(f"the host {host!r} does not resolve ({exc.strerror or exc})", field=field) from None
    bad = sorted({str(info[4][0]) for info in infos if not is_public(str(info[4][0]))})
    if bad:
        raise ValidationFailed(
            f"the host {host!r} resolves to a loopback, private or link-local address ({', '.join(bad)}); "
            "set [webhooks] allow_private_targets = true to allow internal receivers",
            field=field,
        )


def literal_refused(url: str) -> str | None:
    """Why a URL whose host is a non-public IP literal is refused (aiohttp does not resolve literals)."""
    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return None if is_public(host) else f"{host} is not a public address (see [webhooks] allow_private_targets)"
