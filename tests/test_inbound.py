"""The bounce/FBL listener over real sockets: real engine, real submissions, DSN and ARF mail via aiosmtplib.

Recipient rows come from real REST submissions; reports are built here as the
bytes a remote MTA would send (or taken from the Sisimai corpus and re-addressed),
sent to the listener with aiosmtplib, and their effect is read back from Postgres.
"""

from __future__ import annotations

import asyncio
import email
import json
import time
import uuid
from typing import Any

import aiosmtplib
import httpx
import pytest

from engine.compose.pipeline import Composer, MessageRow
from engine.compose.tracking import Keyring
from engine.config import load_settings
from engine.deliver.scheduler import DeliveryWorker
from engine.feedback.verp import Verp
from engine.outbox import Outcome
from tests.configs import BOUNCE_DOMAIN, BULK_WITHOUT_CONSENT, inbound_feedback
from tests.conftest import shared_corpus
from tests.receivers import smtp_receiver, tls_ca  # noqa: F401  (fixtures)

SECRET = "verp-test-secret-" + "v" * 32
CONFIG = inbound_feedback(SECRET) + 'max_message_size = "6MB"\n' + BULK_WITHOUT_CONSENT
VERP = Verp(BOUNCE_DOMAIN, {1: SECRET})


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Env:
    def __init__(self, eng: Any, client: httpx.AsyncClient, key: str) -> None:
        self.eng, self.client, self.key = eng, client, key

    @property
    def pool(self) -> Any:
        return self.eng.pool

    async def submit(self, to: list[str], stream: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"from": "app@sender.test", "to": to, "subject": "Hi", "text": "Hello"}
        if stream:
            body["stream"] = stream
        r = await self.client.post("/v1/messages", json=body, headers=auth(self.key))
        assert r.status_code == 202, r.text
        return r.json()

    async def deliver(self, rid: int) -> None:
        """Mark a row delivered the way a worker does: claim (lease) it, then ack."""
        rows = await self.eng.outbox.claim("test-worker", 100, 60)
        assert rid in [r["id"] for r in rows]
        outcomes = [Outcome(r["id"], "delivered", 250, "2.0.0", "250 2.0.0 OK") for r in rows if r["id"] == rid]
        await self.eng.outbox.ack("test-worker", outcomes)
        await self.eng.outbox.release("test-worker", [r["id"] for r in rows if r["id"] != rid])

    async def send(self, raw: bytes, rcpts: list[str], sender: str = "") -> tuple[int, str]:
        host, port = self.eng.inbound_address
        client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=30)
        async with client:
            errors, reply = await client.sendmail(sender, rcpts, raw)
        assert not errors, errors
        return 250, reply

    async def row(self, rid: int) -> Any:
        return await self.pool.fetchrow("SELECT * FROM recipients WHERE id = $1", rid)

    async def events(self, kind: str | None = None) -> list[Any]:
        if kind is None:  # what reports wrote: not the events of submitting and delivering the mail itself
            return await self.pool.fetch("SELECT * FROM events WHERE type NOT IN ('accepted', 'delivered') ORDER BY id")
        return await self.pool.fetch("SELECT * FROM events WHERE type = $1 ORDER BY id", kind)

    async def suppressions(self) -> list[tuple[str, str, str, str]]:
        rows = await self.pool.fetch("SELECT address, scope, reason, source FROM suppressions ORDER BY address, scope")
        return [tuple(r) for r in rows]


@pytest.fixture
async def env(engine_factory) -> Any:
    eng = await engine_factory(CONFIG)
    key, _ = await eng.apikeys.create("admin", ["admin"])
    host, port = eng.http_address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as client:
        yield Env(eng, client, key)


