"""Effective limits: what applies to one (destination, source), resolved from a validated shaping file.

Why apart from :mod:`engine.shaping.rules`: that module is the file (its
pydantic model, validation and loading), this one answers the question the
scheduler asks before every transaction: which provider, which limits, and
which automation rules. Effective limits for a destination are layered: ``default``, then the
one provider whose ``match`` rules fit (recipient domain suffix, or any MX host
by suffix or glob), then a ``domain`` block for the recipient domain; each
layer's ``sources.<name>`` table applies on top of that layer for that source.
The *site* (the set of MX hosts, see :class:`engine.deliver.routing.Route`) is
the unit of per-destination limits, so every domain hosted by one provider
shares them; a destination with no provider is its own group for the
``provider_*`` limits ("per destination overall").

Pure like the rules: the live state (token buckets, connection leases, warm-up
counters) lives in Postgres and is handled by :mod:`engine.shaping.throttle`
and :mod:`engine.shaping.warmup`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.deliver.smtp.settings import TlsPolicy
from engine.shaping.rules import (
    AutomationRule,
    Block,
    Limits,
    Rate,
    ShapingFile,
    load_shaping,
    resolve_path,
)

if TYPE_CHECKING:
    from engine.config import Settings

_KEYS = tuple(Limits.model_fields)


@dataclass(frozen=True, slots=True)
class EffectiveLimits:
    """What applies to one (destination, source): the merged keys plus where they came from."""

    domain: str
    site: str
    source: str
    provider: str | None
    group: str  # provider name, or "site:<site>" for destinations of no provider
    max_message_rate: Rate | None = None
    connection_limit: int | None = None
    max_connection_rate: Rate | None = None
    max_deliveries_per_connection: int | None = None
    provider_max_message_rate: Rate | None = None
    provider_connection_limit: int | None = None
    enable_tls: TlsPolicy | None = None
    layers: tuple[str, ...] = ()

    # Bucket and lease keys shared by every worker (the rows in Postgres).
    @property
    def path_key(self) -> str:
        return f"{self.site}|{self.source}"

    @property
    def rate_key(self) -> str:
        return f"rate:{self.path_key}"

    @property
    def group_rate_key(self) -> str:
        return f"rate:group:{self.group}"

    @property
    def conn_rate_key(self) -> str:
        return f"connrate:{self.path_key}"

    @property
    def conn_key(self) -> str:
        return f"conn:{self.path_key}"

    @property
    def group_conn_key(self) -> str:
        return f"conn:group:{self.group}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"domain": self.domain, "site": self.site, "source": self.source,
                               "provider": self.provider, "group": self.group, "layers": list(self.layers)}
        for k in _KEYS:
            v = getattr(self, k)
            out[k] = str(v) if isinstance(v, Rate) else v
        return out


@dataclass
class Shaping:
    """A validated shaping file plus fast lookups; immutable once built (a reload builds a new one)."""

    file: ShapingFile = field(default_factory=ShapingFile)
    source: str = "<built-in>"

    def provider_for(self, domain: str, mx_hosts: tuple[str, ...] | list[str]) -> str | None:
        """The first provider (file order) whose rules fit the recipient domain or any MX host."""
        for name, p in self.file.provider.items():
            for rule in p.match:
                if rule.matches_domain(domain) or any(rule.matches_mx(h) for h in mx_hosts):
                    return name
        return None

    def rules_for(self, provider: str | None) -> list[tuple[str, AutomationRule]]:
        """(rule id, rule) for a provider: its own rules, then ``[[default.automation]]``."""
        out = []
        if provider is not None and provider in self.file.provider:
            out += [(r.name or f"provider.{provider}.automation[{i}]", r)
                    for i, r in enumerate(self.file.provider[provider].automation)]
        out += [(r.name or f"default.automation[{i}]", r) for i, r in enumerate(self.file.default.automation)]
        return out

    def limits(self, domain: str, site: str, mx_hosts: tuple[str, ...] | list[str], source: str) -> EffectiveLimits:
        domain = domain.lower().rstrip(".")
        provider = self.provider_for(domain, mx_hosts)
        merged: dict[str, Any] = {}
        layers: list[str] = []
        blocks: list[tuple[str, Block]] = [("default", self.file.default)]
        if provider is not None:
            blocks.append((f"provider.{provider}", self.file.provider[provider]))
        if domain in self.file.domain:
            blocks.append((f"domain.{domain}", self.file.domain[domain]))
        for name, block in blocks:
            for part, label in ((block, name), (block.sources.get(source), f"{name}.sources.{source}")):
                if part is None:
                    continue
                layers.append(label)
                for k in _KEYS:
                    v = getattr(part, k)
                    if v is not None:
                        merged[k] = v
        group = provider if provider is not None else f"site:{site}"
        return EffectiveLimits(domain, site, source, provider, group, layers=tuple(layers), **merged)


def load(settings: Settings) -> Shaping | None:
    """The configured shaping, or None when ``[shaping] file`` is unset (shaping off)."""
    path = resolve_path(settings)
    if path is None:
        return None
    return Shaping(load_shaping(path), str(path))
