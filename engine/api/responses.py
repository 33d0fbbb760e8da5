"""What handlers answer with: the API's one error shape and a fast JSON response.

Every error is JSON ``{"error": ..., "field": ...}`` (plus extras such as ``details``)
with the right status: handlers and dependencies raise :class:`ApiError`, domain errors
are translated by the exception handlers in :mod:`engine.api.app`. Bad input is never a 500.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import JSONResponse

RETRY_AFTER_SECONDS = "5"


class ApiError(Exception):
    """An HTTP error with a JSON body; raised by handlers and dependencies."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


def error_response(status: int, message: str, field: str | None = None, **extra: Any) -> JSONResponse:
    """The one error shape: ``{"error", "field", ...extra}``."""
    return JSONResponse({"error": message, "field": field, **extra}, status_code=status)


class FastJSONResponse(JSONResponse):
    """JSONResponse rendered with orjson (the stdlib encoder was ~5% of batch submission)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)
