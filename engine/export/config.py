"""``[export]``: where events go for the warehouse, how often, in what format."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from engine.configtypes import Duration, _Section


class S3Config(_Section):
    bucket: str = Field(default="", description="Bucket name (must exist).")
    prefix: str = Field(default="", description="Key prefix inside the bucket, e.g. 'engine/events'.")
    endpoint: str | None = Field(default=None, description="host:port of an S3-compatible store; unset = AWS.")
    scheme: Literal["https", "http"] = "https"
    region: str = "us-east-1"
    access_key: str | None = Field(default=None, description="AWS_ACCESS_KEY_ID wins; unset = the usual AWS chain.")
    secret_key: SecretStr | None = Field(default=None, description="AWS_SECRET_ACCESS_KEY wins.")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return v.strip("/")


class ExportConfig(_Section):
    enabled: bool = Field(default=False, description="Run the exporter inside `engine run` (`engine export run` runs it alone).")
    destination: Literal["local", "s3"] = "local"
    directory: Path | None = Field(default=None, description="Local destination; unset = $ENGINE_HOME/export.")
    s3: S3Config = S3Config()
    format: Literal["parquet", "ndjson"] = Field(default="parquet", description="ndjson writes .ndjson.gz files.")
    interval: Duration = Field(default=300.0, gt=0, description="How often new events are written (sooner while behind).")
    batch_events: int = Field(default=100_000, ge=1, le=5_000_000, description="Events per batch (one file per partition).")
    lease: Duration = Field(default=600.0, gt=0, description="A batch a dead exporter held is redone after this.")
    facts: bool = Field(default=False, description="Also write daily facts per (date, stream, provider, sending domain, campaign).")
