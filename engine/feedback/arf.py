"""Complaint reports: RFC 5965 ARF, plus the non-ARF formats mailbox providers still send.

A complaint must map back to the recipient who complained, so besides the
``message/feedback-report`` fields we read the embedded original message (its
To, Message-ID and our own X-headers). Non-ARF formats handled best-effort:
Microsoft JMRP-style forwards (``X-HmXmrOriginalRecipient``), Apple Mail's
one-click unsubscribe mail (``X-Apple-Unsubscribe``) and Amazon SES JSON
complaint notifications.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.message import Message

from engine.feedback import mimeutil
from engine.feedback.dsn import _ADDR_RE, Anatomy, anatomy, original_message_id, parse_field_blocks


@dataclass
class FeedbackReport:
    """One complaint (it may name several recipients)."""

    feedback_type: str
    recipients: list[str] = field(default_factory=list)
    user_agent: str | None = None
    version: str | None = None
    original_mail_from: str | None = None
    original_message_id: str | None = None
    source_ip: str | None = None
    arrival_date: str | None = None
    reported_domain: str | None = None
    reporting_mta: str | None = None
    original_headers: dict[str, str] = field(default_factory=dict)
    format: str = "arf"


def _multi(text: str, name: str) -> list[str]:
    """All values of a repeated field (Original-Rcpt-To may appear once per recipient)."""
    pat = re.compile(rf"(?im)^{re.escape(name)}:\s*(.+)$")
    return [m.group(1).strip() for m in pat.finditer(text)]


def _addresses(values: list[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        for a in _ADDR_RE.findall(v):
            a = a.lower()
            if a not in out:
                out.append(a)
    return out


def parse_arf(msg: Message, an: Anatomy | None = None) -> FeedbackReport | None:
    """A complaint report from ``msg``, or None when it is not one."""
    an = an or anatomy(msg)
    if an.feedback_texts:
        return _from_feedback_part(msg, an)
    return _non_arf(msg, an)


def _from_feedback_part(msg: Message, an: Anatomy) -> FeedbackReport:
    text = "\n".join(an.feedback_texts)
    blocks = parse_field_blocks(text)
    fields: dict[str, str] = {}
    for b in blocks:
        for k, v in b.items():
            fields.setdefault(k, v)
    orig_headers = mimeutil.headers_dict(an.original) if an.original is not None else {}
    rcpts = _addresses(_multi(text, "Original-Rcpt-To"))
    if not rcpts:
        rcpts = _addresses([_hdr(orig_headers, "To"), _hdr(orig_headers, "X-HmXmrOriginalRecipient")])
    mail_from = _addresses([fields.get("original-mail-from", "")])
    return FeedbackReport(
        feedback_type=(fields.get("feedback-type") or "other").strip().lower().split()[0] if (fields.get("feedback-type") or "").strip() else "other",
        recipients=rcpts,
        user_agent=fields.get("user-agent"),
        version=fields.get("version"),
        original_mail_from=mail_from[0] if mail_from else None,
        original_message_id=original_message_id(orig_headers),
        source_ip=(fields.get("source-ip") or None),
        arrival_date=fields.get("arrival-date") or fields.get("received-date"),
        reported_domain=fields.get("reported-domain"),
        reporting_mta=fields.get("reporting-mta"),
        original_headers=orig_headers,
        format="arf",
    )


def _hdr(headers: dict[str, str], name: str) -> str:
    for k, v in headers.items():
        if k.lower() == name.lower():
            return v
    return ""


_COMPLAINT_SUBJECT = re.compile(r"(?i)complaint about message from|abuse report|spam report|feedback report")


def _non_arf(msg: Message, an: Anatomy) -> FeedbackReport | None:
    # Amazon SES complaint notification (JSON, possibly wrapped in SNS)
    for text in an.human_texts[:3]:
        doc = mimeutil.ses_notification(text)
        if doc and str(doc.get("notificationType") or doc.get("eventType")).lower() == "complaint":
            comp = doc.get("complaint") or {}
            mail = doc.get("mail") or {}
            rcpts = [str(r.get("emailAddress", "")).lower() for r in comp.get("complainedRecipients", []) if isinstance(r, dict)]
            return FeedbackReport(
                feedback_type=str(comp.get("complaintFeedbackType") or "abuse").lower(),
                recipients=[r for r in rcpts if r],
                user_agent=comp.get("userAgent"),
                original_message_id=mail.get("messageId"),
                original_mail_from=mail.get("source"),
                arrival_date=comp.get("arrivalDate") or comp.get("timestamp"),
                source_ip=mail.get("sourceIp"),
                format="amazonses",
            )
    # Apple Mail one-click unsubscribe: the complainer writes to our List-Unsubscribe mailto
    if mimeutil.header(msg, "X-Apple-Unsubscribe").lower() == "true":
        return FeedbackReport(
            feedback_type="opt-out",
            recipients=_addresses([mimeutil.header(msg, "From")]),
            user_agent="Apple Mail",
            original_message_id=None,
            format="apple-unsubscribe",
            original_headers={"To": mimeutil.header(msg, "To")},
        )
    # Microsoft JMRP / forwarded complaint: an attached original with the complainer's address
    if an.original is not None:
        orig = mimeutil.headers_dict(an.original)
        hm = _hdr(orig, "X-HmXmrOriginalRecipient")
        if hm or _COMPLAINT_SUBJECT.search(mimeutil.header(msg, "Subject")):
            rcpts = _addresses([hm]) or _addresses([_hdr(orig, "To")])
            return FeedbackReport(
                feedback_type="abuse",
                recipients=rcpts,
                original_message_id=original_message_id(orig),
                source_ip=_hdr(orig, "X-Reporter-IP") or None,
                original_headers=orig,
                format="jmrp" if hm else "forwarded",
            )
    return None