def dsn(
    recipient: str,
    *,
    to: str = "app@sender.test",
    status: str = "5.1.1",
    action: str = "failed",
    diagnostic: str = "smtp; 550 5.1.1 <{r}>: Recipient address rejected: User unknown in virtual mailbox table",
    original_headers: str = "",
    human: str = "I'm sorry to have to inform you that your message could not be delivered.",
) -> bytes:
    """An RFC 3464 report as Postfix writes it."""
    diag = diagnostic.format(r=recipient)
    return (
        "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\n"
        f"To: {to}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="BOUNDARY"\r\n'
        f"Message-Id: <{uuid.uuid4().hex}@mx.example.net>\r\n"
        "\r\n"
        "--BOUNDARY\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        f"{human}\r\n\r\n"
        "--BOUNDARY\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.net\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\n"
        f"Original-Recipient: rfc822;{recipient}\r\n"
        f"Action: {action}\r\n"
        f"Status: {status}\r\n"
        "Remote-MTA: dns; mail.example.net\r\n"
        f"Diagnostic-Code: {diag}\r\n\r\n"
        "--BOUNDARY\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        "From: app@sender.test\r\n"
        f"To: {recipient}\r\n"
        "Subject: Hi\r\n"
        f"{original_headers}"
        "\r\n--BOUNDARY--\r\n"
    ).encode()


def arf(recipient: str, *, original_headers: str = "", feedback_type: str = "abuse") -> bytes:
    """An RFC 5965 complaint as a mailbox provider's feedback loop sends it."""
    return (
        "From: staff@fbl.provider.example\r\n"
        "To: fbl@fbl.example.test\r\n"
        "Subject: FW: Hi\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="ARF"\r\n'
        "\r\n"
        "--ARF\r\nContent-Type: text/plain\r\n\r\n"
        "This is an email abuse report for an email message received from IP 127.0.0.9.\r\n\r\n"
        "--ARF\r\nContent-Type: message/feedback-report\r\n\r\n"
        f"Feedback-Type: {feedback_type}\r\n"
        "User-Agent: SomeGenerator/1.0\r\n"
        "Version: 1\r\n"
        f"Original-Rcpt-To: {recipient}\r\n"
        "Source-IP: 127.0.0.9\r\n\r\n"
        "--ARF\r\nContent-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n"
        f"{original_headers}"
        "From: app@sender.test\r\n"
        f"To: {recipient}\r\n"
        "Subject: Hi\r\n\r\n"
        "Hello\r\n"
        "--ARF--\r\n"
    ).encode()


# ------------------------------------------------------------------------------------- DSN


async def test_hard_bounce_via_verp_bounces_suppresses_and_stops_queued_mail(env) -> None:
    first = await env.submit(["Ann@example.net"])
    rid = first["recipients"][0]["id"]
    await env.deliver(rid)
    queued = await env.submit(["ann@example.net", "bob@example.net"])  # accepted before the bounce
    other_stream = await env.submit(["ann@example.net"], stream="transactional")

    await env.send(dsn("ann@example.net"), [VERP.return_path(rid)])

    row = await env.row(rid)
    assert row["state"] == "bounced"
    assert row["last_status"] == "5.1.1" and "User unknown" in row["last_reply"]
    [ev] = await env.events("bounced")
    assert ev["recipient_id"] == rid and str(ev["message_id"]) == first["id"]
    assert ev["data"]["category"] == "unknown_user" and ev["data"]["origin"] == "dsn"
    assert ev["data"]["permanent"] is True and ev["data"]["hard"] is True and ev["data"]["suppressed"] == "*"
    assert await env.suppressions() == [("ann@example.net", "*", "unknown_user", "bounce")]
    # Mail queued before the bounce, in every stream (global scope), is stopped; bob's is not.
    states = {r["address"]: r["state"] for r in await env.pool.fetch(
        "SELECT address, state FROM recipients WHERE message_id = ANY($1::uuid[])", [queued["id"], other_stream["id"]])}
    assert states == {"ann@example.net": "suppressed", "bob@example.net": "queued"}
    stopped = await env.events("suppressed")
    assert len(stopped) == 2 and all(e["data"]["pending"] for e in stopped)
    # Counted for reputation: one hard bounce for example.net from sender.test.
    rep = await env.pool.fetch("SELECT provider, sending_domain, outcome, category, n FROM reputation_counters")
    assert [tuple(r) for r in rep] == [("example.net", "sender.test", "bounced", "unknown_user", 1)]
    # A later submission reports the address as suppressed instead of queuing it.
    later = await env.submit(["ann@example.net"])
    assert later["recipients"][0]["state"] == "suppressed"
    assert env.eng.inbound.handler.stats["applied"] == 1


