"""Complaint parsing: RFC 5965 ARF and the non-ARF formats providers send."""

from __future__ import annotations

import json

import pytest

from engine.feedback import parse_report
from engine.feedback.arf import parse_arf
from engine.feedback.dsn import anatomy
from engine.feedback.mimeutil import load_message


def crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


ARF = crlf(
    """From: Yahoo! Mail AntiSpam Feedback <feedback@arf.mail.yahoo.com>
To: fbl@mail.example.com
Subject: FW: your newsletter
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="fb"

--fb
Content-Type: text/plain; charset="US-ASCII"

This is an email abuse report for an email message received from IP
192.0.2.89 on Thu, 29 Apr 2009 00:00:00 -0000 (GMT).

--fb
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: Yahoo!-Mail-Feedback/1.0
Version: 1
Original-Mail-From: <bounces+m-1@mail.example.com>
Original-Rcpt-To: <reader@yahoo.example>
Arrival-Date: Thu, 29 Apr 2009 00:00:00 -0000
Source-IP: 192.0.2.89
Reported-Domain: mail.example.com
Authentication-Results: mta.yahoo.example; dkim=pass header.d=mail.example.com

--fb
Content-Type: message/rfc822

From: News <news@mail.example.com>
To: reader@yahoo.example
Subject: your newsletter
Message-ID: <n-42@mail.example.com>
X-Engine-Message-Id: 0190c5d2-0000-0000-0000-000000000042

Hello
--fb--
"""
)


def test_arf_fields() -> None:
    msg = load_message(ARF)
    fb = parse_arf(msg, anatomy(msg))
    assert fb is not None
    assert fb.feedback_type == "abuse"
    assert fb.user_agent == "Yahoo!-Mail-Feedback/1.0"
    assert fb.recipients == ["reader@yahoo.example"]
    assert fb.original_mail_from == "bounces+m-1@mail.example.com"
    assert fb.original_message_id == "<n-42@mail.example.com>"
    assert fb.source_ip == "192.0.2.89"
    assert fb.arrival_date == "Thu, 29 Apr 2009 00:00:00 -0000"
    assert fb.reported_domain == "mail.example.com"
    assert fb.original_headers["X-Engine-Message-Id"] == "0190c5d2-0000-0000-0000-000000000042"


def test_arf_report_rows() -> None:
    rep = parse_report(ARF)
    assert rep.kind == "arf"
    assert [(r.recipient, r.category, r.feedback_type, r.permanent) for r in rep.recipients] == [("reader@yahoo.example", "complaint", "abuse", None)]
    assert rep.original_message_id == "<n-42@mail.example.com>"


def test_arf_recipient_from_embedded_to_and_many_rcpt_to() -> None:
    no_rcpt = ARF.replace(b"Original-Rcpt-To: <reader@yahoo.example>\r\n", b"")
    assert [r.recipient for r in parse_report(no_rcpt).recipients] == ["reader@yahoo.example"]
    many = ARF.replace(b"Original-Rcpt-To: <reader@yahoo.example>\r\n", b"Original-Rcpt-To: a@x.example\r\nOriginal-Rcpt-To: b@x.example\r\n")
    assert [r.recipient for r in parse_report(many).recipients] == ["a@x.example", "b@x.example"]


@pytest.mark.parametrize("ftype", ["abuse", "fraud", "opt-out", "not-spam", "auth-failure", "virus", "other"])
def test_feedback_types(ftype: str) -> None:
    rep = parse_report(ARF.replace(b"Feedback-Type: abuse", f"Feedback-Type: {ftype}".encode()))
    assert rep.recipients[0].feedback_type == ftype


def test_arf_without_report_type_parameter_and_with_headers_only_original() -> None:
    raw = crlf(
        """From: fbl@isp.example
To: fbl@mail.example.com
Subject: Abuse Report
Content-Type: multipart/report; boundary="x"

--x
Content-Type: text/plain

complaint
--x
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: ReturnPathFBL/1.0
Version: 1

--x
Content-Type: text/rfc822-headers

To: victim@isp.example
Message-ID: <h-1@mail.example.com>
--x--
"""
    )
    rep = parse_report(raw)
    assert rep.kind == "arf"
    assert [(r.recipient, r.feedback_type) for r in rep.recipients] == [("victim@isp.example", "abuse")]
    assert rep.original_message_id == "<h-1@mail.example.com>"


