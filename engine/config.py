"""Configuration: one TOML file, validated once at load with pydantic.

This is the only module that reads ``os.environ``. Everything else receives a
typed :class:`Settings`. A bad file raises :class:`ConfigError` naming the key,
the bad value and what is allowed, so the engine refuses to start instead of
limping along with a half-understood config.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from engine.compose.dkim import DomainDkimConfig
from engine.compose.mime import MimeConfig
from engine.compose.render import TemplateConfig
from engine.compose.tracking import TrackingConfig
from engine.configtypes import (  # noqa: F401  (re-exported for section modules)
    Duration,
    HostPort,
    Size,
    _Section,
    check_networks,
    parse_duration,
    parse_hostport,
    parse_size,
)
from engine.consent.config import ConsentConfig
from engine.dashboard.config import DashboardConfig
from engine.deliver.config import DeliveryConfig
from engine.deliver.pools import PoolConfig
from engine.deliver.routing import RoutingConfig
from engine.devsink import DevConfig
from engine.errors import ConfigError
from engine.export.config import ExportConfig
from engine.feedback.config import FeedbackConfig
from engine.logging import LoggingConfig
from engine.metrics_config import MetricsConfig
from engine.retention.config import RetentionConfig
from engine.shaping.rules import ShapingSettings
from engine.webhooks.config import WebhooksConfig


class ServerConfig(_Section):
    hostname: str = Field(default="localhost", description="Our name in SMTP greetings and Message-IDs.")
    shutdown_timeout: Duration = Field(default=15.0, description="Grace period on SIGTERM.")
    intake_processes: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Processes serving the HTTP API and SMTP listeners under `engine run`: unset = one per core "
        "on a node without delivery workers, half the cores otherwise; 1 = the main process serves them itself.",
    )
    home: str | None = Field(
        default=None,
        description=(
            "State directory (embedded Postgres, certificates, keys), relative to this config file; "
            "ENGINE_HOME wins; unset: $XDG_STATE_HOME/engine (~/.local/state/engine)."
        ),
    )


class DatabaseConfig(_Section):
    url: str | None = Field(default=None, description="Postgres URL; DATABASE_URL wins; unset means embedded.")
    pool_min: int = Field(default=2, ge=1)
    pool_max: int = Field(default=10, ge=1)
    connect_timeout: Duration = 5.0
    command_timeout: Duration = 30.0

    @model_validator(mode="after")
    def _pool_order(self) -> DatabaseConfig:
        if self.pool_max < self.pool_min:
            raise ValueError(f"pool_max ({self.pool_max}) must be >= pool_min ({self.pool_min})")
        return self


class HttpConfig(_Section):
    enabled: bool = True
    listen: HostPort = ("127.0.0.1", 8025)
    max_body_size: Size = 32 * 1024 * 1024
    max_batch: int = Field(default=1000, ge=1, le=10000)
    public_url: str = Field(default="http://127.0.0.1:8025", description="Base URL used in links we generate.")


class SmtpListener(_Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    listen: HostPort
    tls: Literal["none", "starttls"] = "none"
    trusted: bool = Field(
        default=False,
        description="AUTH may be offered without TLS on this listener (loopback/internal use only).",
    )
    cert_file: Path | None = None
    key_file: Path | None = None
    trusted_networks: list[str] | None = Field(
        default=None,
        description=(
            "Clients that may relay without AUTH on this listener. Unset: a trusted listener uses "
            "[smtp] trusted_networks, an untrusted one trusts nobody."
        ),
    )
    self_signed: bool = Field(
        default=False,
        description="Development only: generate a self-signed certificate under $ENGINE_HOME/tls.",
    )

    @field_validator("trusted_networks")
    @classmethod
    def _networks(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else check_networks(v)

    @model_validator(mode="after")
    def _tls_files(self) -> SmtpListener:
        has_files = self.cert_file is not None and self.key_file is not None
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(f"listener {self.name!r}: set both cert_file and key_file, or neither")
        if self.tls == "starttls" and not has_files and not self.self_signed:
            raise ValueError(
                f"listener {self.name!r}: tls = 'starttls' needs cert_file and key_file "
                "(or self_signed = true for development)"
            )
        return self


class SmtpConfig(_Section):
    enabled: bool = True
    listeners: list[SmtpListener] = Field(
        default_factory=lambda: [SmtpListener(name="local", listen=("127.0.0.1", 2525), trusted=True)]
    )
    max_message_size: Size = Field(default=25 * 1024 * 1024, ge=1024, description="0 is not 'unlimited': set a size.")
    max_recipients: int = Field(default=1000, ge=1)
    trusted_networks: list[str] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description="Clients from these networks may relay without AUTH on trusted listeners that set none of their own.",
    )
    default_stream: str = "relay"
    data_timeout: Duration = 300.0
    max_sessions: int = Field(default=1000, ge=0, description="Connections per listener; beyond: 421 at once (0 = no cap).")

    @field_validator("trusted_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        return check_networks(v)

    @model_validator(mode="after")
    def _unique_names(self) -> SmtpConfig:
        names = [listener.name for listener in self.listeners]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"listener names must be unique, repeated: {sorted(dupes)}")
        return self


class QueueConfig(_Section):
    max_age: Duration = Field(default=3 * 86400.0, description="Give up and bounce after this long.")
    default_stream: str = "default"
    streams: dict[str, int] = Field(
        default_factory=lambda: {"transactional": 0, "default": 5, "relay": 5, "outreach": 7, "bulk": 9},
        description="Known streams and their priority (lower is claimed first).",
    )
    lease_duration: Duration = 300.0

    @field_validator("streams")
    @classmethod
    def _priorities(cls, v: dict[str, int]) -> dict[str, int]:
        for name, prio in v.items():
            if not re.match(r"^[a-z0-9_-]{1,64}$", name):
                raise ValueError(f"stream name {name!r} must match [a-z0-9_-]{{1,64}}")
            if not 0 <= prio <= 9:
                raise ValueError(f"stream {name!r}: priority {prio} must be 0-9")
        return v


class ApiConfig(_Section):
    key_cache_ttl: Duration = Field(default=5.0, description="How long a verified key is trusted without a lookup.")
    auth_failures_per_minute: int = Field(
        default=20, ge=0,
        description="Failed authentications (HTTP and SMTP AUTH) one client address may make per minute; 0 = no limit.",
    )
    idempotency_ttl: Duration = 86400.0
    max_recipients_per_message: int = Field(default=1000, ge=1)
    max_recipients_per_request: int = Field(
        default=50_000, ge=1, description="All messages of one request (a batch) together: bounds memory and transaction size.",
    )


class Settings(_Section):
    server: ServerConfig = ServerConfig()
    database: DatabaseConfig = DatabaseConfig()
    http: HttpConfig = HttpConfig()
    smtp: SmtpConfig = SmtpConfig()
    queue: QueueConfig = QueueConfig()
    api: ApiConfig = ApiConfig()
    routing: RoutingConfig = RoutingConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    shaping: ShapingSettings = ShapingSettings()
    pools: list[PoolConfig] = Field(default_factory=list, description="Egress pools; none = one implicit 'default'.")
    domains: list[DomainDkimConfig] = Field(default_factory=list, description="Sending domains and their DKIM keys.")
    templates: TemplateConfig = TemplateConfig()
    mime: MimeConfig = MimeConfig()
    tracking: TrackingConfig = TrackingConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    consent: ConsentConfig = ConsentConfig()
    metrics: MetricsConfig = MetricsConfig()
    export: ExportConfig = ExportConfig()
    retention: RetentionConfig = RetentionConfig()
    logging: LoggingConfig = LoggingConfig()
    dashboard: DashboardConfig = DashboardConfig()
    dev: DevConfig = DevConfig()

    # Resolved from the environment, not from the file.
    home: Path = Path("var")
    """Absolute after :func:`load_settings` (see :func:`resolve_home`): every process and cwd agree on it."""
    config_path: Path | None = None
    worker_slot: int | None = None
    """Set (``ENGINE_WORKER_SLOT``) in a worker process that ``engine run`` started and supervises."""
    parent_pid: int | None = None
    """The supervising ``engine run`` (``ENGINE_PARENT_PID``): a child stops when it is gone."""
    intake_fds: dict[str, int] = Field(default_factory=dict)
    ready_fd: int | None = None
    """A pipe to write one byte to once serving (``ENGINE_READY_FD``), set for an ``engine intake`` child."""
    """Listening sockets an ``engine intake`` child inherited (``ENGINE_INTAKE_FDS``: ``http=5,smtp:sub=6``)."""

    @model_validator(mode="after")
    def _streams_known(self) -> Settings:
        for where, name in (("smtp.default_stream", self.smtp.default_stream), ("queue.default_stream", self.queue.default_stream)):
            if name not in self.queue.streams:
                raise ValueError(f"{where} = {name!r} is not one of queue.streams ({', '.join(sorted(self.queue.streams))})")
        if "streams" not in self.consent.model_fields_set:  # shipped rules: only for streams this config has
            kept = {k: v for k, v in self.consent.streams.items() if k in self.queue.streams}
            object.__setattr__(self, "consent", self.consent.model_copy(update={"streams": kept}))
        for name in self.consent.streams:
            if name not in self.queue.streams:
                raise ValueError(
                    f"consent.streams.{name}: not one of queue.streams ({', '.join(sorted(self.queue.streams))})"
                )
        if self.feedback.bounce_domain is not None and not (self.feedback.keys or self.tracking.keys):
            raise ValueError(
                "feedback.bounce_domain needs signing keys for its VERP tokens: add [[feedback.keys]] or "
                "[[tracking.keys]] (make one with `engine tracking keygen --id 1`)"
            )
        for name in self.webhooks.transactional_streams:
            if name not in self.queue.streams:
                raise ValueError(
                    f"webhooks.transactional_streams: {name!r} is not one of queue.streams ({', '.join(sorted(self.queue.streams))})"
                )
        return self

    def stream_priority(self, stream: str) -> int:
        return self.queue.streams.get(stream, 5)


FROM_ENVIRONMENT = ("home", "config_path", "worker_slot", "parent_pid", "intake_fds", "ready_fd")
"""Fields of :class:`Settings` resolved from the environment, never from the file."""


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number (got {value!r})") from None


def _intake_fds(value: str) -> dict[str, int]:
    """``http=5,smtp:submission=6`` -> ``{"http": 5, "smtp:submission": 6}`` (set by ``engine run``)."""
    fds: dict[str, int] = {}
    for item in filter(None, value.split(",")):
        name, _, fd = item.partition("=")
        if not name or not fd.isdigit():
            raise ConfigError(f"ENGINE_INTAKE_FDS: {item!r} is not name=fd")
        fds[name] = int(fd)
    return fds


def child_environment(**overrides: str) -> dict[str, str]:
    """The environment for a child process this engine starts: ours, plus ``overrides``."""
    return {**os.environ, **overrides}


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see deploy/engine.example.toml for every key)"
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


SECRET_ENV = ("DATABASE_URL", "ENGINE_SECRET_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
"""Variables that may instead name a file holding the value, as ``<NAME>_FILE`` (Docker and
Kubernetes secrets are files; a secret in a file stays out of ``docker inspect`` and ``ps e``)."""


def _read_secret_file(env: dict[str, str], name: str) -> None:
    """``<name>_FILE``: read the value from that file (surrounding whitespace dropped) unless ``<name>`` is set."""
    path = env.get(f"{name}_FILE")
    if not path or env.get(name):
        return
    try:
        env[name] = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
    if not env[name]:
        raise ConfigError(f"{name}_FILE: {path} is empty")


def resolve_home(env: dict[str, str], config_path: Path | None, configured: object) -> Path:
    """The state directory, absolute, so that a command run from another directory finds the same one.

    ``ENGINE_HOME`` wins (relative to the current directory, as a shell user means it); then
    ``[server] home``, relative to the config file that names it; else a fixed per-user default
    (``$XDG_STATE_HOME/engine``). Never the bare current directory: a CLI command run elsewhere would
    silently start a second embedded Postgres and report an empty queue.
    """
    if env.get("ENGINE_HOME"):
        return Path(env["ENGINE_HOME"]).expanduser().absolute()
    if isinstance(configured, str) and configured:
        home = Path(configured).expanduser()
        base = config_path.parent if config_path is not None else Path.cwd()
        return (home if home.is_absolute() else base.absolute() / home).resolve()
    state = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".local" / "state")
    return (Path(state) / "engine").absolute()


def load_settings(path: str | Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """Load and validate the config. ``path`` wins over ``ENGINE_CONFIG``; no file means defaults."""
    env = dict(os.environ if env is None else env)
    path = path or env.get("ENGINE_CONFIG") or None
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            with p.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist (set --config or ENGINE_CONFIG)") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    for reserved in FROM_ENVIRONMENT:
        if reserved in data:
            raise ConfigError(f"invalid configuration in {source}:\n  {reserved}: unknown key")
    server = data.get("server")
    data["home"] = str(resolve_home(env, Path(path) if path else None, server.get("home") if isinstance(server, dict) else None))
    data["config_path"] = str(path) if path else None
    data["worker_slot"] = _env_int(env, "ENGINE_WORKER_SLOT")
    data["parent_pid"] = _env_int(env, "ENGINE_PARENT_PID")
    data["ready_fd"] = _env_int(env, "ENGINE_READY_FD")
    data["intake_fds"] = _intake_fds(env.get("ENGINE_INTAKE_FDS", ""))
    for name in SECRET_ENV:
        _read_secret_file(env, name)
    if env.get("ENGINE_SECRET_KEY"):
        data.setdefault("webhooks", {})
        if isinstance(data["webhooks"], dict):
            data["webhooks"] = {**data["webhooks"], "secret_key": env["ENGINE_SECRET_KEY"]}
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        exp = data.setdefault("export", {})
        if isinstance(exp, dict):
            s3 = exp.setdefault("s3", {})
            if isinstance(s3, dict):
                s3["access_key"], s3["secret_key"] = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    if env.get("DATABASE_URL"):
        data.setdefault("database", {})
        if isinstance(data["database"], dict):
            data["database"] = {**data["database"], "url": env["DATABASE_URL"]}
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