async def test_real_postfix_bounce_from_corpus_readdressed(env) -> None:
    raw = shared_corpus("sisimai", "samples", "rhost-zoho-01.eml").read_bytes()
    out = await env.submit(["carol@zoho.example.com"])
    rid = out["recipients"][0]["id"]
    await env.deliver(rid)
    raw = raw.replace(b"kijitora@zoho.example.com", b"carol@zoho.example.com")
    await env.send(raw, [VERP.return_path(rid)])
    assert (await env.row(rid))["state"] == "bounced"
    [ev] = await env.events("bounced")
    assert ev["data"]["category"] == "unknown_user" and ev["data"]["status"] == "5.1.1"
    assert await env.suppressions() == [("carol@zoho.example.com", "*", "unknown_user", "bounce")]


async def test_verp_in_report_headers_and_sibling_rows_of_one_transaction(env) -> None:
    """One token (the first row's) names the message; siblings are found by address within it."""
    out = await env.submit(["a1@example.org", "a2@example.org"])
    r1, r2 = (r["id"] for r in out["recipients"])
    # No VERP on the envelope (an FBL-style address); the bounce's To header carries it.
    await env.send(dsn("a2@example.org", to=VERP.return_path(r1)), ["postmaster@fbl.example.test"])
    assert (await env.row(r2))["state"] == "bounced"
    assert (await env.row(r1))["state"] == "queued"


async def test_soft_bounce_records_event_only(env) -> None:
    out = await env.submit(["dave@example.net"])
    rid = out["recipients"][0]["id"]
    await env.deliver(rid)
    report = dsn("dave@example.net", action="delayed", status="4.2.2",
                 diagnostic="smtp; 452 4.2.2 <{r}>: Mailbox full")
    await env.send(report, [VERP.return_path(rid)])
    assert (await env.row(rid))["state"] == "delivered"
    [ev] = await env.events("bounced")
    assert ev["data"]["permanent"] is False and ev["data"]["category"] == "mailbox_full"
    assert await env.suppressions() == []


async def test_unsigned_message_id_is_recorded_unverified_never_applied(env) -> None:
    """Issue 16: the unsigned Message-ID is visible to every recipient; it names nobody with proof."""
    out = await env.submit(["erin@example.net", "fay@example.net"])
    r_erin, r_fay = (r["id"] for r in out["recipients"])
    await env.deliver(r_fay)
    # What the engine writes for a non-personalized message, and the old unsigned per-recipient form.
    for mid in (f"<{out['id']}@sender.test>", f"<{out['id']}.{r_fay}@sender.test>"):
        _, reply = await env.send(dsn("fay@example.net", original_headers=f"Message-ID: {mid}\r\n"),
                                  ["postmaster@fbl.example.test"])
        assert "applied" not in reply and "unverified" in reply, reply
    assert (await env.row(r_fay))["state"] == "delivered"
    assert (await env.row(r_erin))["state"] == "queued"
    assert await env.suppressions() == []
    bounced = await env.events("bounced")
    assert len(bounced) == 2
    for ev in bounced:
        assert ev["recipient_id"] is None and ev["message_id"] is None
        assert ev["data"]["verified"] is False and ev["data"]["origin"] == "dsn"
        assert ev["data"]["reported_recipient"] == "fay@example.net"
    assert await env.pool.fetchval("SELECT count(*) FROM reputation_counters") == 0
    assert env.eng.inbound.handler.stats["unverified"] == 2 and env.eng.inbound.handler.stats["applied"] == 0


