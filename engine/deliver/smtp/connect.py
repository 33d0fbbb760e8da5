"""Opening a session: TCP connect from a source address, banner, EHLO (HELO fallback), STARTTLS.

The hops are walked in MX order like an MTA walks its MX list: a transport
failure before the session is ready (refused, timeout, 421 banner, STARTTLS
required but missing) moves on to the next hop. Every failure is an
:class:`SmtpSetupError` whose text says what failed and where; when no hop
works, :class:`AllHopsFailed` carries them all.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Sequence

import aiosmtplib
import structlog

from engine.deliver.hop import Hop
from engine.deliver.smtp.connection import Connection, PoolKey
from engine.deliver.smtp.results import Phase
from engine.deliver.smtp.settings import SmtpClientSettings, TlsPolicy
from engine.errors import EngineError

log = structlog.get_logger(__name__)


class SmtpSetupError(EngineError):
    """A connection to a hop could not be made ready for a transaction (always temporary)."""

    def __init__(
        self, text: str, phase: Phase, *, code: int | None = None, tls_handshake: bool = False
    ) -> None:
        super().__init__(text)
        self.text = text
        self.phase = phase
        self.code = code
        self.tls_handshake = tls_handshake


class AllHopsFailed(Exception):
    """No hop gave a ready session; ``failures`` holds one :class:`SmtpSetupError` per attempt, in order."""

    def __init__(self, failures: list[SmtpSetupError]) -> None:
        super().__init__("; ".join(f.text for f in failures))
        self.failures = failures


class Connector:
    """Opens ready sessions (TLS per policy) to the first hop that takes one."""

    def __init__(self, settings: SmtpClientSettings, tls_context: ssl.SSLContext | None = None) -> None:
        """``tls_context`` verifies certificates for ``required`` TLS (default: system CAs + ``ca_file``)."""
        self.settings = settings
        self._verified_ctx = tls_context or self._make_verified_context()
        self._opportunistic_ctx = ssl.create_default_context()
        self._opportunistic_ctx.check_hostname = False
        self._opportunistic_ctx.verify_mode = ssl.CERT_NONE

    def _make_verified_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if self.settings.ca_file is not None:
            ctx.load_verify_locations(cafile=str(self.settings.ca_file))
        return ctx

    async def connect_any(
        self, key: PoolKey, hops: Sequence[Hop], source: str | None, helo: str, policy: TlsPolicy
    ) -> Connection:
        """A ready session to the first of ``hops`` that takes one; raises :class:`AllHopsFailed`.

        A failed TLS handshake under ``opportunistic`` TLS is retried once in plain text on the same hop.
        """
        failures: list[SmtpSetupError] = []
        for hop in hops:
            try:
                return await self._open(key, hop, source, helo, policy)
            except SmtpSetupError as exc:
                if exc.tls_handshake and policy == "opportunistic":
                    log.warning("smtp.starttls_failed_retry_plain", host=hop.label, reason=exc.text)
                    try:
                        return await self._open(key, hop, source, helo, "disabled")
                    except SmtpSetupError as again:
                        exc = again
                log.info(
                    "smtp.connect_failed",
                    host=hop.label,
                    phase=exc.phase,
                    code=exc.code,
                    reason=exc.text,
                )
                failures.append(exc)
        raise AllHopsFailed(failures)

    async def _open(
        self, key: PoolKey, hop: Hop, source: str | None, helo: str, policy: TlsPolicy
    ) -> Connection:
        s = self.settings
        where = f"{hop.address}:{hop.port}"
        label = hop.label
        sock = await self._tcp_connect(hop, source)
        smtp = aiosmtplib.SMTP(
            hostname=hop.mx_host, sock=sock, local_hostname=helo, timeout=s.banner_timeout, start_tls=False
        )
        try:
            try:
                await smtp.connect(timeout=s.banner_timeout)
            except aiosmtplib.SMTPConnectResponseError as exc:
                raise SmtpSetupError(
                    f"{exc.code} {exc.message} (banner from {label})", "greeting", code=exc.code
                ) from exc
            except aiosmtplib.SMTPTimeoutError as exc:
                raise SmtpSetupError(
                    f"timed out after {s.banner_timeout:g}s waiting for the banner of {label}", "greeting"
                ) from exc
            except (aiosmtplib.SMTPException, OSError) as exc:
                raise SmtpSetupError(f"connection closed by {where} before the banner", "greeting") from exc
            await self._hello(smtp, helo, label)
            tls = tls_verified = False
            if policy != "disabled" and smtp.supports_extension("starttls"):
                ctx = self._verified_ctx if policy == "required" else self._opportunistic_ctx
                try:
                    await smtp.starttls(server_hostname=hop.mx_host, tls_context=ctx, timeout=s.starttls_timeout)
                except aiosmtplib.SMTPResponseException as exc:
                    if policy == "required" or exc.code == 421:
                        raise SmtpSetupError(
                            f"{exc.code} {exc.message} (STARTTLS refused by {label})",
                            "starttls",
                            code=exc.code,
                        ) from exc
                    log.info("smtp.starttls_refused", host=label, code=exc.code)
                except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
                    raise SmtpSetupError(
                        f"TLS handshake with {label} failed: {exc}", "starttls", tls_handshake=True
                    ) from exc
                else:
                    tls, tls_verified = True, policy == "required"
                    await self._hello(smtp, helo, label)
            elif policy == "required":
                raise SmtpSetupError(f"TLS required but {label} does not offer STARTTLS", "starttls")
        except BaseException:
            smtp.close()
            raise
        return Connection(
            smtp=smtp,
            hop=hop,
            key=key,
            tls=tls,
            tls_verified=tls_verified,
            pipelining=smtp.supports_extension("pipelining"),
            extensions=dict(smtp.esmtp_extensions),
        )

    async def _tcp_connect(self, hop: Hop, source: str | None) -> socket.socket:
        where = f"{hop.address}:{hop.port}"
        family = socket.AF_INET6 if ":" in hop.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            if source:
                try:
                    sock.bind((source, 0))
                except OSError as exc:
                    raise SmtpSetupError(
                        f"cannot bind source address {source}: {exc.strerror or exc}", "connect"
                    ) from exc
            try:
                async with asyncio.timeout(self.settings.connect_timeout):
                    await asyncio.get_running_loop().sock_connect(sock, (hop.address, hop.port))
            except ConnectionRefusedError as exc:
                raise SmtpSetupError(f"connection refused by {where}", "connect") from exc
            except TimeoutError as exc:
                raise SmtpSetupError(
                    f"connection to {where} timed out after {self.settings.connect_timeout:g}s", "connect"
                ) from exc
            except OSError as exc:
                raise SmtpSetupError(f"cannot connect to {where}: {exc.strerror or exc}", "connect") from exc
        except BaseException:
            sock.close()
            raise
        return sock

    async def _hello(self, smtp: aiosmtplib.SMTP, helo: str, label: str) -> None:
        timeout = self.settings.ehlo_timeout
        try:
            try:
                await smtp.ehlo(hostname=helo, timeout=timeout)
            except aiosmtplib.SMTPHeloError as exc:
                if exc.code < 500 or not smtp.is_connected:
                    raise
                await smtp.helo(hostname=helo, timeout=timeout)
        except aiosmtplib.SMTPResponseException as exc:
            raise SmtpSetupError(
                f"{exc.code} {exc.message} (EHLO reply from {label})", "ehlo", code=exc.code
            ) from exc
        except aiosmtplib.SMTPTimeoutError as exc:
            raise SmtpSetupError(
                f"timed out after {timeout:g}s waiting for the EHLO reply of {label}", "ehlo"
            ) from exc
        except ValueError as exc:  # an EHLO name aiosmtplib refuses to send
            raise SmtpSetupError(f"invalid EHLO name {helo!r}: {exc}", "ehlo") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise SmtpSetupError(f"connection to {label} lost during EHLO", "ehlo") from exc


__all__ = ["AllHopsFailed", "Connector", "SmtpSetupError"]
