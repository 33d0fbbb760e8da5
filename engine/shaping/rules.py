"""The shaping file: how fast, over how many connections, the engine talks to each destination.

Why a file of its own: ops tune these numbers while the engine runs (``engine
reload``), and a maintained default for the big mailbox providers ships with
the engine (``deploy/shaping.toml``), in KumoMTA's vocabulary so mail ops feel
at home::

    [default]
    max_message_rate = "100/s"          # per (site, source)
    connection_limit = 10               # per (site, source)

    [provider.google]
    match = [{MXSuffix = ".google.com"}, {DomainSuffix = "gmail.com"}]
    provider_max_message_rate = "300/s" # across every site and source of the provider
    provider_connection_limit = 20
    [provider.google.sources.ip1]       # this egress source only
    max_message_rate = "20/s"

    [domain."comcast.net"]
    enable_tls = "required"

    [warmup.new-ip]                     # see engine.shaping.warmup
    sources = ["ip1"]
    schedule = [50, 100, 200, 500, 1000]

Effective limits for a destination are layered (``default``, then the
matching provider, then the recipient domain, each with its ``sources``); the
layering is :mod:`engine.shaping.limits`, which builds on this module.

This module is pure: the file's model, parsing, validation and loading. The
live state (token buckets, connection leases, warm-up counters) lives in
Postgres and is handled by :mod:`engine.shaping.throttle` and
:mod:`engine.shaping.warmup`.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.configtypes import Duration, parse_duration
from engine.deliver.smtp.settings import TlsPolicy
from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.config import Settings

# --------------------------------------------------------------------------- rates

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*$")
_RATE_UNITS: dict[str, float] = {
    "s": 1.0, "sec": 1.0, "second": 1.0,
    "min": 60.0, "minute": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0,
    "d": 86400.0, "day": 86400.0,
}
RATE_HELP = "'N/s', 'N/min', 'N/h' or 'N/day' (also sec, minute, hr, hour, d)"


@dataclass(frozen=True, slots=True)
class Rate:
    """A rate as written (``"20/s"``) and as tokens per second."""

    text: str
    per_second: float

    def __str__(self) -> str:
        return self.text


def parse_rate(value: Any) -> Rate:
    """``"100/s"`` -> Rate; a bad unit names the allowed ones."""
    if isinstance(value, Rate):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a rate like '100/s' ({RATE_HELP}), got {value!r}")
    m = _RATE_RE.match(value.lower())
    if not m or m.group(2) not in _RATE_UNITS:
        raise ValueError(f"expected a rate like '100/s' ({RATE_HELP}), got {value!r}")
    n = float(m.group(1))
    if n <= 0:
        raise ValueError(f"a rate must be above 0, got {value!r}")
    return Rate(value.strip(), n / _RATE_UNITS[m.group(2)])


# --------------------------------------------------------------------------- the file's models


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class Limits(_Strict):
    """Keys allowed in any block; unset keys inherit from the layer below."""

    max_message_rate: Rate | None = Field(default=None, description="messages per (site, source)")
    connection_limit: int | None = Field(default=None, ge=1, description="open connections per (site, source)")
    max_connection_rate: Rate | None = Field(default=None, description="new connections per (site, source)")
    max_deliveries_per_connection: int | None = Field(default=None, ge=1)
    provider_max_message_rate: Rate | None = Field(default=None, description="messages across the whole provider")
    provider_connection_limit: int | None = Field(default=None, ge=1, description="connections across the provider")
    enable_tls: TlsPolicy | None = None

    @field_validator("max_message_rate", "max_connection_rate", "provider_max_message_rate", mode="before")
    @classmethod
    def _rate(cls, v: Any) -> Rate | None:
        return None if v is None else parse_rate(v)

    @field_validator("enable_tls", mode="before")
    @classmethod
    def _tls(cls, v: Any) -> Any:
        # KumoMTA writes "Opportunistic" / "OpportunisticInsecure" / "Required" / "Disabled".
        if isinstance(v, str):
            low = v.lower()
            return "opportunistic" if low == "opportunisticinsecure" else low
        return v


class Block(Limits):
    sources: dict[str, Limits] = Field(default_factory=dict, description="per egress source overrides")


# --------------------------------------------------------------------------- automation rules

AutomationAction = Literal["suspend", "suspend_provider", "reduce_rate", "cap_connections", "hold_campaign"]
_TRIGGER_RE = re.compile(r"^\s*(\d+)\s*/\s*(.+?)\s*$")


def parse_trigger(value: Any) -> tuple[int, float]:
    """``"immediate"`` -> (1, 0); ``"5/1m"`` -> (5, 60.0): N matches within a period."""
    if not isinstance(value, str):
        raise ValueError(f"expected 'immediate' or 'N/period' like '5/1m', got {value!r}")
    if value.strip().lower() == "immediate":
        return 1, 0.0
    m = _TRIGGER_RE.match(value)
    if m:
        try:
            period = parse_duration(m.group(2))
        except ValueError:
            period = 0.0
        if int(m.group(1)) >= 1 and period > 0:
            return int(m.group(1)), period
    raise ValueError(f"expected 'immediate' or 'N/period' like '5/1m' (N >= 1, period > 0), got {value!r}")


class AutomationRule(_Strict):
    """One ``[[provider.X.automation]]`` rule: a reply signal, a trigger, an action for a duration.

    KumoMTA's traffic-shaping-automation vocabulary: ``regex`` on the reply text and/or a
    classifier ``category``; ``trigger`` "immediate" or "N/period"; the action holds for
    ``duration`` and then limits come back in ``ramp_steps`` steps of ``ramp_step`` each.
    """

    name: str | None = Field(default=None, description="shown in decisions and events; default: its position")
    regex: str | None = Field(default=None, description="search in the reply text (case-insensitive)")
    category: str | None = Field(default=None, description="classifier category (engine classify)")
    trigger: str = Field(default="immediate", description="'immediate' or 'N/period' like '5/1m'")
    action: AutomationAction
    duration: Duration = Field(default=3600.0, description="how long the action holds after the last match")
    factor: float = Field(default=0.5, gt=0, lt=1, description="reduce_rate: multiply rates by this")
    floor: Rate = Field(default=Rate("1/s", 1.0), description="reduce_rate: never below this")
    limit: int = Field(default=1, ge=1, description="cap_connections: connections per (site, source)")
    ramp_step: Duration = Field(default=300.0, description="recovery: one step per this long, once quiet")
    ramp_steps: int = Field(default=2, ge=0, le=20, description="recovery steps back to full limits (0: jump)")

    @field_validator("floor", mode="before")
    @classmethod
    def _floor(cls, v: Any) -> Rate:
        return parse_rate(v)

    @field_validator("regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc})") from None
        return v

    @field_validator("category")
    @classmethod
    def _category(cls, v: str | None) -> str | None:
        from engine.feedback.classify import CATEGORIES

        if v is not None and v not in CATEGORIES:
            raise ValueError(f"unknown category (known: {', '.join(sorted(CATEGORIES))})")
        return v

    @field_validator("trigger")
    @classmethod
    def _trigger(cls, v: str) -> str:
        parse_trigger(v)
        return v

    @model_validator(mode="after")
    def _signal(self) -> AutomationRule:
        if self.regex is None and self.category is None:
            raise ValueError("an automation rule needs regex and/or category")
        return self

    @property
    def threshold(self) -> tuple[int, float]:
        return parse_trigger(self.trigger)

    def matches(self, reply: str, category: str | None) -> bool:
        if self.category is not None and category != self.category:
            return False
        return self.regex is None or re.search(self.regex, reply or "", re.I) is not None




class MatchRule(_Strict):
    """Exactly one of: ``MXSuffix`` (".google.com"), ``MXGlob`` ("*.mx.yandex.net"), ``DomainSuffix``."""

    MXSuffix: str | None = None
    MXGlob: str | None = None
    DomainSuffix: str | None = None

    @model_validator(mode="after")
    def _one(self) -> MatchRule:
        set_ = [k for k in ("MXSuffix", "MXGlob", "DomainSuffix") if getattr(self, k)]
        if len(set_) != 1:
            raise ValueError("a match rule has exactly one of MXSuffix, MXGlob, DomainSuffix")
        return self

    @property
    def kind(self) -> str:
        return "MXSuffix" if self.MXSuffix else "MXGlob" if self.MXGlob else "DomainSuffix"

    @property
    def pattern(self) -> str:
        return (self.MXSuffix or self.MXGlob or self.DomainSuffix or "").lower().rstrip(".")

    def matches_mx(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        if self.MXSuffix:
            return _suffix_match(host, self.pattern)
        if self.MXGlob:
            return fnmatch.fnmatchcase(host, self.pattern)
        return False

    def matches_domain(self, domain: str) -> bool:
        return bool(self.DomainSuffix) and _suffix_match(domain.lower().rstrip("."), self.pattern)

    def __str__(self) -> str:
        return f"{{{self.kind}={self.pattern!r}}}"


def _suffix_match(name: str, suffix: str) -> bool:
    """``.google.com`` matches subdomains only; ``gmail.com`` matches itself and its subdomains."""
    if suffix.startswith("."):
        return name.endswith(suffix)
    return name == suffix or name.endswith("." + suffix)


class ProviderBlock(Block):
    match: list[MatchRule] = Field(min_length=1)
    automation: list[AutomationRule] = Field(default_factory=list, description="rules for this provider")


class HealthSettings(_Strict):
    """``[default.health]``: pauses decided from rolling reputation windows (checked every ``evaluate_every``)."""

    complaint_rate: float = Field(default=0.003, ge=0, le=1, description="pause bulk to a provider above this")
    complaint_window: Duration = Field(default=86400.0)
    complaint_min_delivered: int = Field(default=100, ge=1, description="less delivered in the window: no verdict")
    bulk_streams: list[str] = Field(default_factory=lambda: ["bulk"], description="streams paused by complaints")
    bounce_rate: float = Field(default=0.03, ge=0, le=1, description="hold a campaign above this hard bounce rate")
    bounce_window: Duration = Field(default=86400.0)
    bounce_min_volume: int = Field(default=100, ge=1, description="fewer final outcomes: no verdict")
    pause_duration: Duration = Field(default=3600.0, description="how long a health pause holds (re-checked after)")
    evaluate_every: Duration = Field(default=30.0)
    refresh: Duration = Field(default=1.0, description="workers re-read active decisions this often")


class DefaultBlock(Block):
    automation: list[AutomationRule] = Field(default_factory=list, description="rules for every provider")
    health: HealthSettings = Field(default_factory=HealthSettings, description="reputation pauses")


class WarmupBlock(_Strict):
    """A ramp of daily caps for new sources (IPs) or sending domains; see engine.shaping.warmup."""

    sources: list[str] = Field(default_factory=list, description="egress source names this ramp applies to")
    sending_domains: list[str] = Field(default_factory=list, description="envelope sender domains")
    providers: list[str] = Field(default_factory=list, description="only traffic to these providers; empty = all")
    schedule: list[int] = Field(min_length=1, description="daily caps, one step per healthy day")
    min_delivered_ratio: float = Field(default=0.9, ge=0, le=1)
    max_complaint_rate: float = Field(default=0.003, ge=0, le=1)
    min_daily_volume: int = Field(default=0, ge=0, description="fewer attempts than this: the day does not count")
    spread_over: Duration = Field(default=86400.0, description="a day's cap is spread over this long (rate = cap / spread)")
    spill_pool: str | None = Field(default=None, description="over today's cap, send from this egress pool instead")

    @field_validator("schedule")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(x < 1 for x in v):
            raise ValueError("every daily cap in schedule must be at least 1")
        return v

    @model_validator(mode="after")
    def _scope(self) -> WarmupBlock:
        if not self.sources and not self.sending_domains:
            raise ValueError("a warmup needs sources or sending_domains")
        return self


class ShapingFile(_Strict):
    default: DefaultBlock = DefaultBlock()
    provider: dict[str, ProviderBlock] = Field(default_factory=dict)
    domain: dict[str, Block] = Field(default_factory=dict)
    warmup: dict[str, WarmupBlock] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names(self) -> ShapingFile:
        for name in [*self.provider, *self.warmup]:
            if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", name):
                raise ValueError(f"name {name!r} must match [A-Za-z0-9_.-]{{1,64}}")
        for name, w in self.warmup.items():
            unknown = [p for p in w.providers if p not in self.provider]
            if unknown:
                raise ValueError(f"warmup {name!r}: unknown providers {unknown} (known: {sorted(self.provider)})")
        return self


class ShapingSettings(_Strict):
    """``[shaping]`` in the main config (defined next to its code; engine/config.py composes it)."""

    file: Path | None = Field(default=None, description="shaping TOML; relative to the config file's directory")
    token_horizon: Duration = Field(default=0.2, description="a worker leases this much traffic's tokens per round trip")
    connection_lease_ttl: Duration = Field(default=15.0, description="a dead worker's connection slots free after this")
    max_hold: Duration = Field(default=30.0, description="a job waiting longer for a token goes back to the queue")
    recheck: Duration = Field(default=60.0, description="rows handed back by shaping are ready again after at most this")


# --------------------------------------------------------------------------- loading and validation


class ShapingError(ConfigError):
    """A shaping file is unreadable or invalid; ``problems`` lists each error."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"invalid shaping file {source}:\n" + "\n".join(f"  {p}" for p in problems))
        self.source = source
        self.problems = problems


