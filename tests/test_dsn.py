"""Bounce parsing: RFC 3464 DSNs, plain-text bounces of common MTAs, auto-replies, hostile input."""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from engine.feedback import parse_report
from engine.feedback.dsn import parse_field_blocks, split_original

REPO = Path(__file__).resolve().parent.parent


def crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


RFC3464 = crlf(
    """Return-Path: <>
From: Mail Delivery System <MAILER-DAEMON@mx.example.net>
To: bounces+m-7f3a9c@mail.example.com
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="BOUND"

--BOUND
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.example.net.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

--BOUND
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net
Arrival-Date: Mon, 1 Jan 2024 10:00:00 +0000

Final-Recipient: rfc822; nobody@example.org
Original-Recipient: rfc822;NoBody@Example.org
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx1.example.org
Diagnostic-Code: smtp; 550 5.1.1 <nobody@example.org>: Recipient address
    rejected: User unknown in local recipient table

Final-Recipient: rfc822; full@example.org
Action: delayed
Status: 4.2.2
Remote-MTA: dns; mx1.example.org
Diagnostic-Code: smtp; 452 4.2.2 <full@example.org>: Mailbox full

--BOUND
Content-Type: message/rfc822

From: sender@mail.example.com
To: nobody@example.org
Subject: hello
Message-ID: <abc123@mail.example.com>
X-Engine-Message-Id: 0190c5d2-aaaa-bbbb-cccc-000000000001

body
--BOUND--
"""
)


def test_rfc3464_per_recipient_fields_and_original() -> None:
    rep = parse_report(RFC3464)
    assert rep.kind == "dsn" and rep.format == "rfc3464"
    by = {r.recipient: r for r in rep.recipients}
    gone = by["nobody@example.org"]
    assert gone.status == "5.1.1" and gone.action == "failed"
    assert gone.category == "unknown_user" and gone.permanent is True and gone.hard is True
    assert gone.original_recipient == "nobody@example.org"
    assert gone.remote_mta == "mx1.example.org"
    assert "User unknown in local recipient table" in (gone.reply or "")
    full = by["full@example.org"]
    assert (full.category, full.permanent, full.action) == ("mailbox_full", False, "delayed")
    assert rep.original_message_id == "<abc123@mail.example.com>"
    assert rep.original_headers["X-Engine-Message-Id"] == "0190c5d2-aaaa-bbbb-cccc-000000000001"
    assert rep.report_to == "bounces+m-7f3a9c@mail.example.com"  # the VERP address maps it back


def test_rfc3464_with_rfc822_headers_and_delivered_action() -> None:
    raw = crlf(
        """From: MAILER-DAEMON@mx.example.net
To: bounces@mail.example.com
Subject: Successful Mail Delivery Report
Content-Type: multipart/report; report-type=delivery-status; boundary=b

--b
Content-Type: text/plain

Your message was successfully delivered.
--b
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net

Final-Recipient: rfc822; someone@example.org
Action: delivered
Status: 2.0.0
Diagnostic-Code: smtp; 250 2.0.0 OK

--b
Content-Type: text/rfc822-headers

Message-ID: <m-1@mail.example.com>
From: a@mail.example.com
To: someone@example.org
--b--
"""
    )
    rep = parse_report(raw)
    assert [(r.recipient, r.category, r.permanent) for r in rep.recipients] == [("someone@example.org", "delivered", False)]
    assert rep.original_message_id == "<m-1@mail.example.com>"


QMAIL = crlf(
    """From: MAILER-DAEMON@mx4.example.jp
To: bounce@example.com
Subject: failure notice

Hi. This is the qmail-send program at mx4.example.jp.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<kijitora@example.ne.jp>:
192.0.2.32 does not like recipient.
Remote host said: 550 5.1.1 <kijitora@example.ne.jp>... User Unknown
Giving up on 192.0.2.32.

<full@example.ne.jp>:
192.0.2.32 does not like recipient.
Remote host said: 552 5.2.2 Mailbox Full
Giving up on 192.0.2.32.

--- Below this line is a copy of the message.

Return-Path: <bounce@example.com>
Message-ID: <q-1@example.com>
From: bounce@example.com
To: kijitora@example.ne.jp
Subject: hi

text
"""
)

