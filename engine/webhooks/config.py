"""``[webhooks]``: the dispatcher's retry schedule, timeouts, lanes and target safety.

Lives next to the webhook code (like ``engine.deliver.config``); ``engine.config`` composes it.
"""

from __future__ import annotations

from cryptography.fernet import Fernet
from pydantic import Field, SecretStr, field_validator

from engine.configtypes import Duration, _Section, parse_duration

DEFAULT_SCHEDULE = ["5s", "5m", "30m", "2h", "5h", "10h", "14h", "20h", "24h"]


class WebhooksConfig(_Section):
    enabled: bool = Field(default=True, description="Run a dispatcher inside `engine run` (any number may run).")
    own_process: bool = Field(
        default=True,
        description=(
            "Inside `engine run`, dispatch from a supervised child process (`engine webhooks run`) so intake and "
            "housekeeping never share its event loop; false: in the supervisor's own loop (one process less)."
        ),
    )
    allow_private_targets: bool = Field(
        default=False,
        description="Let endpoint URLs resolve to loopback, private or link-local addresses (tests, internal receivers).",
    )
    secret_key: SecretStr | None = Field(
        default=None,
        description=(
            "Fernet key (urlsafe base64, 32 bytes) that encrypts endpoint secrets at rest; ENGINE_SECRET_KEY wins. "
            "Unset: a key is generated once under $ENGINE_HOME/secret.key (set it explicitly when several hosts share a database)."
        ),
    )
    retry_schedule: list[Duration] = Field(
        # Defaults are not validated: parse them here, or the dispatcher would multiply strings.
        default_factory=lambda: [parse_duration(d) for d in DEFAULT_SCHEDULE],
        description="Delays before each retry after the first attempt (which is immediate); after the last, the dead letter.",
        min_length=1, max_length=50,
    )
    jitter: float = Field(default=0.1, ge=0.0, le=0.5, description="Each delay is scaled by a random factor in [1-j, 1+j].")
    timeout: Duration = Field(default=15.0, gt=0, description="Per request, connect to last byte.")
    max_retry_after: Duration = Field(default=86400.0, description="A 429/503 Retry-After longer than this is capped.")
    concurrency: int = Field(default=8, ge=1, le=256, description="Requests in flight per endpoint and lane.")
    transactional_streams: list[str] = Field(
        default_factory=lambda: ["transactional"],
        description="Streams whose events dispatch on their own lane, never behind the others' backlog.",
    )
    poll_interval: Duration = Field(default=0.2, gt=0, description="How often idle dispatchers look for new events.")
    lease: Duration = Field(
        default=60.0, gt=0,
        description="A delivery a dead dispatcher held is sent again after this (at least one round: batch wait + timeouts).",
    )
    fanout_batch: int = Field(default=5000, ge=1, le=100000, description="Events turned into deliveries per statement.")
    keep_delivered: Duration = Field(default=86400.0, description="How long delivered rows stay listable (dead letters stay until replayed).")
    secret_overlap: Duration = Field(default=86400.0, description="After a rotation, the old secret also signs for this long.")
    breaker_failures: int = Field(
        default=5, ge=1, description="Consecutive failures after which an endpoint lane probes with one request at a time.",
    )

    @field_validator("secret_key")
    @classmethod
    def _fernet_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            try:
                Fernet(v.get_secret_value().encode())
            except (ValueError, TypeError):
                raise ValueError(
                    "must be a Fernet key: 32 bytes in urlsafe base64 (make one with "
                    "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')"
                ) from None
        return v

    @field_validator("retry_schedule")
    @classmethod
    def _schedule(cls, v: list[float]) -> list[float]:
        if any(b < a for a, b in zip(v, v[1:])):
            raise ValueError("retry_schedule delays must not decrease")
        return v
