"""Server-side TLS for the SMTP relay: load a certificate, or make a dev one.

STARTTLS needs a certificate from the first run, but a newcomer has none. With
``self_signed = true`` we generate one (ECDSA P-256: generated in milliseconds,
accepted by every current TLS stack) for ``[server] hostname``, once, and keep it
under ``$ENGINE_HOME/tls`` so restarts do not change the key clients may have
pinned. The private key is written 0600 and atomically (temp file + rename), so a
crash never leaves a half-written key that a later start would trust.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from engine.errors import ConfigError

VALIDITY = dt.timedelta(days=825)  # the longest lifetime clients accept for a leaf certificate
RENEW_BEFORE = dt.timedelta(days=30)


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server SSLContext (TLS 1.2+, no client certificates) from PEM files.

    Raises ConfigError naming the file when it is missing or not a matching pair,
    so a bad path stops the engine at start instead of failing every STARTTLS.
    """
    for path, key in ((cert_file, "cert_file"), (key_file, "key_file")):
        if not path.is_file():
            raise ConfigError(f"TLS {key} {path} does not exist or is not a file")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        ctx.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"cannot load TLS certificate {cert_file} with key {key_file}: {exc} "
            "(both must be PEM and the key must match the certificate)"
        ) from None
    return ctx


def _safe_name(hostname: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", hostname) or "localhost"


def _still_good(cert_path: Path, key_path: Path, hostname: str) -> bool:
    """True when the cached pair exists, is for ``hostname`` and is not about to expire."""
    if not (cert_path.is_file() and key_path.is_file()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError):
        return False
    if key.public_key() != cert.public_key():  # a crash between the two writes leaves a mismatched pair
        return False
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or names[0].value != hostname:
        return False
    return cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > RENEW_BEFORE


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # O_CREAT honours the umask; make the mode exact
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _san(hostname: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        return x509.DNSName(hostname)


def ensure_self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """Return ``(cert_path, key_path)`` of a self-signed pair for ``hostname``, creating it if needed.

    Blocking (file I/O and key generation): call it at start-up, or via
    ``asyncio.to_thread`` from a running loop.
    """
    directory.mkdir(parents=True, exist_ok=True)
    base = _safe_name(hostname)
    cert_path = directory / f"{base}.selfsigned.crt"
    key_path = directory / f"{base}.selfsigned.key"
    if _still_good(cert_path, key_path, hostname):
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName([_san(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_atomic(key_path, key_pem, 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path