EXIM = crlf(
    """From: Mail Delivery System <Mailer-Daemon@e1.example.org>
To: bounce@example.com
Subject: Mail delivery failed: returning message to sender
X-Failed-Recipients: kijitora@example.ed.jp
Auto-Submitted: auto-replied

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  kijitora@example.ed.jp
    host mx.example.ed.jp [192.0.2.20]
    SMTP error from remote mail server after RCPT TO:<kijitora@example.ed.jp>:
    550 5.7.1 [C14] Missing reverse DNS for 203.0.113.2

------ This is a copy of the message, including all the headers. ------

Return-path: <bounce@example.com>
Message-Id: <E1P1ce6-000Egt-GZ@e1.example.org>
From: bounce@example.com
To: kijitora@example.ed.jp

test
"""
)

GMAIL_OLD = crlf(
    """From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>
To: someone@gmail.com
X-Failed-Recipients: userunknown@example.jp
Subject: Delivery Status Notification (Failure)
Content-Type: text/plain; charset=ISO-8859-1

Delivery to the following recipient failed permanently:

     userunknown@example.jp

Technical details of permanent failure:
Google tried to deliver your message, but it was rejected by the server for the recipient domain example.jp by mx.example.jp. [192.0.2.153].

The error that the other server returned was:
550 5.1.1 <userunknown@example.jp>... User Unknown

----- Original message -----

Message-ID: <g-1@mail.gmail.com>
To: userunknown@example.jp
"""
)

POSTFIX_OLD = crlf(
    """From: MAILER-DAEMON@mail.example.net (Mail Delivery System)
To: bounce@example.com
Subject: Undelivered Mail Returned to Sender

This is the Postfix program at host mail.example.net.

I'm sorry to have to inform you that the message returned
below could not be delivered to one or more destinations.

<nobody@example.org>: host mx.example.org[192.0.2.1] said: 550 5.1.1
    <nobody@example.org>: Recipient address rejected: User unknown (in reply to
    RCPT TO command)

--- Delivery error report follows ---
"""
)

SENDMAIL = crlf(
    """From: Mail Delivery Subsystem <MAILER-DAEMON@example.com>
To: bounce@example.com
Subject: Returned mail: see transcript for details

The original message was received at Thu, 29 Apr 2010 23:34:45 +0900
from localhost [127.0.0.1]

   ----- The following addresses had permanent fatal errors -----
<kijitora@example.org>
    (reason: 550 5.1.1 <kijitora@example.org>... User Unknown)

   ----- Transcript of session follows -----
... while talking to mx.example.org.:
>>> DATA
<<< 550 5.1.1 <kijitora@example.org>... User Unknown
550 5.1.1 <kijitora@example.org>... User unknown
"""
)

EXCHANGE2003 = crlf(
    """From: System Administrator <postmaster@example.com>
To: bounce@example.com
Subject: Undeliverable: Nyaan

Your message

  To:      kijitora@example.jp
  Subject: Nyaan
  Sent:    Thu, 29 Apr 2010 00:00:00 +0900

did not reach the following recipient(s):

kijitora@example.jp on Thu, 29 Apr 2010 00:00:00 +0900
    The recipient name is not recognized
\tThe MTS-ID of the original message is: c=jp;a= ;p=neko;l=NEKO0000
    MSEXCH:IMC:NEKO:NYAAN:0 3550 000003F1
"""
)


