"""NDJSON request bodies, streamed: one JSON document per line, gzip allowed.

Bulk sync sends millions of lines; the body is read chunk by chunk and never held whole.
Gzip is recognised by ``Content-Encoding: gzip`` or by the gzip magic bytes (a ``.gz``
file posted as is). A line longer than :data:`MAX_LINE` is reported as that line's error
and skipped; a body that is not valid gzip is a 400.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator

from starlette.requests import Request

from engine.api.responses import ApiError

MAX_LINE = 64 * 1024
TOO_LONG = b"\x00too-long"
"""Stands in for a line over MAX_LINE (NUL never appears in valid JSON text)."""


async def lines(request: Request) -> AsyncIterator[tuple[int, bytes]]:
    """(line number from 1, line bytes without the newline); blank lines are skipped."""
    gz = request.headers.get("content-encoding", "").lower() == "gzip"
    inflater: zlib._Decompress | None = None
    first = True
    buf = b""
    skipping = False
    n = 0
    async for chunk in request.stream():
        if first and chunk:
            first = False
            if gz or chunk[:2] == b"\x1f\x8b":
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        if inflater is not None:
            try:
                chunk = inflater.decompress(chunk)
            except zlib.error:
                raise ApiError(400, "the body is not valid gzip", field="body") from None
        buf += chunk
        while True:
            i = buf.find(b"\n")
            if i < 0:
                if len(buf) > MAX_LINE and not skipping:
                    n += 1
                    skipping = True
                    yield n, TOO_LONG
                if skipping:
                    buf = b""
                break
            line, buf = buf[:i], buf[i + 1:]
            if skipping:
                skipping = False
                continue
            n += 1
            if len(line) > MAX_LINE:
                yield n, TOO_LONG
            elif line.strip():
                yield n, line
    if inflater is not None and not inflater.eof and n == 0 and not buf:
        raise ApiError(400, "the gzip body is truncated", field="body")
    if buf.strip() and not skipping:
        yield n + 1, buf
