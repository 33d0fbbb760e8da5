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


INFLATE_STEP = 1 << 20
"""Bytes inflated at a time: a small gzip chunk cannot become one huge buffer."""


async def _chunks(request: Request) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive, inflated when gzip (by header or by its magic bytes)."""
    gz = request.headers.get("content-encoding", "").lower() == "gzip"
    inflater: zlib._Decompress | None = None
    first = True
    inflated = False
    async for chunk in request.stream():
        if not chunk:
            continue
        if first:
            first = False
            if gz or chunk[:2] == b"\x1f\x8b":
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        if inflater is None:
            yield chunk
            continue
        try:
            data = inflater.decompress(chunk, INFLATE_STEP)
            while True:
                if data:
                    inflated = True
                    yield data
                if not inflater.unconsumed_tail:
                    break
                data = inflater.decompress(inflater.unconsumed_tail, INFLATE_STEP)
        except zlib.error:
            raise ApiError(400, "the body is not valid gzip", field="body") from None
    if inflater is not None and not inflater.eof and not inflated:
        raise ApiError(400, "the gzip body is truncated", field="body")


async def lines(request: Request) -> AsyncIterator[list[tuple[int, bytes]]]:
    """Lists of (line number from 1, line bytes without the newline), one list per chunk read.

    Blank lines are skipped (their numbers still count). Each chunk is split once (linear in
    the body, however many lines a chunk holds); a line is only joined across chunks where it
    straddles them.
    """
    n = 0
    carry = b""
    skipping = False
    async for chunk in _chunks(request):
        pieces = chunk.split(b"\n")
        out: list[tuple[int, bytes]] = []
        if len(pieces) > 1:
            head = pieces[0]
            if skipping:
                skipping = False  # the rest of a line already reported as too long
            else:
                n += 1
                line = carry + head if carry else head
                if len(line) > MAX_LINE:
                    out.append((n, TOO_LONG))
                elif line.strip():
                    out.append((n, line))
            for line in pieces[1:-1]:
                n += 1
                if len(line) > MAX_LINE:
                    out.append((n, TOO_LONG))
                elif line.strip():
                    out.append((n, line))
            carry = pieces[-1]
        elif not skipping:
            carry += chunk
        if not skipping and len(carry) > MAX_LINE:
            n += 1
            out.append((n, TOO_LONG))
            skipping, carry = True, b""
        if out:
            yield out
    if carry.strip() and not skipping:
        yield [(n + 1, carry)]