@pytest.mark.parametrize(
    "raw,recipient,category,permanent",
    [
        (QMAIL, "kijitora@example.ne.jp", "unknown_user", True),
        (QMAIL, "full@example.ne.jp", "mailbox_full", True),
        (EXIM, "kijitora@example.ed.jp", "policy", True),  # missing PTR: a policy of the receiver
        (GMAIL_OLD, "userunknown@example.jp", "unknown_user", True),
        (POSTFIX_OLD, "nobody@example.org", "unknown_user", True),
        (SENDMAIL, "kijitora@example.org", "unknown_user", True),
        (EXCHANGE2003, "kijitora@example.jp", "unknown_user", True),
    ],
    ids=["qmail-user", "qmail-full", "exim", "gmail-old", "postfix-old", "sendmail", "exchange2003"],
)
def test_plain_text_bounces(raw: bytes, recipient: str, category: str, permanent: bool) -> None:
    rep = parse_report(raw)
    assert rep.kind == "dsn"
    rows = {r.recipient: r for r in rep.recipients}
    assert recipient in rows, [r.recipient for r in rep.recipients]
    assert (rows[recipient].category, rows[recipient].permanent) == (category, permanent), rows[recipient].reply
    # the bounce's own addresses are never taken for failed recipients
    assert "bounce@example.com" not in rows


def test_inline_original_headers_are_extracted() -> None:
    assert parse_report(QMAIL).original_message_id == "<q-1@example.com>"
    assert parse_report(EXIM).original_message_id == "<E1P1ce6-000Egt-GZ@e1.example.org>"
    assert parse_report(GMAIL_OLD).original_message_id == "<g-1@mail.gmail.com>"


def test_exim_auto_submitted_is_still_a_bounce() -> None:
    # Exim marks its bounces Auto-Submitted: auto-replied; that must not make them auto-replies
    assert parse_report(EXIM).kind == "dsn"


@pytest.mark.parametrize(
    "headers",
    [
        "Auto-Submitted: auto-replied\nSubject: Re: your mail",
        "X-Autoreply: yes\nSubject: Re: hello",
        "Precedence: auto_reply\nSubject: hello",
        "Subject: Out of Office: hello",
        "Subject: Automatic reply: hello",
        "Subject: Abwesenheitsnotiz: hello",
    ],
)
def test_auto_replies(headers: str) -> None:
    raw = crlf(f"From: Jane <jane@example.org>\nTo: news@example.com\n{headers}\n\nI am away until Monday.\n")
    rep = parse_report(raw)
    assert rep.kind == "auto_reply" and rep.recipients == []
    assert rep.report_from == "jane@example.org"


def test_ordinary_mail_is_unknown() -> None:
    raw = crlf("From: Jane <jane@example.org>\nTo: news@example.com\nSubject: question\n\nHi, contact bob@example.net please.\n")
    assert parse_report(raw).kind == "unknown"


def test_field_blocks_and_separator_helpers() -> None:
    blocks = parse_field_blocks("A: 1\nB: two\n  continued\n\nFinal-Recipient: rfc822; x@y.example\n")
    assert blocks == [{"a": "1", "b": "two continued"}, {"final-recipient": "rfc822; x@y.example"}]
    head, tail = split_original("error text\n\n--- Below this line is a copy of the message.\n\nFrom: a@b\n")
    assert head.strip() == "error text" and "From: a@b" in tail


# --------------------------------------------------------------------------- hostile input


def _nested(depth: int) -> bytes:
    parts = [b"From: MAILER-DAEMON@x.example\r\nSubject: Undelivered\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"]
    for i in range(1, depth):
        parts.append(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i - 1, i))
    parts.append(b"--b%d\r\nContent-Type: text/plain\r\n\r\n<a@b.example>:\r\n550 5.1.1 user unknown\r\n" % (depth - 1))
    parts.extend(b"--b%d--\r\n" % i for i in reversed(range(depth)))
    return b"".join(parts)


