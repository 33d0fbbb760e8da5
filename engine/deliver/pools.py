"""Egress pools: which local address and EHLO name a message leaves from.

A *source* is a local address to bind plus the EHLO name that matches its
reverse DNS; a *pool* groups sources with weights; each stream maps to a pool
(``[delivery] stream_pools``), so transactional, marketing and cold outreach
leave from separate IPs and never share a reputation. Without any ``[[pools]]``
the engine has one implicit pool ``default`` whose single source lets the OS
pick the address and uses ``[server] hostname`` as EHLO name.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import Field, field_validator, model_validator

from engine.configtypes import _Section
from engine.netaddr import IpAddress

_NAME_RE = r"^[a-z0-9_-]{1,64}$"


class SourceConfig(_Section):
    name: str = Field(pattern=_NAME_RE, description="Identifies the source in logs, metrics and shaping.")
    address: IpAddress | None = Field(default=None, description="Local IP to bind; unset lets the OS choose.")
    ehlo: str | None = Field(default=None, description="EHLO name (should match the address's PTR); default [server] hostname.")
    weight: int = Field(default=1, ge=0, description="Share of this pool's traffic (0 = drained).")

    @field_validator("ehlo")
    @classmethod
    def _ehlo(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$", v):
            raise ValueError(f"{v!r} is not a host name")
        return v


class PoolConfig(_Section):
    name: str = Field(pattern=_NAME_RE)
    sources: list[SourceConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _weights(self) -> PoolConfig:
        if not any(s.weight for s in self.sources):
            raise ValueError(f"pool {self.name!r}: at least one source needs a weight above 0")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"pool {self.name!r}: source names must be unique")
        return self


@dataclass(frozen=True, slots=True)
class Source:
    name: str
    address: str | None
    ehlo: str


class EgressPools:
    """Weighted choice of a source for a stream."""

    def __init__(
        self, pools: Sequence[PoolConfig], stream_pools: dict[str, str], default_ehlo: str, rng: random.Random | None = None
    ) -> None:
        self._rng = rng or random.Random()
        self._pools: dict[str, tuple[list[Source], list[int]]] = {}
        for p in pools:
            srcs = [Source(s.name, s.address, s.ehlo or default_ehlo) for s in p.sources]
            self._pools[p.name] = (srcs, [s.weight for s in p.sources])
        if "default" not in self._pools:
            self._pools["default"] = ([Source("default", None, default_ehlo)], [1])
        self._stream_pools = dict(stream_pools)
        for stream, pool in self._stream_pools.items():
            if pool not in self._pools:
                raise ValueError(f"stream {stream!r} maps to unknown pool {pool!r}")

    def pool_for(self, stream: str) -> str:
        return self._stream_pools.get(stream, "default")

    def pick(self, stream: str) -> Source:
        sources, weights = self._pools[self.pool_for(stream)]
        if len(sources) == 1:
            return sources[0]
        return self._rng.choices(sources, weights)[0]
