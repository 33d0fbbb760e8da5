"""Identifiers.

Message ids are UUIDv7 (RFC 9562): time-ordered, so inserts land at the right
edge of the primary-key index instead of scattering across it, and they leak
nothing about volume the way a sequence would.
"""

from __future__ import annotations

import os
import time
import uuid

_POOL_SIZE = 10 * 1024
_pool = b""
_pos = 0


def _random10() -> bytes:
    """10 random bytes from a pooled os.urandom read: one syscall per thousand ids, not per id."""
    global _pool, _pos
    if _pos + 10 > len(_pool):
        _pool, _pos = os.urandom(_POOL_SIZE), 0
    _pos += 10
    return _pool[_pos - 10 : _pos]


def uuid7() -> uuid.UUID:
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(_random10(), "big")
    value = (ms & 0xFFFFFFFFFFFF) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & 0x3FFFFFFFFFFFFFFF  # rand_b, 62 bits
    return uuid.UUID(int=value)