def _hostile_inputs() -> dict[str, bytes]:
    rng = random.Random(1234)
    big = base64.encodebytes(rng.randbytes(10 * 1024 * 1024))
    return {
        "empty": b"",
        "garbage": rng.randbytes(200_000),
        "nul-and-high-bytes": b"\x00\xff\xfe" * 50_000,
        "truncated-dsn": RFC3464[: len(RFC3464) // 2],
        "truncated-in-header": RFC3464[:40],
        "ten-mb-part": RFC3464.replace(b"body\r\n", b"") .replace(
            b"--BOUND--", b"--BOUND\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n" + big + b"\r\n--BOUND--"
        ),
        "ten-mb-first-part": crlf("From: MAILER-DAEMON@x.example\nSubject: Undelivered\nContent-Type: multipart/report; report-type=delivery-status; boundary=q\n\n--q\nContent-Type: text/plain\nContent-Transfer-Encoding: base64\n\n")
        + big
        + b"\r\n--q--\r\n",
        "1000-nested-multiparts": _nested(1000),
        "bad-charset": crlf("From: MAILER-DAEMON@x.example\nSubject: Undelivered\nContent-Type: text/plain; charset=x-no-such-charset-9\n\n<a@b.example>:\n550 5.1.1 unknown\n"),
        "bad-base64": crlf("From: MAILER-DAEMON@x.example\nSubject: Undelivered\nContent-Type: text/plain\nContent-Transfer-Encoding: base64\n\n!!!not base64@@@\n"),
        "bad-encoded-words": crlf("From: =?utf-8?b?!!!?= <MAILER-DAEMON@x.example>\nSubject: =?x-bogus?q?abc?=\n\nhello\n"),
        "huge-header": b"Subject: " + b"A" * 3_000_000 + b"\r\n\r\nbody",
        "many-parts": crlf("From: MAILER-DAEMON@x.example\nContent-Type: multipart/mixed; boundary=z\n\n") + b"".join(b"--z\r\nContent-Type: text/plain\r\n\r\n<u%d@b.example>:\r\n550 no\r\n" % i for i in range(5000)) + b"--z--\r\n",
        "boundary-never-closed": crlf("From: MAILER-DAEMON@x.example\nContent-Type: multipart/report; report-type=delivery-status; boundary=never\n\n--never\nContent-Type: message/delivery-status\n\nFinal-Recipient: rfc822; x@y.example\nStatus: 5.1.1\n"),
        "delivery-status-garbage": crlf("Content-Type: multipart/report; report-type=delivery-status; boundary=g\n\n--g\nContent-Type: message/delivery-status\n\n\x00\x01::::\n: : :\nFinal-Recipient:\nStatus: 9.9.9.9.9\n--g--\n"),
        "str-not-bytes": "From: a@b\n\nhello",  # type: ignore[dict-item]
    }


HOSTILE = _hostile_inputs()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_never_raises(name: str) -> None:
    rep = parse_report(HOSTILE[name])
    assert rep.kind in ("dsn", "arf", "auto_reply", "unknown", "error")
    assert len(rep.recipients) <= 500


def test_hostile_inputs_still_yield_what_they_can() -> None:
    assert parse_report(HOSTILE["truncated-dsn"]).recipients[0].recipient == "nobody@example.org"
    assert parse_report(HOSTILE["ten-mb-part"]).recipients[0].category == "unknown_user"
    rep = parse_report(HOSTILE["boundary-never-closed"])
    assert [(r.recipient, r.status) for r in rep.recipients] == [("x@y.example", "5.1.1")]
    rep = parse_report(HOSTILE["bad-charset"])
    assert [(r.recipient, r.category) for r in rep.recipients] == [("a@b.example", "unknown_user")]


def test_cli_bounce_parse(tmp_path: Path) -> None:
    (tmp_path / "a.eml").write_bytes(RFC3464)
    (tmp_path / "b.eml").write_bytes(crlf("From: Jane <jane@example.org>\nSubject: Out of office\n\naway\n"))
    (tmp_path / "c.eml").write_bytes(HOSTILE["garbage"])
    (tmp_path / "d.eml").mkdir()  # unreadable as a file: an error line, not a crash
    files = [str(tmp_path / n) for n in ("a.eml", "b.eml", "c.eml", "d.eml")]
    res = subprocess.run([sys.executable, "-m", "engine", "bounce", "parse", *files], cwd=REPO, capture_output=True, text=True, timeout=120)
    rows = [json.loads(x) for x in res.stdout.splitlines()]
    assert res.returncode == 1 and "Traceback" not in res.stderr
    a = [r for r in rows if r["file"].endswith("a.eml")]
    assert {r["recipient"] for r in a} == {"nobody@example.org", "full@example.org"}
    assert set(a[0]) >= {"file", "recipient", "status", "reply", "category", "permanent", "feedback_type"}
    assert [r for r in rows if r["file"].endswith("b.eml")] == [{"file": files[1], "recipient": None, "kind": "auto_reply", "from": "jane@example.org"}]
    assert [r["kind"] for r in rows if r["file"].endswith("c.eml")] == ["unknown"]
    assert [r["kind"] for r in rows if r["file"].endswith("d.eml")] == ["error"]


def test_rejection_at_mail_from_is_about_the_sender_not_the_recipient() -> None:
    raw = POSTFIX_OLD.replace(
        b"said: 550 5.1.1\r\n    <nobody@example.org>: Recipient address rejected: User unknown (in reply to\r\n    RCPT TO command)",
        b"said: 553 5.1.8 <bounce@example.com>: Sender address rejected: Domain not found (in reply to\r\n    MAIL FROM command)",
    )
    row = parse_report(raw).recipients[0]
    assert row.recipient == "nobody@example.org"
    assert (row.category, row.hard) == ("policy", False)


def test_codes_inside_joined_multiline_replies_do_not_break_phrases() -> None:
    from engine.feedback import classify

    text = "550-5.7.1 [192.0.2.222 13] Messages with multiple 550 5.7.1 addresses in From: header are not accepted."
    assert classify(550, "5.7.1", text).category == "protocol_error"


# --------------------------------------------------------------------------- SMTP stage: "user unknown" after DATA is not hard


def _postfix_bounce(reply_lines: str) -> bytes:
    """A Postfix bounce whose prose (not its Diagnostic-Code) names the SMTP stage, as Postfix does."""
    return crlf(
        f"""From: MAILER-DAEMON@mx.example.net (Mail Delivery System)
To: bounces@mail.example.com
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

This is the mail system at host mx.example.net.

<kijitora@example.net>: host mail.example.net[192.0.2.78] said: {reply_lines}

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net

Final-Recipient: rfc822; kijitora@example.net
Action: failed
Status: 5.0.0
Diagnostic-Code: smtp; 550 Unknown user kijitora@example.net

--B--
"""
    )


def test_user_unknown_after_end_of_data_is_policy_not_hard() -> None:
    row = parse_report(_postfix_bounce("550 Unknown user kijitora@example.net (in reply to end of DATA\n    command)")).recipients[0]
    assert (row.category, row.permanent, row.hard, row.smtp_command) == ("policy", True, False, "DATA")


def test_user_unknown_at_rcpt_stays_hard() -> None:
    row = parse_report(_postfix_bounce("550 Unknown user kijitora@example.net (in reply to RCPT TO\n    command)")).recipients[0]
    assert (row.category, row.hard, row.smtp_command) == ("unknown_user", True, "RCPT")


def test_x11_after_data_stays_hard() -> None:
    """The reply's own X.1.1 ("the mailbox does not exist") is a verdict on the address whatever the stage."""
    raw = _postfix_bounce("550 5.1.1 Unknown user kijitora@example.net (in reply to end of DATA command)")
    raw = raw.replace(b"smtp; 550 Unknown user", b"smtp; 550 5.1.1 Unknown user")
    row = parse_report(raw).recipients[0]
    assert (row.category, row.hard, row.smtp_command) == ("unknown_user", True, "DATA")


def test_exim_after_end_of_data_is_not_hard() -> None:
    raw = crlf(
        """From: Mail Delivery System <Mailer-Daemon@mx.example.jp>
To: sender@example.com
Subject: Mail delivery failed: returning message to sender
X-Failed-Recipients: neko@example.org

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  neko@example.org
    SMTP error from remote mail server after end of data:
    host mx.example.org [192.0.2.1]: 550 : User unknown
"""
    )
    row = parse_report(raw).recipients[0]
    assert (row.recipient, row.category, row.hard) == ("neko@example.org", "policy", False)


def _sendmail_transcript(transcript: str) -> bytes:
    return crlf(
        f"""From: Mail Delivery Subsystem <MAILER-DAEMON@mx.example.jp>
To: sender@example.jp
Subject: Returned mail: see transcript for details
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="S"

--S

   ----- The following addresses had permanent fatal errors -----
<kijitora@example.org>
    (reason: 550 Unknown user kijitora@example.org)

   ----- Transcript of session follows -----
... while talking to mx.example.org.:
{transcript}

--S
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.jp

Final-Recipient: RFC822; kijitora@example.org
Action: failed
Status: 5.0.0
Diagnostic-Code: SMTP; 550 Unknown user kijitora@example.org

--S--
"""
    )


def test_sendmail_transcript_reply_to_data_is_not_hard() -> None:
    raw = _sendmail_transcript(">>> DATA\n<<< 550 Unknown user kijitora@example.org\n554 5.0.0 Service unavailable")
    row = parse_report(raw).recipients[0]
    assert (row.category, row.hard, row.smtp_command) == ("policy", False, "DATA")


def test_sendmail_pipelined_rcpt_reply_after_data_is_rcpt_and_hard() -> None:
    """With PIPELINING the RCPT replies come after ">>> DATA"; the last reply ("503 Need RCPT") is DATA's."""
    raw = _sendmail_transcript(">>> DATA\n<<< 550 Unknown user kijitora@example.org\n<<< 503 5.0.0 Need RCPT (recipient)")
    row = parse_report(raw).recipients[0]
    assert (row.category, row.hard, row.smtp_command) == ("unknown_user", True, "RCPT")


def test_stage_helpers() -> None:
    from engine.feedback.dsn import stage_in_text, transcript_stage

    assert stage_in_text("550 5.1.1 no (in reply to RCPT TO command)") == "RCPT"
    assert stage_in_text("SMTP error from remote mail server after end of data: 550") == "DATA"
    assert stage_in_text("after RCPT TO:<a@b.c> ... and in reply to end of DATA command") is None  # two stages: no answer
    assert stage_in_text("550 user unknown") is None
    assert transcript_stage(">>> RCPT To:<a@example.org>\n<<< 550 no such user\n550 <a@example.org>... User unknown", "a@example.org") == "RCPT"
    assert transcript_stage("no transcript here", "a@example.org") is None


def test_user_unknown_with_policy_code_is_policy() -> None:
    raw = _postfix_bounce("550 5.7.1 550 User Unknown: kijitora@example.net").replace(
        b"smtp; 550 Unknown user kijitora@example.net", b"smtp; 550 5.7.1 550 User Unknown: kijitora@example.net"
    )
    row = parse_report(raw).recipients[0]
    assert (row.category, row.hard) == ("policy", False)


def test_mimecast_fields_with_space_before_colon() -> None:
    raw = crlf(
        """From: Mimecast <postmaster@mimecast.example>
To: sender@example.com
Subject: Mimecast delivery failure
MIME-Version: 1.0
Content-Type: text/plain

This is a delivery failure notification message.

Final-Recipient : rfc/822;sabatora@example.net
Action : failed
Status : 5.0.0
Diagnostic-Code : smtp;550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain
"""
    )
    row = parse_report(raw).recipients[0]
    assert (row.recipient, row.status, row.category, row.hard) == ("sabatora@example.net", "5.7.54", "policy", False)


def test_temporary_dns_failure_is_not_a_hard_bad_domain() -> None:
    raw = _postfix_bounce("x").replace(
        b"<kijitora@example.net>: host mail.example.net[192.0.2.78] said: x",
        b"<kijitora@example.net>: Name service error for domain example.net: Host not\r\n    found, try again",
    ).replace(b"Status: 5.0.0\r\nDiagnostic-Code: smtp; 550 Unknown user kijitora@example.net\r\n", b"")
    row = parse_report(raw).recipients[0]
    assert (row.category, row.hard) == ("network_error", False)


def _attempt(address: str, code: int | None, status: str | None, reply: str, mx: str | None, kind: str = "permanent") -> Any:
    from engine.outcome.writer import Attempt

    return Attempt(
        recipient_id=1, address=address, attempts_before=0, expires_at=datetime.now(UTC), kind=kind, code=code,
        status=status, reply=reply, mx=mx, duration_ms=1, message_id=uuid.uuid4(), source="smtp",
        mail_from="sender@example.com", stream="transactional", counted=True, provider=None, egress=None, campaign=None,
    )


def test_engine_own_dsn_parses_cleanly() -> None:
    """Every failed recipient in the DSNs we send has a Diagnostic-Code, and our own parser reads them back."""
    from engine.config import Settings
    from engine.outcome.bounce_report import DsnBuilder

    failures = [
        _attempt("a@example.net", 550, "5.1.1", "5.1.1 <a@example.net>: Recipient address rejected: User unknown",
                 "mx.example.net"),
        _attempt("b@nx.example", None, "5.1.2", "5.1.2 domain nx.example does not exist (NXDOMAIN)", None),
        _attempt("c@slow.example", 421, "4.3.2", "4.3.2 Service shutting down", "mx.slow.example", kind="temporary"),
        _attempt("d@quiet.example", None, None, "", None, kind="temporary"),
    ]
    raw = DsnBuilder(Settings(), lambda _: None).build(
        "sender@example.com", failures, b"Message-ID: <orig@example.com>\r\nSubject: x\r\n\r\nbody")
    diags = [ln for ln in raw.decode().splitlines() if ln.startswith("Diagnostic-Code:")]
    assert diags == [
        "Diagnostic-Code: smtp; 550 5.1.1 <a@example.net>: Recipient address rejected: User unknown",
        "Diagnostic-Code: x-engine; 5.1.2 domain nx.example does not exist (NXDOMAIN)",
        "Diagnostic-Code: smtp; 421 4.3.2 Service shutting down",
        "Diagnostic-Code: x-engine; delivery failed; gave up retrying",
    ]
    rep = parse_report(raw)
    assert rep.kind == "dsn" and rep.original_message_id == "<orig@example.com>"
    got = {r.recipient: (r.status, r.reply) for r in rep.recipients}
    assert got == {
        "a@example.net": ("5.1.1", "550 5.1.1 <a@example.net>: Recipient address rejected: User unknown"),
        "b@nx.example": ("5.1.2", "5.1.2 domain nx.example does not exist (NXDOMAIN)"),
        # the parser prefers the server's own enhanced code to the reporting MTA's Status
        "c@slow.example": ("4.3.2", "421 4.3.2 Service shutting down"),
        "d@quiet.example": ("5.4.7", "delivery failed; gave up retrying"),
    }
    assert not any((r.reply or "").startswith(">") for r in rep.recipients)
    assert {r.category for r in rep.recipients if r.recipient in ("a@example.net", "b@nx.example")} == {
        "unknown_user", "bad_domain"}
