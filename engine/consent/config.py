"""``[consent]``: purposes, the rule each stream's mail must pass, legacy opt-ins, role accounts.

With no ``[consent]`` section at all the shipped rules hold: ``bulk`` mail needs ``marketing``
consent ``granted``, ``outreach`` mail needs ``sales`` consent not ``revoked``, and
``transactional`` mail needs none. A config can relax or tighten them per stream.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from engine.configtypes import _Section

BUILTIN_PURPOSES = ("marketing", "sales", "transactional")
RULES = ("granted", "not_revoked", "none")
_NAME = re.compile(r"^[a-z0-9_-]{1,64}$")


class StreamRule(_Section):
    purpose: str = Field(description="The consent purpose this stream's mail needs.")
    rule: Literal["granted", "not_revoked", "none"] = Field(
        description="granted: consent must be granted; not_revoked: anything but revoked; none: no check.",
    )


def _default_streams() -> dict[str, StreamRule]:
    return {
        "bulk": StreamRule(purpose="marketing", rule="granted"),
        "outreach": StreamRule(purpose="sales", rule="not_revoked"),
        "transactional": StreamRule(purpose="transactional", rule="none"),
    }


class ConsentConfig(_Section):
    purposes: list[str] = Field(
        default_factory=list, description="Purposes besides marketing, sales and transactional.",
    )
    streams: dict[str, StreamRule] = Field(
        default_factory=_default_streams,
        description="Stream -> {purpose, rule}. Streams not listed are not checked (like rule = 'none').",
    )
    legacy: Literal["grandfathered", "require_reconfirm"] = Field(
        default="grandfathered",
        description="Imported opt-ins marked legacy (no metadata): honoured as granted, or treated as not granted.",
    )
    role_accounts: list[str] = Field(
        default_factory=lambda: [
            "abuse", "admin", "administrator", "billing", "hostmaster", "info", "mailer-daemon", "no-reply",
            "noreply", "postmaster", "root", "security", "support", "webmaster",
        ],
        description="Local parts of role addresses (postmaster@, abuse@ ...).",
    )
    role_account_purposes: list[str] = Field(
        default_factory=list, description="Purposes role addresses are barred from (e.g. ['marketing', 'sales']).",
    )
    max_import_errors: int = Field(default=1000, ge=1, le=100000, description="Per-line errors listed in an import answer.")

    @field_validator("purposes")
    @classmethod
    def _purposes(cls, v: list[str]) -> list[str]:
        for p in v:
            if not _NAME.match(p):
                raise ValueError(f"purpose {p!r} must match [a-z0-9_-]{{1,64}}")
        return v

    @field_validator("role_accounts")
    @classmethod
    def _roles(cls, v: list[str]) -> list[str]:
        return sorted({r.strip().lower() for r in v if r.strip()})

    @property
    def all_purposes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*BUILTIN_PURPOSES, *self.purposes]))

    @model_validator(mode="after")
    def _known(self) -> ConsentConfig:
        known = self.all_purposes
        for stream, r in self.streams.items():
            if r.purpose not in known:
                raise ValueError(f"streams.{stream}.purpose: unknown purpose {r.purpose!r}; declared: {', '.join(known)}")
        for p in self.role_account_purposes:
            if p not in known:
                raise ValueError(f"role_account_purposes: unknown purpose {p!r}; declared: {', '.join(known)}")
        return self