def test_microsoft_jmrp_style_complaint() -> None:
    raw = crlf(
        """From: staff@hotmail.com
To: abuse-report@mail.example.com
Subject: complaint about message from 192.0.2.222
Content-Type: multipart/mixed; boundary="J"

--J
Content-Type: message/rfc822
Content-Disposition: inline

X-HmXmrOriginalRecipient: reader@outlook.example
X-Reporter-IP: 192.0.2.22
From: News <news@mail.example.com>
To: reader@outlook.example
Message-ID: <j-1@mail.example.com>

Nyaan
--J--
"""
    )
    rep = parse_report(raw)
    assert rep.kind == "arf" and rep.format == "jmrp"
    assert [(r.recipient, r.category, r.feedback_type) for r in rep.recipients] == [("reader@outlook.example", "complaint", "abuse")]
    assert rep.original_message_id == "<j-1@mail.example.com>"


def test_apple_mail_unsubscribe_is_an_opt_out() -> None:
    raw = crlf(
        """From: someone@icloud.example
To: unsubscribe-abc@mail.example.com
Subject: unsubscribe
Auto-Submitted: auto-replied
X-Apple-Unsubscribe: true

Apple Mail sent this email to unsubscribe from the message.
"""
    )
    rep = parse_report(raw)
    assert rep.kind == "arf"
    assert [(r.recipient, r.feedback_type) for r in rep.recipients] == [("someone@icloud.example", "opt-out")]
    assert rep.report_to == "unsubscribe-abc@mail.example.com"


def test_amazon_ses_json_complaint_and_bounce() -> None:
    complaint = {
        "notificationType": "Complaint",
        "complaint": {"complainedRecipients": [{"emailAddress": "c@x.example"}], "complaintFeedbackType": "abuse", "userAgent": "ISP", "timestamp": "2024-01-01T00:00:00Z"},
        "mail": {"messageId": "ses-1", "source": "news@mail.example.com"},
    }
    envelope = {"Type": "Notification", "Message": json.dumps(complaint)}
    raw = crlf("From: no-reply@sns.amazonaws.com\nTo: ops@mail.example.com\nSubject: AWS Notification Message\n\n") + json.dumps(envelope, indent=2).encode()
    rep = parse_report(raw)
    assert rep.kind == "arf" and rep.format == "amazonses"
    assert [(r.recipient, r.feedback_type) for r in rep.recipients] == [("c@x.example", "abuse")]
    assert rep.original_message_id == "ses-1"

    bounce = {
        "notificationType": "Bounce",
        "bounce": {"bounceType": "Permanent", "bouncedRecipients": [{"emailAddress": "b@x.example", "action": "failed", "status": "5.1.1", "diagnosticCode": "smtp; 550 5.1.1 user unknown"}]},
        "mail": {"messageId": "ses-2", "headers": [{"name": "X-Engine-Message-Id", "value": "m-2"}]},
    }
    raw = crlf("From: no-reply@sns.amazonaws.com\nSubject: AWS Notification Message\n\n") + json.dumps(bounce).encode()
    rep = parse_report(raw)
    assert rep.kind == "dsn" and rep.format == "amazonses"
    assert [(r.recipient, r.status, r.category, r.permanent) for r in rep.recipients] == [("b@x.example", "5.1.1", "unknown_user", True)]
    assert rep.original_headers == {"X-Engine-Message-Id": "m-2"}


@pytest.mark.parametrize(
    "raw",
    [
        ARF[: len(ARF) // 3],
        ARF.replace(b"Feedback-Type: abuse", b"Feedback-Type:"),
        crlf("Content-Type: multipart/report; report-type=feedback-report; boundary=q\n\n--q\nContent-Type: message/feedback-report\n\n\x00\x00garbage\n--q--\n"),
        crlf("From: no-reply@sns.amazonaws.com\n\n") + b'{"notificationType": "Complaint", "complaint": [1,2]' + b"[" * 100000,
        crlf("From: no-reply@sns.amazonaws.com\n\n") + b'{"notificationType": "Complaint", "complaint": {"complainedRecipients": "nope"}}',
    ],
    ids=["truncated", "empty-type", "garbage-part", "deep-json", "wrong-json-shapes"],
)
def test_hostile_complaints_never_raise(raw: bytes) -> None:
    rep = parse_report(raw)
    assert rep.kind in ("arf", "dsn", "unknown", "error", "auto_reply")
    for r in rep.recipients:
        assert r.category in ("complaint", "unknown_user", "transient_other", "permanent_other") or r.category
