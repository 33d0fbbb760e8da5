"""LEB128 varints for the compact signed tokens (tracking links, VERP return paths)."""

from __future__ import annotations


def encode(n: int) -> bytes:
    """Unsigned ``n`` as 7-bit groups, low first; small ids take one or two bytes."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if not n:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def decode(buf: bytes, pos: int = 0, end: int | None = None) -> tuple[int, int] | None:
    """``(value, next position)``, or None for a truncated or overlong (> 64 bits) varint."""
    end = len(buf) if end is None else end
    n = shift = 0
    while pos < end and shift <= 63:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, pos
        shift += 7
    return None
