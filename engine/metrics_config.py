"""``[metrics]``: whether ``/metrics`` is served and who may scrape it without a key."""

from __future__ import annotations

from pydantic import Field, field_validator

from engine.configtypes import _Section, check_networks


class MetricsConfig(_Section):
    enabled: bool = Field(default=True, description="Serve Prometheus metrics at /metrics.")
    allow: list[str] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description="Networks that may scrape without a key; others need an API key with the 'metrics' scope.",
    )

    @field_validator("allow")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        return check_networks(v)
