"""The SMTP submission relay over real sockets, against a real Postgres.

Each test starts listeners on 127.0.0.1 port 0 in its own loop with
:func:`start_smtp_listeners`, talks to them with aiosmtplib (or a raw socket when
the point is a protocol-level reply), and checks what landed in the outbox.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import re
import stat
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiosmtplib
import asyncpg
import pytest
from structlog.testing import capture_logs

from engine.accept import Acceptor
from engine.apikeys import ApiKeys
from engine.config import Settings, SmtpListener
from engine.db.pool import create_pool
from engine.linebreaks import has_long_line
from engine.outbox import Outbox
from engine.submit.server import SmtpListenerHandle
from engine.submit.smtp import close_smtp_listeners, start_smtp_listeners

IO_TIMEOUT = 10.0
QUEUED_RE = re.compile(r"queued as ([0-9a-f-]{36})")

STARTTLS = SmtpListener(name="submission", listen=("127.0.0.1", 0), tls="starttls", self_signed=True)
TRUSTED = SmtpListener(name="local", listen=("127.0.0.1", 0), trusted=True)
# An untrusted listener trusts no address unless it lists networks itself: this one trusts loopback.
PLAIN = SmtpListener(name="plain", listen=("127.0.0.1", 0), trusted_networks=["127.0.0.0/8", "::1/128"])
LOOPBACK_UNTRUSTED = ["10.0.0.0/8"]  # the loopback test client is then an untrusted peer

# 8-bit UTF-8 in headers and body, a lone dot line, lines starting with dots.
RAW = (
    "From: Zoë <zoe@example.test>\r\n"
    "To: bob@example.net\r\n"
    "Subject: héllo ✉\r\n"
    "Message-ID: <relay-1@example.test>\r\n"
    "Date: Mon, 30 Nov 2026 10:00:00 +0000\r\n"
    "\r\n"
    "Grüße aus Köln\r\n"
    ".leading dot\r\n"
    "..two dots\r\n"
    ".\r\n"
    "after the lone dot\r\n"
).encode()

StartRelay = Callable[..., Awaitable[SmtpListenerHandle]]


def _variant(settings: Settings, listeners: list[SmtpListener], **smtp: Any) -> Settings:
    return settings.model_copy(
        update={"smtp": settings.smtp.model_copy(update={"listeners": listeners, **smtp})}
    )


@pytest.fixture
async def relay(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[StartRelay]:
    """Factory: start one listener with the given config; all are closed at teardown."""
    started: list[SmtpListenerHandle] = []

    async def start(
        listener: SmtpListener,
        *,
        db: asyncpg.Pool | None = None,
        key_cache_ttl: float = 5.0,
        allow_address_literals: bool = False,
        **smtp: Any,
    ) -> SmtpListenerHandle:
        s = _variant(settings, [listener], **smtp)
        if allow_address_literals:
            s = s.model_copy(update={"routing": s.routing.model_copy(update={"allow_address_literals": True})})
        acceptor = Acceptor(s, Outbox(db or pool, s.queue.max_age))
        handles = await start_smtp_listeners(s, acceptor, ApiKeys(db or pool, key_cache_ttl))
        started.extend(handles)
        return handles[0]

    yield start
    await close_smtp_listeners(started)


def _client(handle: SmtpListenerHandle) -> aiosmtplib.SMTP:
    host, port = handle.address
    return aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, validate_certs=False, timeout=IO_TIMEOUT)


def _untraced(raw: bytes, added: bool = False) -> bytes:
    """The stored message without the Received field the relay prepends (and, with ``added``, without the
    Date and Message-ID it adds when the client sent none): the rest must be the client's bytes exactly."""
    raw = bytes(raw)
    assert raw.startswith(b"Received: from "), raw[:80]
    lines = raw.split(b"\r\n")
    i = 1
    while lines[i].startswith((b"\t", b" ")):
        i += 1
    rest = b"\r\n".join(lines[i:])
    if added:
        rest = re.sub(rb"(?m)^(Date|Message-ID): [^\r\n]*\r\n", b"", rest, count=2)
    return rest


