"""``[delivery]`` and ``[[pools]]`` settings: how workers claim, retry and talk SMTP."""

from __future__ import annotations

from pydantic import Field, field_validator

from engine.configtypes import Duration, _Section
from engine.deliver.smtp.settings import SmtpClientSettings, TlsPolicy


class DeliveryConfig(_Section):
    """``[delivery]``: how a worker claims, retries and talks SMTP."""

    workers: int | None = Field(default=None, ge=0, description="Delivery processes; unset = one per core; 0 = none.")
    claim_batch: int = Field(default=200, ge=1, le=10000)
    max_inflight: int = Field(default=5000, ge=1, description="Recipients held in memory per worker.")
    max_queued_per_destination: int = Field(default=1000, ge=1)
    destination_concurrency: int = Field(default=10, ge=1, description="Parallel transactions per destination.")
    poll_interval: Duration = Field(default=1.0, description="Claim at least this often when idle.")
    flush_interval: Duration = Field(default=0.05, description="Outcome batches are written this often.")
    retry_schedule: list[Duration] = Field(
        default_factory=lambda: [60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0],
        description="Wait after the 1st, 2nd, ... temporary failure; the last step repeats.",
        min_length=1,
    )
    retry_jitter: float = Field(default=0.2, ge=0, le=1)
    suspend_on_connection_failure: Duration = Field(
        default=60.0, description="A destination that refuses connections is not retried sooner than this."
    )
    dsn: bool = Field(default=True, description="Send RFC 3464 DSNs for relayed mail that finally fails.")
    tls_policy: dict[str, TlsPolicy] = Field(default_factory=dict, description="Per recipient domain STARTTLS policy.")
    stream_pools: dict[str, str] = Field(default_factory=dict, description="stream -> egress pool name.")
    smtp: SmtpClientSettings = SmtpClientSettings()

    @field_validator("retry_schedule")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(x <= 0 for x in v):
            raise ValueError("every retry step must be above 0")
        return v
