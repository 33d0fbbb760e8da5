"""One exception hierarchy for the engine.

Driver errors (asyncpg, OS) are translated at the boundary into these so callers
handle one family, and every message says what was wrong and what to do.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ConfigError(EngineError):
    """The configuration file is missing, unreadable or invalid."""


class SchemaTooNew(EngineError):
    """The database carries migrations this code does not ship: a newer release migrated it.

    The command line exits 2 for it, like a bad config: the node must not run as it is.
    """


class DatabaseUnavailable(EngineError):
    """Postgres cannot be reached right now; the caller should answer 'try later'."""


class ValidationFailed(EngineError):
    """Input from outside is invalid. `field` names the offending input."""

    def __init__(self, message: str, field: str | None = None, status: int = 422) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status


class NotFound(EngineError):
    """The requested object does not exist (or is not visible to the caller)."""