async def test_forged_dsn_and_arf_about_another_recipient_change_nothing(env) -> None:
    """Bob got the message (To/Cc show carol and the Message-ID) and forges reports about her."""
    out = await env.submit(["bob@example.net", "carol@example.net"])
    r_bob, r_carol = (r["id"] for r in out["recipients"])
    await env.deliver(r_carol)
    headers = f"Message-ID: <{out['id']}@sender.test>\r\n"
    _, reply = await env.send(dsn("carol@example.net", original_headers=headers), [f"anything@{BOUNCE_DOMAIN}"])
    assert "applied" not in reply, reply
    _, reply = await env.send(arf("carol@example.net", original_headers=headers), ["fbl@fbl.example.test"],
                              sender="bob@example.net")
    assert "applied" not in reply, reply
    assert (await env.row(r_carol))["state"] == "delivered"
    assert (await env.row(r_bob))["state"] == "queued"
    assert await env.suppressions() == []
    later = await env.submit(["carol@example.net"])
    assert later["recipients"][0]["state"] == "queued"
    [b] = await env.events("bounced")
    [c] = await env.events("complained")
    assert b["data"]["verified"] is False and c["data"]["verified"] is False and c["data"]["origin"] == "fbl"
    assert b["recipient_id"] is None and c["recipient_id"] is None
    assert c["data"]["reported_recipient"] == "carol@example.net"
    # A genuine (signed) complaint from carol still applies: the forged one did not use up her dedup.
    await env.send(arf("carol@example.net", original_headers=f"Return-Path: <{VERP.return_path(r_carol)}>\r\n"),
                   ["fbl@fbl.example.test"])
    assert await env.suppressions() == [("carol@example.net", "*", "complaint", "fbl")]
    [_, genuine] = await env.events("complained")
    assert genuine["recipient_id"] == r_carol and genuine["data"]["verified"] is True


async def test_signed_message_id_of_a_personalized_copy_applies(env) -> None:
    """A report that returns only the original message: the signed Message-ID the engine wrote is proof."""
    out = await env.submit(["gus@example.com", "hal@example.com"])
    r_gus, r_hal = (r["id"] for r in out["recipients"])
    await env.deliver(r_gus)
    m = await env.pool.fetchrow("SELECT id, mail_from, stream, raw, content, metadata FROM messages WHERE id = $1",
                                uuid.UUID(out["id"]))
    content = m["content"] if not isinstance(m["content"], str) else json.loads(m["content"])
    metadata = m["metadata"] if not isinstance(m["metadata"], str) else json.loads(m["metadata"])
    row = MessageRow.from_stored(m["id"], m["mail_from"], m["stream"], m["raw"], content, metadata)
    composer = Composer(env.eng.settings, keyring=Keyring({1: "tracking-secret-" + "t" * 32}))  # personalized
    mid = email.message_from_bytes(composer.compose(row, r_gus))["Message-ID"].strip()
    assert mid.startswith(f"<{out['id']}.") and VERP.parse_token(mid[1:].split("@")[0].split(".")[1]) == r_gus
    # A tampered token is not believed.
    bad = mid.replace(".", ".a", 1)
    _, reply = await env.send(arf("gus@example.com", original_headers=f"Message-ID: {bad}\r\n"), ["fbl@fbl.example.test"])
    assert "unverified" in reply
    assert await env.suppressions() == []
    _, reply = await env.send(arf("gus@example.com", original_headers=f"Message-ID: {mid}\r\n"), ["fbl@fbl.example.test"])
    assert "applied" in reply
    assert await env.suppressions() == [("gus@example.com", "*", "complaint", "fbl")]
    # The token names gus's row only: a report listing hal with gus's Message-ID does not reach hal.
    two = dsn("hal@example.com", original_headers=f"Message-ID: {mid}\r\n").replace(
        b"Final-Recipient: rfc822; hal@example.com\r\n",
        b"Final-Recipient: rfc822; hal@example.com\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
        b"Final-Recipient: rfc822; zed@example.com\r\n")
    await env.send(two, ["postmaster@fbl.example.test"])
    assert (await env.row(r_hal))["state"] == "queued"
    assert (await env.row(r_gus))["state"] == "delivered"


# ------------------------------------------------------------------------------------- ARF


