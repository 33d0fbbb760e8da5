"""What both MIME writers share: the email policy, its header registry, and MimeError.

Its own module so that :mod:`engine.compose.mime` (the stdlib builder, which
dispatches to the direct writer) and :mod:`engine.compose.mime_fast` (the
direct writer, which falls back to the stdlib's header folding) both import it
without importing each other.
"""

from __future__ import annotations

import email.headerregistry
import email.policy

from engine.errors import ValidationFailed


class MimeError(ValidationFailed):
    """Content cannot be turned into a safe message; ``field`` names the input at fault."""


class _CachedHeaderRegistry(email.headerregistry.HeaderRegistry):
    """The stdlib registry builds a new header class with ``type()`` on every lookup
    (about 80 us each, 15% of composing a message); the classes never change, so keep them."""

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = super().__getitem__(name)
        return cls


HEADERS = _CachedHeaderRegistry()
"""The header classes ``POLICY`` parses with; calling it builds a header (``HEADERS(name, value)``)."""
POLICY = email.policy.SMTP.clone(cte_type="7bit", header_factory=HEADERS)
"""CRLF, RFC 2047 headers, 7bit-clean bodies."""
POLICY_UTF8 = email.policy.SMTPUTF8.clone(cte_type="7bit", header_factory=HEADERS)
"""For messages with non-ASCII local parts (sent with SMTPUTF8): UTF-8 headers, 7bit-clean bodies."""
