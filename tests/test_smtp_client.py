"""The outbound SMTP client against real aiosmtpd receivers on 127.0.0.x.

Faults come from the receivers (tests/receivers.py), never from patching the
client: refused connections, 421 banners, greylisting, rejected users, a
dropped connection at end of data, slow answers, STARTTLS offered or not.
"""

from __future__ import annotations

import asyncio
import ssl

import pytest
import structlog

from engine.deliver.smtp import (
    ConnectionPool,
    OutboundMessage,
    SmtpClientSettings,
    kind_of,
    parse_enhanced_status,
)
from tests.receivers import Behaviour, refusing_endpoint, smtp_receiver, tls_ca  # noqa: F401

FAST = dict(
    connect_timeout=2,
    banner_timeout=2,
    ehlo_timeout=2,
    starttls_timeout=2,
    rset_timeout=2,
    mail_from_timeout=2,
    rcpt_to_timeout=2,
    data_timeout=2,
    data_block_timeout=2,
    data_dot_timeout=2,
    quit_timeout=1,
    ehlo_name="client.test",
)


def settings(**overrides: object) -> SmtpClientSettings:
    return SmtpClientSettings(**{**FAST, **overrides})


def msg(
    *rcpts: str, body: bytes = b"Subject: hi\r\n\r\nhello\r\n", sender: str = "bounce@sender.test"
) -> OutboundMessage:
    return OutboundMessage(mail_from=sender, rcpt_tos=list(rcpts), data=body)


@pytest.fixture
async def pool():
    p = ConnectionPool(settings())
    yield p
    await p.close()