async def _send(client: aiosmtplib.SMTP, raw: bytes = RAW, rcpts: list[str] | None = None) -> uuid.UUID:
    _, reply = await client.sendmail(
        "zoe@example.test", rcpts or ["bob@example.net"], raw, mail_options=["BODY=8BITMIME"]
    )
    m = QUEUED_RE.search(reply)
    assert m, reply
    return uuid.UUID(m.group(1))


class Raw:
    """A bare SMTP client socket: send lines, read (possibly multi-line) replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, handle: SmtpListenerHandle) -> Raw:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*handle.address), IO_TIMEOUT)
        raw = cls(reader, writer)
        code, _ = await raw.reply()
        assert code == 220
        return raw

    async def reply(self) -> tuple[int, str]:
        lines = []
        for _ in range(100):
            line = await asyncio.wait_for(self.reader.readline(), IO_TIMEOUT)
            if not line:
                raise ConnectionError("server closed the connection")
            lines.append(line.decode("utf-8").rstrip("\r\n"))
            if line[3:4] != b"-":
                break
        return int(lines[-1][:3]), "\n".join(lines)

    async def cmd(self, line: str | bytes) -> tuple[int, str]:
        self.writer.write((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply()

    async def closed_by_server(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), IO_TIMEOUT) == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


async def _message_count(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM messages"))


async def _stored(pool: asyncpg.Pool, settings: Settings, message_id: uuid.UUID) -> tuple[Any, list[Any]]:
    """The message row (with raw bytes and api_key_id) and its recipient rows."""
    msg = await pool.fetchrow(
        "SELECT source, mail_from, raw, stream, api_key_id FROM messages WHERE id = $1", message_id
    )
    assert msg is not None, f"{message_id} is not in messages"
    rcpts = await Outbox(pool, settings.queue.max_age).get_message(message_id)
    assert rcpts is not None
    return msg, list(rcpts[1])


# -- EHLO, STARTTLS, AUTH ------------------------------------------------------------------


async def test_ehlo_advertises_extensions_and_hides_auth_before_starttls(relay: StartRelay, settings: Settings) -> None:
    handle = await relay(STARTTLS, trusted_networks=LOOPBACK_UNTRUSTED)
    client = _client(handle)
    await client.connect()
    try:
        await client.ehlo()
        ext = client.esmtp_extensions
        for name in ("size", "pipelining", "8bitmime", "smtputf8", "starttls"):
            assert name in ext, (name, ext)
        assert ext["size"] == str(settings.smtp.max_message_size)
        assert "auth" not in ext
        refused = await client.execute_command(b"AUTH", b"PLAIN", base64.b64encode(b"\0api\0x"))
        assert refused.code == 538
        await client.starttls()
        await client.ehlo()
        assert "starttls" not in client.esmtp_extensions
        assert set(client.esmtp_extensions["auth"].split()) == {"PLAIN", "LOGIN"}
    finally:
        client.close()
    key_file = next((settings.home / "tls").glob("*.key"))
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600


async def test_starttls_auth_plain_stores_message_byte_exact(
    relay: StartRelay, pool: asyncpg.Pool, settings: Settings
) -> None:
    secret, key_id = await ApiKeys(pool).create("app1", ["send"])
    handle = await relay(STARTTLS, trusted_networks=LOOPBACK_UNTRUSTED)
    client = _client(handle)
    await client.connect()
    try:
        await client.starttls()
        await client.ehlo()
        await client.auth_plain("api", secret)
        with capture_logs() as logs:
            message_id = await _send(client, rcpts=["bob@example.net", "Carol@Example.NET"])
    finally:
        client.close()
    msg, rcpts = await _stored(pool, settings, message_id)
    assert _untraced(msg["raw"]) == RAW
    assert msg["source"] == "smtp" and msg["api_key_id"] == key_id
    assert msg["stream"] == settings.smtp.default_stream
    assert sorted(r["address"] for r in rcpts) == ["Carol@example.net", "bob@example.net"]
    accepted = [e for e in logs if e["event"] == "smtp_message_accepted"]
    assert accepted and accepted[0]["message_id"] == str(message_id)
    assert accepted[0]["recipients"] == 2 and accepted[0]["size"] == len(RAW)
    assert accepted[0]["api_key"] == "app1" and accepted[0]["listener"] == "submission"


async def test_starttls_auth_login_with_key_name(relay: StartRelay, pool: asyncpg.Pool, settings: Settings) -> None:
    secret, key_id = await ApiKeys(pool).create("billing", ["send"])
    handle = await relay(STARTTLS, trusted_networks=LOOPBACK_UNTRUSTED)
    client = _client(handle)
    await client.connect()
    try:
        await client.starttls()
        await client.ehlo()
        await client.auth_login("billing", secret)
        message_id = await _send(client)
    finally:
        client.close()
    msg, _ = await _stored(pool, settings, message_id)
    assert _untraced(msg["raw"]) == RAW and msg["api_key_id"] == key_id


async def test_wrong_key_wrong_user_and_missing_scope_get_535(relay: StartRelay, pool: asyncpg.Pool) -> None:
    secret, _ = await ApiKeys(pool).create("app1", ["send"])
    read_only, _ = await ApiKeys(pool).create("reader", ["read"])
    handle = await relay(STARTTLS, trusted_networks=LOOPBACK_UNTRUSTED)
    for user, password in (("api", "ek_wrong"), ("someone-else", secret), ("api", read_only)):
        client = _client(handle)
        await client.connect()
        try:
            await client.starttls()
            await client.ehlo()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as info:
                await client.auth_plain(user, password)
            assert info.value.code == 535 and "5.7.8" in info.value.message
            if password == read_only:
                assert "send scope" in info.value.message
            # Still unauthenticated, and loopback is not trusted here: no relaying.
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await client.mail("zoe@example.test")
            assert refused.value.code == 530
        finally:
            client.close()


async def test_trusted_listener_offers_auth_without_tls(relay: StartRelay, pool: asyncpg.Pool, settings: Settings) -> None:
    secret, key_id = await ApiKeys(pool).create("app1", ["send"])
    handle = await relay(TRUSTED, trusted_networks=LOOPBACK_UNTRUSTED)
    client = _client(handle)
    await client.connect()
    try:
        await client.ehlo()
        assert "starttls" not in client.esmtp_extensions
        assert "PLAIN" in client.esmtp_extensions["auth"]
        await client.auth_login("api", secret)
        message_id = await _send(client)
    finally:
        client.close()
    msg, _ = await _stored(pool, settings, message_id)
    assert msg["api_key_id"] == key_id


async def test_revoked_key_stops_an_authenticated_session(relay: StartRelay, pool: asyncpg.Pool) -> None:
    """Revocation (here by another ApiKeys, as the CLI would) reaches open sessions within key_cache_ttl."""
    secret, _ = await ApiKeys(pool).create("app1", ["send"])
    handle = await relay(TRUSTED, trusted_networks=LOOPBACK_UNTRUSTED, key_cache_ttl=0.2)
    client = _client(handle)
    await client.connect()
    try:
        await client.ehlo()
        await client.auth_plain("api", secret)
        await _send(client)
        assert await ApiKeys(pool).revoke("app1")
        await asyncio.sleep(0.5)  # past the relay's key_cache_ttl
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await client.sendmail("zoe@example.test", ["bob@example.net"], RAW)
        assert refused.value.code == 530 and "5.7.0" in refused.value.message
        # The session's authentication is gone: AUTH is offered again (and the revoked key fails it).
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as again:
            await client.auth_plain("api", secret)
        assert again.value.code == 535
    finally:
        client.close()
    assert await _message_count(pool) == 1


async def test_repeated_auth_failures_disconnect(relay: StartRelay) -> None:
    handle = await relay(TRUSTED, trusted_networks=LOOPBACK_UNTRUSTED)
    raw = await Raw.connect(handle)
    try:
        assert (await raw.cmd("EHLO client.test"))[0] == 250
        bad = base64.b64encode(b"\0api\0ek_not-a-key").decode()
        assert (await raw.cmd(f"AUTH PLAIN {bad}"))[0] == 535
        assert (await raw.cmd("AUTH PLAIN {}".format(base64.b64encode(b"no-nul-separators").decode())))[0] == 501
        assert (await raw.cmd(f"AUTH PLAIN {bad}"))[0] == 535
        code, text = await raw.cmd(f"AUTH PLAIN {bad}")
        assert code == 421 and "4.7.0" in text
        assert await raw.closed_by_server()
    finally:
        await raw.close()


# -- relay policy ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["global", "listener", "untrusted-listener"])
async def test_unauthenticated_untrusted_client_gets_530(relay: StartRelay, pool: asyncpg.Pool, where: str) -> None:
    if where == "global":
        # A trusted listener without its own list inherits [smtp] trusted_networks, here not loopback.
        handle = await relay(TRUSTED, trusted_networks=LOOPBACK_UNTRUSTED)
    elif where == "listener":
        # [smtp] trusts loopback, but this listener's own trusted_networks = [] wins.
        handle = await relay(TRUSTED.model_copy(update={"trusted_networks": []}))
    else:
        # [smtp] trusts loopback (the default), but an untrusted listener that lists no
        # networks of its own does not inherit them: it trusts nobody by address.
        handle = await relay(SmtpListener(name="submission", listen=("127.0.0.1", 0)))
    raw = await Raw.connect(handle)
    try:
        assert (await raw.cmd("EHLO client.test"))[0] == 250
        code, text = await raw.cmd("MAIL FROM:<zoe@example.test>")
        assert code == 530 and "5.7.0" in text
        assert (await raw.cmd("RCPT TO:<bob@example.net>"))[0] in (503, 530)
        assert (await raw.cmd("DATA"))[0] == 503
    finally:
        await raw.close()
    assert await _message_count(pool) == 0


async def test_trusted_network_relays_without_auth(relay: StartRelay, pool: asyncpg.Pool, settings: Settings) -> None:
    handle = await relay(PLAIN)  # the listener's trusted_networks include 127.0.0.0/8
    client = _client(handle)
    await client.connect()
    try:
        message_id = await _send(client)
    finally:
        client.close()
    msg, rcpts = await _stored(pool, settings, message_id)
    assert msg["api_key_id"] is None and _untraced(msg["raw"]) == RAW
    assert [r["address"] for r in rcpts] == ["bob@example.net"]


async def test_trusted_listener_inherits_smtp_trusted_networks(relay: StartRelay, pool: asyncpg.Pool) -> None:
    handle = await relay(TRUSTED)  # no trusted_networks of its own; [smtp] default includes 127.0.0.0/8
    client = _client(handle)
    await client.connect()
    try:
        await _send(client)
    finally:
        client.close()
    assert await _message_count(pool) == 1


@pytest.mark.parametrize("allowed", [False, True])
async def test_address_literal_recipients_refused_unless_allowed(
    relay: StartRelay, pool: asyncpg.Pool, allowed: bool
) -> None:
    handle = await relay(PLAIN, allow_address_literals=allowed)
    raw = await Raw.connect(handle)
    try:
        assert (await raw.cmd("EHLO client.test"))[0] == 250
        assert (await raw.cmd("MAIL FROM:<zoe@example.test>"))[0] == 250
        for literal in ("user@[127.0.0.1]", "user@[IPv6:::1]", "user@[192.0.2.1]"):
            code, text = await raw.cmd(f"RCPT TO:<{literal}>")
            if allowed:
                assert code == 250, text
            else:
                assert code == 553 and "5.7.1" in text and "literal" in text.lower(), text
        assert (await raw.cmd("RCPT TO:<bob@example.net>"))[0] == 250
        assert (await raw.cmd("RSET"))[0] == 250
    finally:
        await raw.close()
    assert await _message_count(pool) == 0


async def test_null_sender_and_pipelining(relay: StartRelay, pool: asyncpg.Pool, settings: Settings) -> None:
    handle = await relay(PLAIN)
    raw = await Raw.connect(handle)
    try:
        assert (await raw.cmd("EHLO client.test"))[0] == 250
        raw.writer.write(b"MAIL FROM:<>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
        assert [(await raw.reply())[0] for _ in range(3)] == [250, 250, 354]
        code, text = await raw.cmd(b"Subject: bounce\r\n\r\nbody\r\n.")
        assert code == 250
    finally:
        await raw.close()
    m = QUEUED_RE.search(text)
    assert m
    msg, _ = await _stored(pool, settings, uuid.UUID(m.group(1)))
    assert msg["mail_from"] == "" and _untraced(msg["raw"], added=True) == b"Subject: bounce\r\n\r\nbody\r\n"


# -- replies for bad input -------------------------------------------------------------------


async def test_bad_addresses_get_553(relay: StartRelay) -> None:
    handle = await relay(PLAIN)
    raw = await Raw.connect(handle)
    try:
        assert (await raw.cmd("EHLO client.test"))[0] == 250
        code, text = await raw.cmd("MAIL FROM:<zoe@exa_mple.test>")
        assert code == 553 and "5.1.3" in text
        code, text = await raw.cmd("MAIL FROM:<zoë@example.test>")  # non-ASCII without SMTPUTF8
        assert code == 553
        assert (await raw.cmd("MAIL FROM:<zoe@example.test>"))[0] == 250
        code, text = await raw.cmd("RCPT TO:<no-domain>")
        assert code == 553 and "5.1.3" in text
        code, text = await raw.cmd("RCPT TO:<bob@-bad-.example>")
        assert code == 553 and "5.1.3" in text
        assert (await raw.cmd("RCPT TO:<bob@example.net>"))[0] == 250
    finally:
        await raw.close()


async def test_smtputf8_address_accepted(relay: StartRelay, pool: asyncpg.Pool, settings: Settings) -> None:
    handle = await relay(PLAIN)
    raw = await Raw.connect(handle)
    try:
        assert (await raw.cmd("EHLO client.test"))[0] == 250
        assert (await raw.cmd("MAIL FROM:<zoë@exämple.test> SMTPUTF8"))[0] == 250
        assert (await raw.cmd("RCPT TO:<björn@example.net>"))[0] == 250
        assert (await raw.cmd("DATA"))[0] == 354
        code, text = await raw.cmd("Subject: ü\r\n\r\nü\r\n.")
        assert code == 250, text
    finally:
        await raw.close()
    m = QUEUED_RE.search(text)
    assert m
    msg, rcpts = await _stored(pool, settings, uuid.UUID(m.group(1)))
    assert msg["mail_from"] == "zoë@exämple.test" and rcpts[0]["address"] == "björn@example.net"


async def test_over_size_gets_552_and_nothing_is_stored(relay: StartRelay, pool: asyncpg.Pool) -> None:
    handle = await relay(PLAIN, max_message_size=2000)
    raw = await Raw.connect(handle)
    try:
        code, text = await raw.cmd("EHLO client.test")
        assert "SIZE 2000" in text
        code, text = await raw.cmd("MAIL FROM:<zoe@example.test> SIZE=5000")
        assert code == 552 and "5.3.4" in text
        assert (await raw.cmd("MAIL FROM:<zoe@example.test>"))[0] == 250
        assert (await raw.cmd("RCPT TO:<bob@example.net>"))[0] == 250
        assert (await raw.cmd("DATA"))[0] == 354
        body = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"
        code, text = await raw.cmd(body * 40 + b".")
        assert code == 552 and "5.3.4" in text
        assert (await raw.cmd("NOOP"))[0] == 250  # the session goes on
    finally:
        await raw.close()
    assert await _message_count(pool) == 0


async def test_too_many_recipients_gets_452(relay: StartRelay, pool: asyncpg.Pool, settings: Settings) -> None:
    handle = await relay(PLAIN, max_recipients=2)
    raw = await Raw.connect(handle)
    try:
        assert (await raw.cmd("EHLO client.test"))[0] == 250
        assert (await raw.cmd("MAIL FROM:<zoe@example.test>"))[0] == 250
        assert (await raw.cmd("RCPT TO:<a@example.net>"))[0] == 250
        assert (await raw.cmd("RCPT TO:<b@example.net>"))[0] == 250
        code, text = await raw.cmd("RCPT TO:<c@example.net>")
        assert code == 452 and "4.5.3" in text
        assert (await raw.cmd("DATA"))[0] == 354
        code, text = await raw.cmd("Subject: two\r\n\r\nhi\r\n.")
        assert code == 250
    finally:
        await raw.close()
    m = QUEUED_RE.search(text)
    assert m
    _, rcpts = await _stored(pool, settings, uuid.UUID(m.group(1)))
    assert sorted(r["address"] for r in rcpts) == ["a@example.net", "b@example.net"]


async def test_syntax_errors_get_501_and_overlong_lines_500(relay: StartRelay) -> None:
    handle = await relay(PLAIN)
    raw = await Raw.connect(handle)
    try:
        assert (await raw.cmd("EHLO"))[0] == 501
        assert (await raw.cmd("EHLO client.test"))[0] == 250
        assert (await raw.cmd("MAIL FROM zoe@example.test"))[0] == 501
        assert (await raw.cmd("MAIL FROM:<zoe@example.test> BODY=9BIT"))[0] == 501
        assert (await raw.cmd("RCPT TO:<bob@example.net>"))[0] == 503  # no MAIL yet
        code, text = await raw.cmd("NOOP " + "x" * 2000)
        assert code == 500 and "too long" in text
        assert (await raw.cmd("QUIT"))[0] == 221
    finally:
        await raw.close()


# -- the DATA payload (read in chunks: engine.submit.data) ------------------------------------

# Everything that looks like an end of data but is not (bare LF/CR around the dot), lines with dots.
TRICKY = (
    b"From: zoe@example.test\r\nTo: bob@example.net\r\nSubject: chunks\r\nDate: Mon, 30 Nov 2026 03:00:00 +0000\r\n"
    b"Message-ID: <chunks@example.test>\r\n\r\n"
    + b"".join(b"line %d " % i + b"x" * (i % 90) + b"\r\n" for i in range(4000))
    + b"bare lf\n.\nstill body\r\n.\nstill body\n.\r\nstill body\r.\r\nstill body\r\n"
    + b"\r\n.\r.\r\n. \r\n"
)


def _stuffed(body: bytes) -> bytes:
    return (b"." + body[1:] if body.startswith(b".") else body).replace(b"\r\n.", b"\r\n..")


async def _stored_raw(pool: asyncpg.Pool, text: str) -> bytes:
    m = QUEUED_RE.search(text)
    assert m, text
    return bytes(await pool.fetchval("SELECT raw FROM messages WHERE id = $1", uuid.UUID(m.group(1))))


async def test_data_split_anywhere_is_stored_exactly(relay: StartRelay, pool: asyncpg.Pool) -> None:
    """A 260 KB payload written in odd pieces (the end of data split across writes) arrives byte-exact."""
    handle = await relay(PLAIN)
    raw = await Raw.connect(handle)
    try:
        assert (await raw.cmd("EHLO client.test"))[0] == 250
        for cut in (1, 2, 3, 4, 5):  # where the last write starts inside CRLF.CRLF
            assert (await raw.cmd("MAIL FROM:<zoe@example.test>"))[0] == 250
            assert (await raw.cmd("RCPT TO:<bob@example.net>"))[0] == 250
            assert (await raw.cmd("DATA"))[0] == 354
            wire = _stuffed(TRICKY) + b".\r\n"
            tail = len(wire) - cut
            for i in range(0, tail, 7919):
                raw.writer.write(wire[i : min(i + 7919, tail)])
                await raw.writer.drain()
            raw.writer.write(wire[tail:])
            code, text = await raw.reply()
            assert code == 250, text
            assert _untraced(await _stored_raw(pool, text)) == TRICKY
    finally:
        await raw.close()


async def test_commands_after_the_dot_in_the_same_packet_are_commands(relay: StartRelay, pool: asyncpg.Pool) -> None:
    """Pipelined commands behind the end of data are read as commands; a bare-LF 'end' inside is body."""
    handle = await relay(PLAIN)
    raw = await Raw.connect(handle)
    first = b"Subject: one\r\n\r\nsmuggled?\n.\r\nMAIL FROM:<eve@example.test>\r\n"
    second = b"Subject: two\r\n\r\n.dot\r\n"
    try:
        assert (await raw.cmd("EHLO client.test"))[0] == 250
        raw.writer.write(
            b"MAIL FROM:<zoe@example.test>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"
            + first + b".\r\n"
            + b"MAIL FROM:<zoe@example.test>\r\nRCPT TO:<carl@example.net>\r\nDATA\r\n"
            + _stuffed(second) + b".\r\nNOOP\r\n"
        )
        codes = [await raw.reply() for _ in range(8)]
        assert [c for c, _ in codes] == [250, 250, 354, 250, 250, 250, 354, 250], codes
        assert (await raw.reply())[0] == 250  # the NOOP
        one, two = await _stored_raw(pool, codes[3][1]), await _stored_raw(pool, codes[7][1])
        assert _untraced(one, added=True) == first
        assert _untraced(two, added=True) == second
    finally:
        await raw.close()
    assert await _message_count(pool) == 2


async def test_overlong_data_line_gets_500_after_the_payload(relay: StartRelay, pool: asyncpg.Pool) -> None:
    handle = await relay(PLAIN)
    raw = await Raw.connect(handle)
    try:
        assert (await raw.cmd("EHLO client.test"))[0] == 250
        assert (await raw.cmd("MAIL FROM:<zoe@example.test>"))[0] == 250
        assert (await raw.cmd("RCPT TO:<bob@example.net>"))[0] == 250
        assert (await raw.cmd("DATA"))[0] == 354
        code, text = await raw.cmd(b"Subject: long\r\n\r\n" + b"y" * 5000 + b"\r\nok\r\n.")
        assert code == 500 and "too long" in text
        assert (await raw.cmd("NOOP"))[0] == 250  # the session goes on
        # aiosmtpd's limit, kept: 1001 octets with the CRLF pass, 1002 do not (bare LF/CR count as octets).
        for content, expected in ((b"y" * 999, 250), (b"y" * 1000, 500), (b"y\n" * 500, 500), (b"y\r" * 499 + b"y", 250)):
            assert (await raw.cmd("MAIL FROM:<zoe@example.test>"))[0] == 250
            assert (await raw.cmd("RCPT TO:<bob@example.net>"))[0] == 250
            assert (await raw.cmd("DATA"))[0] == 354
            code, text = await raw.cmd(b"Subject: edge\r\n\r\nok\r\n" + content + b"\r\n.")
            assert code == expected, (len(content), text)
    finally:
        await raw.close()
    assert await _message_count(pool) == 2


def test_long_line_check_agrees_with_splitting_at_crlf() -> None:
    """The rfind walk of :func:`has_long_line` against the obvious split, on random mixes of line breaks."""
    rng = random.Random(14)
    pieces = [b"a" * 7, b"a" * 400, b"a" * 998, b"a" * 1001, b"\r\n", b"\n", b"\r", b"\r\n\r\n"]
    for _ in range(2000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        for limit in (0, 3, 999):
            assert has_long_line(data, limit) == (max(map(len, data.split(b"\r\n"))) > limit), (data, limit)


# -- failure and shutdown --------------------------------------------------------------------


async def test_disconnect_mid_data_leaves_nothing_queued(relay: StartRelay, pool: asyncpg.Pool) -> None:
    handle = await relay(PLAIN)
    raw = await Raw.connect(handle)
    assert (await raw.cmd("EHLO client.test"))[0] == 250
    assert (await raw.cmd("MAIL FROM:<zoe@example.test>"))[0] == 250
    assert (await raw.cmd("RCPT TO:<bob@example.net>"))[0] == 250
    assert (await raw.cmd("DATA"))[0] == 354
    raw.writer.write(b"Subject: cut off\r\n\r\nhalf a messa")
    await raw.writer.drain()
    await raw.close()
    client = _client(handle)  # a complete message afterwards proves the listener is fine
    await client.connect()
    try:
        await _send(client)
    finally:
        client.close()
    await handle.close()  # waits for any in-flight commit
    assert await _message_count(pool) == 1


async def test_database_down_gets_451_then_recovers(
    relay: StartRelay, pg_cluster: Any, pg_template: str, settings: Settings
) -> None:
    name = f"t_smtp_down_{uuid.uuid4().hex[:12]}"
    admin = await pg_cluster.admin()
    db: asyncpg.Pool | None = None
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
        db = await create_pool(pg_cluster.dsn(name), settings, min_size=1, max_size=2)
        handle = await relay(PLAIN, db=db)
        client = _client(handle)
        await client.connect()
        try:
            await _send(client)
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            with pytest.raises(aiosmtplib.SMTPDataError) as info:
                await _send(client)
            assert info.value.code == 451 and "4.3.0" in info.value.message
            assert "try again later" in info.value.message
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
            message_id = await _send(client)  # same listener, same connection
        finally:
            client.close()
        assert await _message_count(db) == 1
        msg, _ = await _stored(db, settings, message_id)
        assert _untraced(msg["raw"]) == RAW
    finally:
        if db is not None:
            db.terminate()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_close_stops_accepting_and_drops_idle_connections(relay: StartRelay) -> None:
    handle = await relay(PLAIN)
    idle = await Raw.connect(handle)
    await handle.close()
    assert await idle.closed_by_server()
    await idle.close()
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection(*handle.address), IO_TIMEOUT)


async def test_unreachable_database_gets_451_and_auth_454(relay: StartRelay, settings: Settings, pool: asyncpg.Pool) -> None:
    import socket

    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    dead = await create_pool(
        f"postgresql://nobody@127.0.0.1:{dead_port}/nothing", settings, min_size=0, max_size=1, timeout=2
    )
    try:
        handle = await relay(TRUSTED, db=dead)
        raw = await Raw.connect(handle)
        try:
            assert (await raw.cmd("EHLO client.test"))[0] == 250
            creds = base64.b64encode(b"\0api\0ek_whatever").decode()
            code, text = await raw.cmd(f"AUTH PLAIN {creds}")
            assert code == 454 and "4.7.0" in text
            # loopback is a trusted network by default: relaying needs no AUTH, but the commit fails
            assert (await raw.cmd("MAIL FROM:<zoe@example.test>"))[0] == 250
            assert (await raw.cmd("RCPT TO:<bob@example.net>"))[0] == 250
            assert (await raw.cmd("DATA"))[0] == 354
            code, text = await raw.cmd(b"Subject: x\r\n\r\nbody\r\n.")
            assert code == 451 and "4.3.0 Database unavailable" in text and "try again later" in text
            assert (await raw.cmd("NOOP"))[0] == 250  # the session and the listener live on
        finally:
            await raw.close()
    finally:
        dead.terminate()
    assert await _message_count(pool) == 0


def test_self_signed_certificate_is_cached_and_repaired(tmp_path: Any) -> None:
    from engine.submit.tls import ensure_self_signed, server_context

    cert, key = ensure_self_signed(tmp_path, "mx.example.test")
    first = cert.read_bytes()
    assert ensure_self_signed(tmp_path, "mx.example.test") == (cert, key)
    assert cert.read_bytes() == first  # reused, not regenerated
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    other_cert, other_key = ensure_self_signed(tmp_path / "other", "mx.example.test")
    key.write_bytes(other_key.read_bytes())  # a pair that does not match is replaced
    ensure_self_signed(tmp_path, "mx.example.test")
    assert cert.read_bytes() != first
    server_context(cert, key)  # loads: the pair matches again


async def test_start_errors_are_clear(settings: Settings, pool: asyncpg.Pool, tmp_path: Any) -> None:
    from engine.errors import ConfigError
    from engine.submit.server import ListenerError

    acceptor = Acceptor(settings, Outbox(pool, settings.queue.max_age))
    busy = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    try:
        port = busy.sockets[0].getsockname()[1]
        taken = SmtpListener(name="taken", listen=("127.0.0.1", port))
        with pytest.raises(ListenerError, match="taken"):
            await start_smtp_listeners(_variant(settings, [PLAIN, taken]), acceptor, ApiKeys(pool))
    finally:
        busy.close()
        await busy.wait_closed()
    missing = SmtpListener(
        name="tls", listen=("127.0.0.1", 0), tls="starttls", cert_file=tmp_path / "no.crt", key_file=tmp_path / "no.key"
    )
    with pytest.raises(ConfigError, match="no.crt|no.key"):
        await start_smtp_listeners(_variant(settings, [missing]), acceptor, ApiKeys(pool))
