"""The listener protocol's constructor: the per-listener fast path builds what aiosmtpd's own builds.

``ListenerSMTP`` runs aiosmtpd's constructor for a listener's first connection and a copy
without its introspection for every later one (engine/submit/server.py). If aiosmtpd adds,
renames or changes an attribute, this fails before a connection misbehaves.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from engine.config import load_settings
from engine.submit.server import COMMAND_CALL_LIMITS
from engine.submit.smtp import RelayHandler, RelaySMTP


def _shape(value: Any) -> Any:
    """A comparable form: bound methods by function and owner class, objects by type, dicts by shape."""
    if inspect.ismethod(value):
        return ("method", value.__func__, type(value.__self__))
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return tuple(_shape(v) for v in value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if callable(value):
        return ("callable", getattr(value, "__qualname__", type(value)))
    return ("object", type(value))


def _build(handler: RelayHandler, loop: asyncio.AbstractEventLoop) -> RelaySMTP:
    return RelaySMTP(
        handler, data_size_limit=1024, enable_SMTPUTF8=True, decode_data=False, hostname="mx.test",
        ident="ESMTP ready", tls_context=None, timeout=30, auth_required=False, auth_require_tls=True,
        command_call_limit=COMMAND_CALL_LIMITS, loop=loop,
    )


async def test_fast_constructor_builds_what_aiosmtpd_builds(tmp_path) -> None:
    settings = load_settings(None, env={"ENGINE_HOME": str(tmp_path)})
    loop = asyncio.get_running_loop()
    handler = RelayHandler(settings, settings.smtp.listeners[0], None, None)  # type: ignore[arg-type]
    first = _build(handler, loop)  # aiosmtpd's constructor
    assert RelaySMTP in handler.protocol_names
    second = _build(handler, loop)  # the fast path
    a, b = vars(first), vars(second)
    assert sorted(a) == sorted(b)
    for key in a:
        if key in ("_stream_reader_wr", "_strong_reader", "_stream_reader", "_closed", "_task", "_over_ssl"):
            assert type(a[key]) is type(b[key]), key
            continue
        assert _shape(a[key]) == _shape(b[key]), key
    # Bound to the new connection, not to the first one.
    assert all(m.__self__ is second for m in second._smtp_methods.values())
    assert all(impl.method.__self__ in (second, handler) for impl in second._auth_methods.values())
    assert second._auth_methods.keys() == first._auth_methods.keys() and first._auth_methods
