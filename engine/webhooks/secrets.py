"""Endpoint secrets: made here, encrypted at rest, readable only by the dispatcher.

A secret is ``whsec_`` + base64 of 24 random bytes (the Standard Webhooks form: the
receiver base64-decodes what follows the prefix to get the HMAC key). The database keeps
it Fernet-encrypted under a key from ``[webhooks] secret_key`` / ``ENGINE_SECRET_KEY``,
or one generated once under ``$ENGINE_HOME/secret.key`` (mode 0600), so a database dump
alone does not let anyone forge our signatures. Secrets are never logged.
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from engine.config import Settings
from engine.errors import ConfigError

PREFIX = "whsec_"


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def secret_bytes(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret."""
    return base64.b64decode(secret.removeprefix(PREFIX))


def _key_file(home: Path) -> bytes:
    path = home / "secret.key"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    home.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as fh:
        fh.write(key + b"\n")
    return key


def engine_key(settings: Settings) -> bytes:
    """The engine's secret key: ``[webhooks] secret_key`` / ``ENGINE_SECRET_KEY``, else ``$ENGINE_HOME/secret.key``.

    Other keys are derived from it (the dashboard's session key, with HMAC), so one secret to
    keep and to share between hosts.
    """
    configured = settings.webhooks.secret_key
    return configured.get_secret_value().encode() if configured is not None else _key_file(settings.home)


class SecretBox:
    """Encrypts and decrypts endpoint secrets with the engine's secret key."""

    def __init__(self, settings: Settings) -> None:
        key = engine_key(settings)
        try:
            self._fernet = Fernet(key)
        except (ValueError, TypeError):
            raise ConfigError(
                "webhooks.secret_key (or ENGINE_SECRET_KEY) must be a Fernet key: 32 bytes in urlsafe base64 "
                "(make one with: python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')"
            ) from None

    def seal(self, secret: str) -> bytes:
        return self._fernet.encrypt(secret.encode())

    def open(self, sealed: bytes) -> str:
        try:
            return self._fernet.decrypt(sealed).decode()
        except InvalidToken:
            raise ConfigError(
                "an endpoint secret cannot be decrypted with this engine's secret key "
                "(was webhooks.secret_key / ENGINE_SECRET_KEY changed, or does another host use a different one?)"
            ) from None
