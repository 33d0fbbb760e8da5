"""``[feedback]``: VERP return paths, suppression scope, classifier overrides, the inbound listener.

Lives next to the feedback code (like ``engine.deliver.config``) so ``engine.config`` only
composes it into ``Settings`` as ``feedback: FeedbackConfig = FeedbackConfig()``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from engine.compose.tracking import TrackingKey
from engine.configtypes import Duration, HostPort, Size, _Section

_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))+$")


def _domain(value: str) -> str:
    d = value.strip().rstrip(".").lower()
    if not _DOMAIN_RE.match(d):
        raise ValueError(f"{value!r} is not a domain name like 'bounces.example.com'")
    return d


class FeedbackInboundConfig(_Section):
    """``[feedback.inbound]``: the SMTP listener for asynchronous bounces and FBL reports."""

    enabled: bool = False
    listen: HostPort = ("127.0.0.1", 2526)
    max_message_size: Size = Field(default=10 * 1024 * 1024, ge=1024)
    max_lines: int = Field(
        default=200_000, ge=100, description="Lines in one message; beyond: 552 (a 10 MB report in base64 has ~135,000)."
    )
    accept_domains: list[str] = Field(
        default_factory=list,
        description="Domains besides bounce_domain whose mail is taken as reports (e.g. the FBL address's domain).",
    )
    max_recipients: int = Field(default=20, ge=1, le=1000)
    data_timeout: Duration = 60.0
    parse_concurrency: int = Field(default=2, ge=1, le=64, description="Reports parsed at once (each in a process of its own, off the event loop).")
    max_sessions: int = Field(default=100, ge=0, description="Connections at once; beyond: 421 at once (0 = no cap).")

    @field_validator("accept_domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        return [_domain(d) for d in v]


class FeedbackConfig(_Section):
    """``[feedback]``."""

    bounce_domain: str | None = Field(
        default=None, description="VERP domain (its MX points at the inbound listener); unset = VERP off."
    )
    keys: list[TrackingKey] = Field(
        default_factory=list,
        description="VERP signing keys; empty = reuse [[tracking.keys]] (with a separate HMAC context).",
    )
    signing_key_id: int | None = None
    key_grace_period: Duration = 90 * 86400.0
    suppress_scope: Literal["global", "stream"] = Field(
        default="global", description="How hard bounces and complaints suppress; unsubscribes are always per stream."
    )
    classifier_rules: list[Path] = Field(default_factory=list, description="Extra rule files tried before the built-in ones.")
    inbound: FeedbackInboundConfig = FeedbackInboundConfig()

    @field_validator("bounce_domain")
    @classmethod
    def _bounce_domain(cls, v: str | None) -> str | None:
        return None if v is None else _domain(v)

    @model_validator(mode="after")
    def _keys(self) -> FeedbackConfig:
        ids = [k.id for k in self.keys]
        if len(ids) != len(set(ids)):
            raise ValueError("feedback key ids must be unique")
        if self.signing_key_id is not None and self.signing_key_id not in ids:
            raise ValueError(f"feedback.signing_key_id {self.signing_key_id} is not among feedback.keys")
        if self.inbound.enabled and self.bounce_domain is None and not self.inbound.accept_domains:
            raise ValueError("feedback.inbound is enabled but neither bounce_domain nor inbound.accept_domains is set")
        return self
