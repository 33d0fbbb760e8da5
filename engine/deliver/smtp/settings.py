"""The SMTP client's tunables, composed into the config as ``[delivery.smtp]``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

TlsPolicy = Literal["opportunistic", "required", "disabled"]


class SmtpClientSettings(BaseModel):
    """Client tunables, the ``[delivery.smtp]`` config section.

    Names follow KumoMTA's egress path vocabulary (``banner_timeout``,
    ``mail_from_timeout``, ``data_dot_timeout``, ``enable_tls`` ...). Timeout
    defaults follow Postfix's, which are RFC 5321 section 4.5.3.2 values
    except a 30 s connect timeout: a host that does not answer the SYN
    within 30 s is better skipped for the next MX than waited on.
    ``opportunistic`` TLS does not verify certificates (KumoMTA's
    ``OpportunisticInsecure``, standard MTA practice); ``required`` does.
    """

    model_config = ConfigDict(extra="forbid")

    connect_timeout: float = Field(default=30.0, gt=0, description="TCP connect, seconds")
    banner_timeout: float = Field(default=300.0, gt=0, description="wait for the 220 banner")
    ehlo_timeout: float = Field(default=300.0, gt=0)
    starttls_timeout: float = Field(default=300.0, gt=0, description="STARTTLS reply plus handshake")
    rset_timeout: float = Field(default=20.0, gt=0)
    mail_from_timeout: float = Field(default=300.0, gt=0)
    rcpt_to_timeout: float = Field(default=300.0, gt=0)
    data_timeout: float = Field(default=120.0, gt=0, description="reply to DATA (354)")
    data_block_timeout: float = Field(default=180.0, gt=0, description="writing the body")
    data_dot_timeout: float = Field(default=600.0, gt=0, description="reply after end of data")
    quit_timeout: float = Field(default=5.0, gt=0, description="polite QUIT before closing")
    enable_tls: TlsPolicy = Field(
        default="opportunistic", description="default STARTTLS policy per destination"
    )
    ca_file: Path | None = Field(default=None, description="extra CAs trusted when TLS is 'required'")
    max_deliveries_per_connection: int = Field(default=100, ge=1)
    connection_limit: int = Field(default=10, ge=1, description="open connections per (site, source)")
    idle_timeout: float = Field(default=60.0, gt=0, description="close a pooled connection unused this long")
    ehlo_name: str | None = Field(default=None, description="default EHLO name; the host's FQDN when unset")


__all__ = ["SmtpClientSettings", "TlsPolicy"]
