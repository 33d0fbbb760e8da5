"""Hardening (issue 16, adversarial run): each test attacks over real sockets."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from types import SimpleNamespace

import httpx

from engine.compose.dkim import keygen
from engine.deliver.scheduler import DeliveryWorker
from tests.receivers import smtp_receiver, tls_ca  # noqa: F401
from tests.test_dkim import dkimpy_results


async def _deliver_all(eng, mx, n: int) -> None:
    w = DeliveryWorker(eng.settings, eng.pool, owner="w1", dsn=eng.dsn)
    t = asyncio.create_task(w.run())
    try:
        deadline = time.monotonic() + 30
        while len(mx.messages) < n:
            assert time.monotonic() < deadline, f"{len(mx.messages)} of {n}"
            await asyncio.sleep(0.05)
    finally:
        w.request_stop()
        await t


async def test_bare_cr_message_is_signed_as_it_is_sent(engine_factory, smtp_receiver, tmp_path: Path) -> None:
    """The signer used to normalise bare LF only; the client turned bare CR into CRLF after signing."""
    mx = smtp_receiver()
    path, txt = keygen("example.com", "s1", "rsa", tmp_path / "keys")
    keys = SimpleNamespace(txt={"s1._domainkey.example.com": "".join(re.findall(r'"([^"]*)"', txt))})
    keys.dnsfunc = lambda name, timeout=5: (keys.txt.get(name.decode().rstrip(".")) or "").encode() or None
    eng = await engine_factory(
        f'[webhooks]\nenabled = false\n[routing.static]\n"example.net" = "{mx.address}:{mx.port}"\n'
        '[delivery]\nflush_interval = "20ms"\npoll_interval = "100ms"\n'
        f'[[domains]]\nname = "example.com"\n[[domains.dkim]]\nselector = "s1"\nalgorithm = "rsa-sha256"\nkey_file = "{path}"\n'
    )
    key, _ = await eng.apikeys.create("k", ["send"])
    raw = ("From: a@example.com\r\nTo: x@example.net\r\nSubject: cr\r\n\r\n"
           "line one\rstill line one?\r\nline two\nline three\r\n")
    async with httpx.AsyncClient(base_url=f"http://{eng.http_address[0]}:{eng.http_address[1]}",
                                 headers={"Authorization": f"Bearer {key}"}) as http:
        r = await http.post("/v1/messages", json={"raw": raw, "envelope": {"mail_from": "a@example.com",
                                                                             "rcpt_to": ["x@example.net"]}})
        assert r.status_code == 202, r.text
    await _deliver_all(eng, mx, 1)
    got = mx.messages[0].data
    assert b"\r" not in got.replace(b"\r\n", b"") and b"\n" not in got.replace(b"\r\n", b"")
    assert dkimpy_results(keys, got) == [True]


async def test_relayed_mail_gains_received_date_and_message_id_and_stays_byte_exact(engine_factory, smtp_receiver) -> None:
    """RFC 5321 §4.4 / RFC 6409 §8: trace on top, Date and Message-ID added only when missing."""
    import aiosmtplib

    mx = smtp_receiver()
    eng = await engine_factory(
        f'[webhooks]\nenabled = false\n[routing.static]\n"example.net" = "{mx.address}:{mx.port}"\n'
        '[delivery]\nflush_interval = "20ms"\npoll_interval = "100ms"\n[server]\nhostname = "mta.sender.test"\n'
        '[[smtp.listeners]]\nname = "local"\nlisten = "127.0.0.1:0"\ntrusted = true\n'
    )
    host, port = eng.smtp_addresses["local"]
    bare = b"Subject: no date\r\nX-Odd:  keep   spacing \r\n\r\nbody line\r\n"
    dated = b"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nMessage-ID: <mine@client.test>\r\nSubject: dated\r\n\r\nb\r\n"
    async with aiosmtplib.SMTP(hostname=host, port=port, local_hostname="client.example") as smtp:
        for data in (bare, dated):
            errors, _ = await smtp.sendmail("app@sender.test", ["x@example.net"], data)
            assert not errors
    await _deliver_all(eng, mx, 2)
    first, second = sorted((m.data for m in mx.messages), key=lambda d: b"dated" in d)
    assert first.startswith(b"Received: from client.example (127.0.0.1)\r\n\tby mta.sender.test with ESMTP id ")
    head, _, body = first.partition(b"\r\n\r\n")
    assert body == b"body line\r\n"
    assert b"\r\nSubject: no date\r\nX-Odd:  keep   spacing \r\n" in head + b"\r\n"
    assert len(re.findall(rb"(?m)^Date: ", head)) == 1 and len(re.findall(rb"(?m)^Message-ID: <[0-9a-f]{32}@mta.sender.test>", head)) == 1
    h2, _, _ = second.partition(b"\r\n\r\n")
    assert h2.count(b"Date:") == 1 and b"Message-ID: <mine@client.test>" in h2 and h2.startswith(b"Received: ")
    assert second.endswith(dated)  # everything the client sent, byte for byte, after the trace field


async def test_connections_beyond_the_session_cap_get_421_and_the_others_still_work(engine_factory) -> None:
    """3,000 idle unauthenticated connections were all accepted; now a listener caps them."""
    eng = await engine_factory('[webhooks]\nenabled = false\n[smtp]\nmax_sessions = 20\n'
                               '[[smtp.listeners]]\nname = "local"\nlisten = "127.0.0.1:0"\ntrusted = true\n')
    host, port = eng.smtp_addresses["local"]
    idle = []
    for _ in range(20):
        r, w = await asyncio.open_connection(host, port)
        assert (await r.readline()).startswith(b"220 ")
        idle.append((r, w))
    refused = []
    for _ in range(5):
        r, w = await asyncio.open_connection(host, port)
        refused.append(await r.readline())
        assert await r.read() == b""  # closed by the server
        w.close()
    assert all(line.startswith(b"421 4.7.0") for line in refused), refused
    # Those already in are served as usual; a slot frees when one leaves.
    r, w = idle[0]
    w.write(b"EHLO client.test\r\n")
    await w.drain()
    assert (await r.readline()).startswith(b"250")
    w.close()
    await w.wait_closed()
    deadline = time.monotonic() + 10
    while True:
        r2, w2 = await asyncio.open_connection(host, port)
        line = await r2.readline()
        w2.close()
        if line.startswith(b"220 ") or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert line.startswith(b"220 ")
    for _, w in idle[1:]:
        w.close()


# 8-bit UTF-8 text, a NUL and a 999-octet line: what RFC 6152 / RFC 5321 4.5.3.1.6 keep off 7-bit SMTP.
EIGHT_BIT = (b"From: a@example.com\r\nTo: x@example.net\r\nSubject: 8bit\r\nMessage-ID: <8bit@example.com>\r\n"
             b"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
             b"Content-Transfer-Encoding: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n.dot line\r\n")
BINARY = EIGHT_BIT + b"nul \x00 here\r\n" + b"y" * 999 + b"\r\nend\r\n"


async def test_eight_bit_mail_is_converted_for_a_7bit_receiver_and_stays_signed(
    engine_factory, smtp_receiver, tmp_path: Path
) -> None:
    """Issue 16 #13: 8-bit bodies, NUL and 999-octet lines went out unconverted to a receiver without 8BITMIME."""
    import email
    import email.policy

    import aiosmtplib

    from engine.compose.sevenbit import body_class
    from tests.receivers import Behaviour

    seven = smtp_receiver(Behaviour(eightbitmime=False))
    eight = smtp_receiver()
    path, txt = keygen("example.com", "s1", "rsa", tmp_path / "keys")
    keys = SimpleNamespace(txt={"s1._domainkey.example.com": "".join(re.findall(r'"([^"]*)"', txt))})
    keys.dnsfunc = lambda name, timeout=5: (keys.txt.get(name.decode().rstrip(".")) or "").encode() or None
    eng = await engine_factory(
        f'[webhooks]\nenabled = false\n[routing.static]\n"seven.test" = "{seven.address}:{seven.port}"\n'
        f'"eight.test" = "{eight.address}:{eight.port}"\n'
        '[delivery]\nflush_interval = "20ms"\npoll_interval = "100ms"\n'
        '[[smtp.listeners]]\nname = "local"\nlisten = "127.0.0.1:0"\ntrusted = true\n'
        f'[[domains]]\nname = "example.com"\n[[domains.dkim]]\nselector = "s1"\nalgorithm = "rsa-sha256"\nkey_file = "{path}"\n'
    )
    host, port = eng.smtp_addresses["local"]
    async with aiosmtplib.SMTP(hostname=host, port=port, local_hostname="client.example") as smtp:
        for data, rcpt in ((EIGHT_BIT, "a@seven.test"), (BINARY, "b@seven.test"),
                           (EIGHT_BIT, "c@eight.test"), (BINARY, "d@eight.test")):
            errors, _ = await smtp.sendmail("a@example.com", [rcpt], data, mail_options=["BODY=8BITMIME"])
            assert not errors
    w = DeliveryWorker(eng.settings, eng.pool, owner="w1", dsn=eng.dsn)
    t = asyncio.create_task(w.run())
    try:
        deadline = time.monotonic() + 30
        while len(seven.messages) < 2 or len(eight.messages) < 2:
            assert time.monotonic() < deadline, (len(seven.messages), len(eight.messages))
            await asyncio.sleep(0.05)
    finally:
        w.request_stop()
        await t
    got = {m.rcpt_tos[0]: m for m in [*seven.messages, *eight.messages]}
    for rcpt, sent in (("a@seven.test", EIGHT_BIT), ("b@seven.test", BINARY), ("d@eight.test", BINARY)):
        m = got[rcpt]
        assert body_class(m.data) == "7bit", rcpt  # ASCII, no NUL, no line over 998 octets
        assert "BODY=8BITMIME" not in m.mail_options
        assert dkimpy_results(keys, m.data) == [True], rcpt
        parsed = email.message_from_bytes(m.data, policy=email.policy.compat32)
        assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
        assert parsed.get_payload(decode=True) == sent.partition(b"\r\n\r\n")[2], rcpt
    m = got["c@eight.test"]  # the receiver takes 8-bit: the client's bytes, unchanged
    assert "BODY=8BITMIME" in m.mail_options
    assert m.data.endswith(EIGHT_BIT)
    assert dkimpy_results(keys, m.data) == [True]