async def until(predicate, timeout: float = 5.0) -> bool:
    """Poll (bounded) for a condition that another task or thread makes true."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


def trusting_context(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def test_delivers_one_transaction_with_all_recipients(pool, smtp_receiver):
    rx = smtp_receiver()
    body = b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\nend\r\n"
    with structlog.testing.capture_logs() as logs:
        result = await pool.send([rx.hop()], msg("a@example.test", "b@example.test", body=body))
    assert [r.kind for r in result.results] == ["delivered", "delivered"]
    assert result.data_reply is not None and result.data_reply.code == 250
    r = result.for_recipient("a@example.test")
    assert (r.code, r.enhanced_status, r.phase) == (250, "2.0.0", "dot")
    assert r.reply.startswith("250 2.0.0 OK queued as")
    assert len(rx.messages) == 1
    got = rx.messages[0]
    assert got.rcpt_tos == ("a@example.test", "b@example.test")
    assert got.mail_from == "bounce@sender.test"
    assert got.data == body  # dot-stuffing undone by the receiver: bytes identical
    assert got.ehlo_name == "client.test"
    assert any(o.startswith("SIZE=") for o in got.mail_options)
    assert rx.verbs().count("MAIL") == 1
    assert rx.pipelined_mail == 1  # MAIL and both RCPTs went out in one write
    lines = [e for e in logs if e["event"] == "smtp.transaction"]
    assert len(lines) == 1 and lines[0]["code"] == 250 and lines[0]["host"] == result.host
    assert "duration_ms" in lines[0]


async def test_reuses_one_connection_for_many_messages(pool, smtp_receiver):
    rx = smtp_receiver()
    for i in range(10):
        result = await pool.send([rx.hop()], msg(f"u{i}@example.test"))
        assert result.delivered == [f"u{i}@example.test"]
        assert result.reused == (i > 0)
    assert rx.sessions == 1
    assert rx.transactions == {1: 10}
    assert "RSET" not in rx.verbs()  # nothing failed, so no RSET between transactions


async def test_max_deliveries_per_connection(smtp_receiver):
    rx = smtp_receiver()
    async with ConnectionPool(settings(max_deliveries_per_connection=3)) as pool:
        for i in range(7):
            assert (await pool.send([rx.hop()], msg(f"u{i}@example.test"))).delivered
    assert await rx.wait_idle()
    assert rx.sessions == 3
    assert sorted(rx.transactions.values()) == [1, 3, 3]
    assert rx.verbs(1)[-1] == "QUIT" and rx.verbs(2)[-1] == "QUIT"


async def test_connection_limit_holds_under_50_concurrent_sends(smtp_receiver):
    rx = smtp_receiver(Behaviour(delay={"data": 0.01}))
    async with ConnectionPool(settings(connection_limit=3)) as pool:
        results = await asyncio.wait_for(
            asyncio.gather(*(pool.send([rx.hop()], msg(f"u{i}@example.test")) for i in range(50))), 30
        )
        assert pool.open_connections() <= 3
    assert all(r.delivered for r in results)
    assert len(rx.messages) == 50
    assert rx.max_concurrent <= 3
    assert rx.sessions <= 3


async def test_421_banner_is_temporary_for_every_recipient(pool, smtp_receiver):
    rx = smtp_receiver(Behaviour(connect_reply="421 4.3.2 Service not available, closing channel"))
    result = await pool.send([rx.hop()], msg("a@example.test", "b@example.test"))
    for r in result.results:
        assert (r.kind, r.code, r.enhanced_status, r.phase) == ("temporary", 421, "4.3.2", "greeting")
        assert "Service not available" in r.reply
    assert rx.messages == []


async def test_greylisting_then_delivered_on_retry_with_rset(pool, smtp_receiver):
    rx = smtp_receiver(Behaviour(greylist=True))
    first = await pool.send([rx.hop()], msg("a@example.test"))
    r = first.results[0]
    assert (r.kind, r.code, r.enhanced_status, r.phase) == ("temporary", 451, "4.7.1", "rcpt")
    assert "Greylisted" in r.reply
    second = await pool.send([rx.hop()], msg("a@example.test"))
    assert second.delivered == ["a@example.test"]
    assert rx.sessions == 1
    # The failed envelope was reset before the next MAIL, and DATA was never sent for it.
    assert rx.verbs(1) == ["MAIL", "RCPT", "RSET", "MAIL", "RCPT", "DATA"]


async def test_one_rejected_recipient_of_three(pool, smtp_receiver):
    rx = smtp_receiver(Behaviour(reject_users={"ghost@example.test"}))
    result = await pool.send([rx.hop()], msg("a@example.test", "ghost@example.test", "c@example.test"))
    ghost = result.for_recipient("ghost@example.test")
    assert (ghost.kind, ghost.code, ghost.enhanced_status, ghost.phase) == ("permanent", 550, "5.1.1", "rcpt")
    assert ghost.reply == "550 5.1.1 The email account that you tried to reach does not exist"
    assert result.delivered == ["a@example.test", "c@example.test"]
    assert rx.messages[0].rcpt_tos == ("a@example.test", "c@example.test")


async def test_all_recipients_rejected_sends_no_data(pool, smtp_receiver):
    rx = smtp_receiver(Behaviour(reject_users={"x@example.test", "y@example.test"}))
    result = await pool.send([rx.hop()], msg("x@example.test", "y@example.test"))
    assert [r.kind for r in result.results] == ["permanent", "permanent"]
    assert result.data_reply is None
    assert "DATA" not in rx.verbs()
    # The session stays usable for the next message.
    assert (await pool.send([rx.hop()], msg("ok@example.test"))).delivered == ["ok@example.test"]
    assert rx.sessions == 1


async def test_dropped_connection_at_end_of_data_then_pool_recovers(pool, smtp_receiver):
    rx = smtp_receiver(Behaviour(drop_data=1))
    first = await pool.send([rx.hop()], msg("a@example.test"))
    r = first.results[0]
    assert (r.kind, r.code, r.phase) == ("temporary", None, "dot")
    assert "lost during end of data" in r.reply and rx.address in r.reply
    second = await pool.send([rx.hop()], msg("a@example.test"))
    assert second.delivered == ["a@example.test"]
    assert rx.dropped == 1 and rx.sessions == 2
    assert pool.open_connections() == 1


async def test_slow_rcpt_reply_times_out_as_temporary(smtp_receiver):
    rx = smtp_receiver(Behaviour(delay={"rcpt": 3}))
    async with ConnectionPool(settings(rcpt_to_timeout=0.3)) as pool:
        result = await pool.send([rx.hop()], msg("a@example.test"))
        r = result.results[0]
        assert (r.kind, r.code, r.phase) == ("temporary", None, "rcpt")
        assert "timed out after 0.3s waiting for the reply to RCPT TO" in r.reply
        assert pool.open_connections() == 0  # a desynchronised session is never reused


async def test_slow_banner_times_out_as_temporary(smtp_receiver):
    rx = smtp_receiver(Behaviour(delay={"greeting": 3}))
    async with ConnectionPool(settings(banner_timeout=0.3)) as pool:
        r = (await pool.send([rx.hop()], msg("a@example.test"))).results[0]
    assert (r.kind, r.phase) == ("temporary", "greeting")
    assert "waiting for the banner" in r.reply


async def test_starttls_offered_is_used_and_session_reused(pool, smtp_receiver):
    rx = smtp_receiver(Behaviour(starttls=True))
    for i in range(3):
        result = await pool.send([rx.hop()], msg(f"u{i}@example.test"))
        assert result.delivered and result.tls
    assert [m.tls for m in rx.messages] == [True, True, True]
    assert rx.sessions == 1
    assert rx.verbs().count("STARTTLS") == 1


async def test_no_starttls_opportunistic_sends_plain(pool, smtp_receiver):
    rx = smtp_receiver()
    result = await pool.send([rx.hop()], msg("a@example.test"))
    assert result.delivered and not result.tls
    assert rx.messages[0].tls is False


async def test_no_starttls_but_required_is_temporary(pool, smtp_receiver):
    rx = smtp_receiver()
    r = (await pool.send([rx.hop()], msg("a@example.test"), tls="required")).results[0]
    assert (r.kind, r.phase) == ("temporary", "starttls")
    assert "TLS required" in r.reply and "does not offer STARTTLS" in r.reply
    assert rx.messages == []


async def test_required_tls_verifies_the_certificate(smtp_receiver, tls_ca):
    rx = smtp_receiver(Behaviour(starttls=True))
    async with ConnectionPool(settings(), tls_context=trusting_context(tls_ca)) as trusting:
        result = await trusting.send([rx.hop("mx.test")], msg("a@example.test"), tls="required")
        assert result.delivered and result.tls
    async with ConnectionPool(settings()) as untrusting:  # system CAs only: the test CA is unknown
        r = (await untrusting.send([rx.hop("mx.test")], msg("b@example.test"), tls="required")).results[0]
        assert (r.kind, r.phase) == ("temporary", "starttls")
        assert "TLS handshake" in r.reply
    assert [m.rcpt_tos for m in rx.messages] == [("a@example.test",)]


async def test_opportunistic_handshake_failure_retries_in_plain(pool, smtp_receiver):
    rx = smtp_receiver(Behaviour(tls_broken=True))
    with structlog.testing.capture_logs() as logs:
        result = await pool.send([rx.hop()], msg("a@example.test"))
    assert result.delivered and not result.tls
    assert rx.messages[0].tls is False
    assert any(e["event"] == "smtp.starttls_failed_retry_plain" for e in logs)


async def test_starttls_disabled_stays_plain(pool, smtp_receiver):
    rx = smtp_receiver(Behaviour(starttls=True))
    result = await pool.send([rx.hop()], msg("a@example.test"), tls="disabled")
    assert result.delivered and not result.tls
    assert "STARTTLS" not in rx.verbs()


async def test_source_address_binding(pool, smtp_receiver):
    rx = smtp_receiver()
    for source in ("127.0.0.1", "127.0.0.5"):
        assert (await pool.send([rx.hop()], msg("a@example.test"), source=source)).delivered
    assert [m.peer[0] for m in rx.messages] == ["127.0.0.1", "127.0.0.5"]
    assert rx.sessions == 2  # one pool key per source address


async def test_walks_mx_hops_until_one_accepts(pool, smtp_receiver, refusing_endpoint):
    address, port = refusing_endpoint()
    rx = smtp_receiver()
    result = await pool.send([("mx1.test", address, port), rx.hop("mx2.test")], msg("a@example.test"))
    assert result.delivered == ["a@example.test"]
    assert result.host == f"mx2.test[{rx.address}]:{rx.port}"


async def test_walks_past_a_421_banner(pool, smtp_receiver):
    busy = smtp_receiver(Behaviour(connect_reply="421 4.7.0 Try again later"))
    rx = smtp_receiver()
    result = await pool.send([busy.hop("mx1.test"), rx.hop("mx2.test")], msg("a@example.test"))
    assert result.delivered == ["a@example.test"]


async def test_all_hops_refuse(pool, refusing_endpoint):
    (a1, p1), (a2, p2) = refusing_endpoint(), refusing_endpoint()
    result = await pool.send([("mx1.test", a1, p1), ("mx2.test", a2, p2)], msg("a@example.test"))
    r = result.results[0]
    assert (r.kind, r.code, r.phase) == ("temporary", None, "connect")
    assert r.reply == f"connection refused by {a1}:{p1}; connection refused by {a2}:{p2}"
    assert pool.open_connections() == 0


async def test_custom_replies_keep_code_and_enhanced_status(pool, smtp_receiver):
    rx = smtp_receiver(Behaviour(replies={"rcpt": "452 4.5.3 Too many recipients"}))
    r = (await pool.send([rx.hop()], msg("a@example.test"))).results[0]
    assert (r.kind, r.code, r.enhanced_status, r.reply) == (
        "temporary",
        452,
        "4.5.3",
        "452 4.5.3 Too many recipients",
    )

    closing = smtp_receiver(Behaviour(replies={"mail": "421 4.7.0 Too many messages, closing"}))
    first = await pool.send([closing.hop()], msg("a@example.test", "b@example.test"))
    assert {(r.kind, r.code, r.enhanced_status, r.phase) for r in first.results} == {
        ("temporary", 421, "4.7.0", "mail")
    }
    await pool.send([closing.hop()], msg("a@example.test"))
    assert closing.sessions == 2  # a 421 ends the session; the next message opens a new one


async def test_data_rejection_is_per_message(pool, smtp_receiver):
    rx = smtp_receiver(Behaviour(replies={"data": "554 5.7.1 Message rejected as spam"}))
    result = await pool.send([rx.hop()], msg("a@example.test", "b@example.test"))
    assert {(r.kind, r.code, r.enhanced_status, r.phase) for r in result.results} == {
        ("permanent", 554, "5.7.1", "dot")
    }
    assert result.data_reply is not None and result.data_reply.code == 554


async def test_without_pipelining(pool, smtp_receiver):
    rx = smtp_receiver(Behaviour(pipelining=False, reject_users={"no@example.test"}))
    result = await pool.send([rx.hop()], msg("a@example.test", "no@example.test"))
    assert result.delivered == ["a@example.test"]
    assert result.for_recipient("no@example.test").code == 550
    assert rx.pipelined_mail == 0


async def test_idle_connections_are_closed(smtp_receiver):
    rx = smtp_receiver()
    async with ConnectionPool(settings(idle_timeout=0.2)) as pool:
        assert (await pool.send([rx.hop()], msg("a@example.test"))).delivered
        assert await rx.wait_idle(5)
        assert rx.verbs(1)[-1] == "QUIT"
        assert await until(lambda: pool.open_connections() == 0)
        assert (await pool.send([rx.hop()], msg("b@example.test"))).delivered
    assert rx.sessions == 2


async def test_server_dropping_a_pooled_connection_is_survived(pool, smtp_receiver):
    rx = smtp_receiver()
    assert (await pool.send([rx.hop()], msg("a@example.test"))).delivered
    rx.kick()
    assert (await pool.send([rx.hop()], msg("b@example.test"))).delivered
    assert rx.sessions == 2


async def test_close_sends_quit(smtp_receiver):
    rx = smtp_receiver()
    pool = ConnectionPool(settings())
    await pool.send([rx.hop()], msg("a@example.test"))
    await pool.close()
    assert await rx.wait_idle()
    assert rx.verbs()[-1] == "QUIT"


async def test_invalid_envelope_is_permanent_without_connecting(pool, smtp_receiver):
    rx = smtp_receiver()
    r = (await pool.send([rx.hop()], msg("a@example.test\r\nRSET"))).results[0]
    assert (r.kind, r.phase) == ("permanent", "local")
    assert rx.sessions == 0


def test_reply_helpers():
    assert parse_enhanced_status("5.1.1 user unknown") == "5.1.1"
    assert parse_enhanced_status("user unknown 5.1.1") is None
    assert [kind_of(c) for c in (250, 451, 550, None, 354)] == [
        "delivered",
        "temporary",
        "permanent",
        "temporary",
        "temporary",
    ]


async def test_unconvertible_8bit_message_to_a_7bit_receiver_is_refused_with_5_6_3(pool, smtp_receiver):
    """RFC 6152: convert or bounce. A raw 8-bit header cannot be converted: nothing is sent, 5.6.3."""
    from engine.compose.sevenbit import to_seven_bit

    rx = smtp_receiver(Behaviour(eightbitmime=False))
    body = b"Subject: K\xc3\xb6ln\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"
    message = OutboundMessage("bounce@sender.test", ["a@example.test"], body, lambda: to_seven_bit(body))
    result = await pool.send([rx.hop()], message)
    r = result.for_recipient("a@example.test")
    assert (r.kind, r.enhanced_status, r.phase) == ("permanent", "5.6.3", "local"), r
    assert "8BITMIME" in r.reply
    assert rx.messages == [] and "MAIL" not in rx.verbs()
    # A 7-bit-convertible one goes out converted; to an 8BITMIME receiver the bytes go unchanged.
    plain = b"Subject: ok\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"
    result = await pool.send([rx.hop()], OutboundMessage("bounce@sender.test", ["b@example.test"], plain,
                                                         lambda: to_seven_bit(plain)))
    assert result.results[0].kind == "delivered"
    assert rx.messages[0].data.endswith(b"\r\n\r\nGr=C3=BC=C3=9Fe\r\n")
    rx8 = smtp_receiver()
    result = await pool.send([rx8.hop()], OutboundMessage("bounce@sender.test", ["c@example.test"], plain,
                                                          lambda: to_seven_bit(plain)))
    assert result.results[0].kind == "delivered" and rx8.messages[0].data == plain