async def test_complaint_suppresses_and_later_submission_reports_suppressed(env) -> None:
    out = await env.submit(["gina@example.com"])
    rid = out["recipients"][0]["id"]
    await env.deliver(rid)
    headers = f"Return-Path: <{VERP.return_path(rid)}>\r\n"
    report = arf("gina@example.com", original_headers=headers)
    await env.send(report, ["fbl@fbl.example.test"], sender="staff@fbl.provider.example")
    await env.send(report, ["fbl@fbl.example.test"], sender="staff@fbl.provider.example")  # the provider resends
    [ev] = await env.events("complained")  # counted once
    assert ev["recipient_id"] == rid and ev["data"]["feedback_type"] == "abuse" and ev["data"]["origin"] == "fbl"
    assert ev["data"]["sending_domain"] == "sender.test"
    assert (await env.row(rid))["state"] == "delivered"
    assert await env.suppressions() == [("gina@example.com", "*", "complaint", "fbl")]
    later = await env.submit(["gina@example.com", "hank@example.com"])
    assert {r["email"]: r["state"] for r in later["recipients"]} == {
        "gina@example.com": "suppressed", "hank@example.com": "queued"}
    n = await env.pool.fetchval("SELECT sum(n) FROM reputation_counters WHERE outcome = 'complained'")
    assert n == 1


async def test_queued_mail_to_newly_suppressed_address_is_not_sent(env, smtp_receiver, db_dsn, tmp_path) -> None:
    rx = smtp_receiver()
    cfg = tmp_path / "worker.toml"
    cfg.write_text(
        '[delivery]\nflush_interval = "20ms"\npoll_interval = "100ms"\n'
        f'[routing.static]\n"example.com" = "{rx.address}:{rx.port}"\n'
    )
    settings = load_settings(cfg, env={"DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home")})
    first = await env.submit(["ivy@example.com"])
    rid = first["recipients"][0]["id"]

    async def run_worker_until(predicate, timeout: float = 20) -> None:
        w = DeliveryWorker(settings, env.pool, owner="w-test", dsn=None)
        task = asyncio.create_task(w.run())
        deadline = time.monotonic() + timeout
        try:
            while not predicate() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            w.request_stop()
            await asyncio.wait_for(task, 30)

    async def state(r: int) -> str:
        return (await env.row(r))["state"]

    await run_worker_until(lambda: len(rx.messages) >= 1)
    for _ in range(100):
        if await state(rid) == "delivered":
            break
        await asyncio.sleep(0.05)
    assert await state(rid) == "delivered"
    second = await env.submit(["ivy@example.com"])  # queued; no worker running
    rid2 = second["recipients"][0]["id"]
    await env.send(arf("ivy@example.com", original_headers=f"Return-Path: <{VERP.return_path(rid)}>\r\n"),
                   ["fbl@fbl.example.test"])
    assert await state(rid2) == "suppressed"
    third = await env.submit(["jo@example.com"])
    await run_worker_until(lambda: len(rx.messages) >= 2)
    assert [m.rcpt_tos for m in rx.messages] == [("ivy@example.com",), ("jo@example.com",)]
    assert await state(rid2) == "suppressed"
    assert await state(third["recipients"][0]["id"]) in ("delivered", "leased")


# ------------------------------------------------------------------------------------- hostile input


async def test_forged_verp_token_changes_nothing(env) -> None:
    out = await env.submit(["kim@example.net"])
    rid = out["recipients"][0]["id"]
    await env.deliver(rid)
    genuine = VERP.return_path(rid)
    local, _, domain = genuine.partition("@")
    forged = local[:-1] + ("a" if local[-1] != "a" else "b") + "@" + domain
    other_key = Verp(BOUNCE_DOMAIN, {1: "another-secret-" + "x" * 32}).return_path(rid)
    for addr in (forged, other_key, f"b-{'a' * 24}@{BOUNCE_DOMAIN}", local[:12] + "@" + domain):
        await env.send(dsn("kim@example.net"), [addr])
    # A genuine token elsewhere does not rescue a report whose envelope token is forged.
    await env.send(dsn("kim@example.net", to=genuine), [forged])
    assert (await env.row(rid))["state"] == "delivered"
    assert await env.events() == [] and await env.suppressions() == []
    assert env.eng.inbound.handler.stats["forged"] >= 3