def _format(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(err["loc"])
            msg = f"unknown key (allowed: {', '.join(allowed)})" if allowed else "unknown key"
        value = err.get("input")
        shown = "" if isinstance(value, (dict, list)) or repr(value) in msg else f" (got {value!r})"
        out.append(f"{loc}: {msg}{shown}")
    return out


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    top = loc[0] if loc else None
    if len(loc) == 1:
        return list(ShapingFile.model_fields)
    if top == "warmup":
        return list(WarmupBlock.model_fields)
    if "health" in loc:
        return list(HealthSettings.model_fields)
    if "automation" in loc:
        return list(AutomationRule.model_fields)
    if "match" in loc:
        return list(MatchRule.model_fields)
    if "sources" in loc:
        return list(Limits.model_fields)
    if top == "provider":
        return list(ProviderBlock.model_fields)
    if top == "default":
        return list(DefaultBlock.model_fields)
    return list(Block.model_fields)


def overlapping_matches(f: ShapingFile) -> list[str]:
    """Pairs of providers whose rules can match the same host or domain: the result would be ambiguous."""
    rules = [(name, r) for name, p in f.provider.items() for r in p.match]
    problems = []
    for i, (a, ra) in enumerate(rules):
        for b, rb in rules[i + 1:]:
            if a != b and _overlap(ra, rb):
                problems.append(f"provider.{a} match {ra} overlaps provider.{b} match {rb}")
    return problems


def _overlap(a: MatchRule, b: MatchRule) -> bool:
    if (a.kind == "DomainSuffix") != (b.kind == "DomainSuffix"):
        return False  # one looks at the recipient domain, the other at MX hosts
    pa, pb = a.pattern, b.pattern
    if a.kind != "MXGlob" and b.kind != "MXGlob":
        # Two suffixes overlap when one name can end with both.
        na, nb = pa.lstrip("."), pb.lstrip(".")
        return _suffix_match("x." + na, nb) or _suffix_match("x." + nb, na) or na == nb
    if a.kind == "MXGlob" and b.kind == "MXGlob":
        return pa == pb or fnmatch.fnmatchcase(pa.replace("*", "x"), pb) or fnmatch.fnmatchcase(pb.replace("*", "x"), pa)
    glob, suffix = (pa, pb) if a.kind == "MXGlob" else (pb, pa)
    return fnmatch.fnmatchcase("x" + suffix if suffix.startswith(".") else "x." + suffix, glob) or glob.replace(
        "*", "x"
    ).endswith(suffix)


def parse_shaping(data: dict[str, Any], source: str = "<shaping>") -> ShapingFile:
    try:
        f = ShapingFile.model_validate(data)
    except ValidationError as exc:
        raise ShapingError(source, _format(exc)) from None
    problems = overlapping_matches(f)
    if problems:
        raise ShapingError(source, problems)
    return f


def load_shaping(path: str | Path) -> ShapingFile:
    """Read and validate a shaping file; :class:`ShapingError` lists every problem."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ShapingError(str(p), ["file does not exist"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ShapingError(str(p), [f"not valid TOML: {exc}"]) from None
    except OSError as exc:
        raise ShapingError(str(p), [f"cannot read: {exc.strerror}"]) from None
    return parse_shaping(data, str(p))


def resolve_path(settings: Settings) -> Path | None:
    """``[shaping] file``, relative to the config file's directory (else the working directory)."""
    if settings.shaping.file is None:
        return None
    path = Path(settings.shaping.file)
    config_path = settings.config_path
    if not path.is_absolute() and config_path:
        candidate = Path(config_path).parent / path
        if candidate.exists() or not path.exists():
            return candidate
    return path
