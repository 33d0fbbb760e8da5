"""Primitive config types shared by every section model: durations, sizes, host:port.

They live apart from ``engine.config`` so a module that owns a config section
(routing, shaping, ...) can define its pydantic model next to its code without
an import cycle; ``engine.config`` composes the sections into ``Settings``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgG]i?[bB]?|[bB])?\s*$")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like ``"30s"``, ``"5m"``, ``"3d"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like '30s', '5m', '2h', '3d'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"expected a duration like '30s', '5m', '2h', '3d', got {value!r}")


def parse_size(value: Any) -> int:
    """Bytes from a number or a string like ``"25MB"``, ``"512k"``."""
    if isinstance(value, bool):
        raise ValueError("expected a size like '25MB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = (m.group(2) or "").lower()[:1]
            return int(m.group(1)) * _SIZE_UNITS[unit]
    raise ValueError(f"expected a size like '25MB' or a number of bytes, got {value!r}")


def parse_hostport(value: Any) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port)."""
    if isinstance(value, tuple) and len(value) == 2:
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected 'host:port', got {value!r}")
    m = re.match(r"^\[([0-9a-fA-F:.]+)\]:(\d+)$", value) or re.match(r"^([^:\s]+):(\d+)$", value)
    if not m:
        raise ValueError(f"expected 'host:port' (IPv6 as '[::1]:25'), got {value!r}")
    port = int(m.group(2))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return m.group(1), port


def check_networks(v: list[str]) -> list[str]:
    for net in v:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ValueError(f"{net!r} is not a network like '10.0.0.0/8' or '::1/128'") from None
    return v


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
HostPort = Annotated[tuple[str, int], BeforeValidator(parse_hostport)]


class _Section(BaseModel):
    """Every section rejects unknown keys: a typo must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