async def test_rcpt_outside_bounce_domains_is_refused(env) -> None:
    host, port = env.eng.inbound_address
    for rcpt in ("someone@example.com", f"x@sub.{BOUNCE_DOMAIN}", "no-domain"):
        with pytest.raises((aiosmtplib.SMTPRecipientsRefused, aiosmtplib.SMTPResponseException)) as info:
            await aiosmtplib.send(b"Subject: x\r\n\r\nhi\r\n", sender="a@b.example", recipients=[rcpt],
                                  hostname=host, port=port, timeout=10)
        err = info.value
        codes = [e.code for e in err.recipients] if isinstance(err, aiosmtplib.SMTPRecipientsRefused) else [err.code]
        assert codes and all(c in (550, 553, 501) for c in codes), codes
    async with aiosmtplib.SMTP(hostname=host, port=port, timeout=10) as client:
        await client.mail("a@b.example")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as info2:
            await client.rcpt("victim@example.com")
        assert info2.value.code == 550 and "5.7.1" in info2.value.message


async def test_broken_mime_huge_part_and_oversize_are_answered(env) -> None:
    out = await env.submit(["lee@example.net"])
    rid = out["recipients"][0]["id"]
    to = [VERP.return_path(rid)]
    broken = (b"Content-Type: multipart/report; boundary=\"X\"; report-type=delivery-status\r\n"
              b"MIME-Version: 1.0\r\n\r\n--X\r\nContent-Type: message/delivery-status\r\n"
              b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64@@@\r\n--X\r\n"
              + b"Content-Type: multipart/mixed; boundary=\"Y\"\r\n\r\n--Y\r\n" * 200)
    _, reply = await env.send(broken, to)
    assert reply.startswith("2.0.0") or "Report received" in reply
    junk = (b"\xff\xfe\x00garbage" * 50 + b"\r\n") * 100
    await env.send(junk, to)
    with pytest.raises(aiosmtplib.SMTPDataError) as too_long:  # a 10 kB line: refused, connection fine
        await env.send(b"\xff\xfe\x00garbage" * 1000, to)
    assert too_long.value.code == 500
    big_part = ("A" * 998 + "\r\n").encode() * (5 * 1024 * 1024 // 1000 + 10)
    huge_first = dsn("lee@example.net", human="x").replace(b"x\r\n", big_part, 1)
    assert len(huge_first) > 5 * 1024 * 1024
    await env.send(huge_first, to)  # answered; what lies past the parser's window is not read
    # The usual shape: a bounce returning the whole (huge) original message after its report.
    huge_last = dsn("lee@example.net", original_headers="X-Pad: 1\r\n\r\n" + big_part.decode())
    await env.send(huge_last, to)
    assert (await env.row(rid))["state"] == "bounced"
    with pytest.raises(aiosmtplib.SMTPResponseException) as info:  # past max_message_size (6MB)
        await env.send(big_part + big_part[: 2 * 1024 * 1024], to)
    assert info.value.code == 552
    # Still serving afterwards.
    await env.send(dsn("lee@example.net"), to)


async def test_auto_reply_is_ignored(env) -> None:
    out = await env.submit(["max@example.net"])
    rid = out["recipients"][0]["id"]
    raw = (b"From: max@example.net\r\nTo: app@sender.test\r\nSubject: Out of office\r\n"
           b"Auto-Submitted: auto-replied\r\n\r\nI am away until Monday.\r\n")
    await env.send(raw, [VERP.return_path(rid)])
    assert await env.events() == [] and (await env.row(rid))["state"] == "queued"
    assert env.eng.inbound.handler.stats["auto_reply"] == 1


async def test_disabled_mailbox_suppresses_but_full_mailbox_does_not(env) -> None:
    out = await env.submit(["nia@gmail.test", "oz@gmail.test"])
    r1, r2 = (r["id"] for r in out["recipients"])
    await env.send(dsn("nia@gmail.test", status="5.2.1",
                       diagnostic="smtp; 550-5.2.1 The email account that you tried to reach is disabled."),
                   [VERP.return_path(r1)])
    await env.send(dsn("oz@gmail.test", status="5.2.2", diagnostic="smtp; 552 5.2.2 The email account that you tried to reach is over quota."),
                   [VERP.return_path(r2)])
    cats = {e["recipient_id"]: e["data"]["category"] for e in await env.events("bounced")}
    assert cats == {r1: "mailbox_disabled", r2: "mailbox_full"}
    assert await env.suppressions() == [("nia@gmail.test", "*", "mailbox_disabled", "bounce")]
    assert (await env.row(r1))["state"] == (await env.row(r2))["state"] == "bounced"  # both permanent
