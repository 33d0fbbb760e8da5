"""One entry point for inbound feedback mail: ``parse_report(raw) -> Report``.

Decides what a message is (a delivery status notification, a complaint, an
auto-reply, or something else) and turns it into per-recipient rows with a
category from the classifier, so the inbound listener and the reputation code
see one shape whatever the sender's format. Never raises: a message that
cannot be read becomes ``Report(kind="error")``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.feedback import arf as arf_mod
from engine.feedback import dsn as dsn_mod
from engine.feedback import mimeutil
from engine.feedback.classify import Classification, Classifier, default_classifier, find_codes

KINDS = ("dsn", "arf", "auto_reply", "unknown", "error")


@dataclass
class RecipientResult:
    """What happened to one recipient, in the engine's vocabulary."""

    recipient: str | None
    status: str | None
    reply: str | None
    category: str
    permanent: bool | None
    feedback_type: str | None = None
    action: str | None = None
    original_recipient: str | None = None
    remote_mta: str | None = None
    rule: str | None = None
    hard: bool = False
    smtp_command: str | None = None  # the SMTP stage the reply answered, when the bounce shows it

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    """A parsed inbound report. ``kind`` is one of :data:`KINDS`."""

    kind: str
    recipients: list[RecipientResult] = field(default_factory=list)
    format: str | None = None
    original_message_id: str | None = None
    original_headers: dict[str, str] = field(default_factory=dict)
    report_to: str | None = None  # where the report was addressed: a VERP return path maps it back
    report_from: str | None = None  # for auto-replies: the recipient who replied
    subject: str | None = None
    error: str | None = None


_AUTO_SUBJECT = re.compile(
    r"(?i)^\s*(auto(matic|matische)?[ _-]?(reply|response|respons|antwort|answer|svar|risposta)|auto:|autoreply|"
    r"out of (the )?office|ooo\b|away from|i am away|on vacation|vacation|abwesen|absence|"
    r"r[ée]ponse automatique|respuesta autom[aá]tica|risposta automatica|resposta autom[aá]tica|"
    r"automatisch antwoord|fuera de la oficina|niet aanwezig|poza biurem)"
)


def _is_auto_reply(msg: Any, strict: bool) -> bool:
    """RFC 3834 and common vendor markers of an auto-reply (out-of-office, vacation, autoresponder)."""
    auto_sub = mimeutil.header(msg, "Auto-Submitted").lower()
    if any(mimeutil.header(msg, h) for h in ("X-Autoreply", "X-Autorespond", "X-Auto-Reply", "X-Vacation")):
        return True
    if mimeutil.header(msg, "Precedence").lower() in ("auto_reply", "auto-reply"):
        return True
    if _AUTO_SUBJECT.search(mimeutil.header(msg, "Subject")):
        return True
    if "oof" in mimeutil.header(msg, "X-MS-Exchange-Inbox-Rules-Loop").lower():
        return True
    return not strict and auto_sub.startswith("auto-replied")


def _verp_to(msg: Any) -> str | None:
    for name in ("X-Original-To", "Delivered-To", "To", "Envelope-To"):
        v = mimeutil.header(msg, name)
        m = dsn_mod._ADDR_RE.search(v)
        if m:
            return m.group(0).lower()
    return None


def _sender(msg: Any) -> str | None:
    m = dsn_mod._ADDR_RE.search(mimeutil.header(msg, "From"))
    return m.group(0).lower() if m else None


def parse_report(raw: bytes, classifier: Classifier | None = None) -> Report:
    """Parse one inbound message. Never raises; hostile input gives kind ``error`` or ``unknown``."""
    try:
        return _parse(raw, classifier or default_classifier())
    except Exception as exc:  # noqa: BLE001 - the contract is "never raise on input"
        return Report(kind="error", error=f"{type(exc).__name__}: {exc}"[:500])


_NESTED_DSN_RE = re.compile(r"(?i)report-type=\"?delivery-status|^From:[^\n]{0,80}mailer-daemon", re.M)


def _nested_bounce(an: dsn_mod.Anatomy, quoted: str, clf: Classifier, depth: int) -> Report | None:
    """A bounce forwarded inside another message (a helpdesk relaying a bounce): parse the inner one."""
    if depth >= 2:
        return None
    inner: bytes | None = None
    if quoted and _NESTED_DSN_RE.search(quoted[:20000]):
        inner = quoted.lstrip().encode("utf-8", "replace")
        if inner.startswith(b"From "):
            inner = inner.split(b"\n", 1)[-1]
    elif an.original is not None:
        try:
            blob = an.original.as_bytes()[: mimeutil.MAX_RAW]
        except Exception:  # noqa: BLE001
            blob = b""
        if _NESTED_DSN_RE.search(blob[:20000].decode("latin-1")):
            inner = blob
    if not inner:
        return None
    rep = _parse(inner, clf, depth + 1)
    return rep if rep.kind == "dsn" and rep.recipients else None


def _parse(raw: bytes, clf: Classifier, depth: int = 0) -> Report:
    msg = mimeutil.load_message(raw)
    an = dsn_mod.anatomy(msg)
    base: dict[str, Any] = dict(report_to=_verp_to(msg), report_from=_sender(msg), subject=mimeutil.header(msg, "Subject")[:500] or None)

    if an.feedback_texts or an.report_type == "feedback-report":
        fb = arf_mod.parse_arf(msg, an)
        if fb is not None:
            return _complaint_report(fb, base)

    for text in an.human_texts[:3]:
        doc = mimeutil.ses_notification(text)
        if doc is not None:
            kind = str(doc.get("notificationType") or doc.get("eventType")).lower()
            if kind == "complaint":
                fb = arf_mod.parse_arf(msg, an)
                if fb is not None:
                    return _complaint_report(fb, base)
            elif kind in ("bounce", "delivery"):
                return _ses_report(doc, clf, base)

    if an.status_texts or an.report_type == "delivery-status":
        d = dsn_mod.parse_dsn(msg, an)
        if d is not None and d.recipients:
            return _dsn_report(d, clf, base)

    human = "\n\n".join(an.human_texts)
    bounce_text, _ = dsn_mod.split_original(human)
    bounce_like = dsn_mod.looks_like_bounce(msg, an, bounce_text)
    fb = arf_mod.parse_arf(msg, an)
    if fb is not None:
        return _complaint_report(fb, base)

    if not bounce_like and _is_auto_reply(msg, strict=False):
        return Report(kind="auto_reply", format="rfc3834", **base)
    if bounce_like and _is_auto_reply(msg, strict=True) and not mimeutil.header(msg, "X-Failed-Recipients"):
        return Report(kind="auto_reply", format="rfc3834", **base)

    human_quoted = dsn_mod.split_original(human)[1]
    nested = _nested_bounce(an, human_quoted, clf, depth) if bounce_like else None
    if nested is not None:
        return nested

    d = dsn_mod.parse_dsn(msg, an)
    if d is not None and d.recipients:
        return _dsn_report(d, clf, base)
    return Report(kind="unknown", **base)


def _complaint_report(fb: arf_mod.FeedbackReport, base: dict[str, Any]) -> Report:
    rows = [
        RecipientResult(
            recipient=r, status=None, reply=None, category="complaint", permanent=None,
            feedback_type=fb.feedback_type, rule=f"feedback:{fb.format}",
        )
        for r in (fb.recipients or [None])  # type: ignore[list-item]
    ]
    return Report(
        kind="arf", recipients=rows, format=fb.format, original_message_id=fb.original_message_id,
        original_headers=fb.original_headers, **base,
    )


def _ses_report(doc: dict[str, Any], clf: Classifier, base: dict[str, Any]) -> Report:
    rows: list[RecipientResult] = []
    mail = doc.get("mail") or {}
    if str(doc.get("notificationType") or doc.get("eventType")).lower() == "delivery":
        delivery = doc.get("delivery") or {}
        for r in delivery.get("recipients", [])[: dsn_mod.MAX_RECIPIENTS]:
            reply = str(delivery.get("smtpResponse") or "") or None
            c = clf.classify_reply(reply or "250 2.0.0")
            rows.append(RecipientResult(str(r).lower(), find_codes(reply or "")[1], reply, "delivered", False, action="delivered", rule=c.rule))
    else:
        bounce = doc.get("bounce") or {}
        for r in bounce.get("bouncedRecipients", [])[: dsn_mod.MAX_RECIPIENTS]:
            if not isinstance(r, dict):
                continue
            d = dsn_mod.DsnRecipient(
                final_recipient=str(r.get("emailAddress") or "").lower() or None,
                action=r.get("action"),
                status=r.get("status"),
                diagnostic_code=dsn_mod._typed_value(r.get("diagnosticCode")),
                remote_mta=dsn_mod._typed_value(bounce.get("remoteMtaIp")),
            )
            hint = None if bounce.get("bounceType") not in ("Permanent", "Transient") else bounce.get("bounceType") == "Permanent"
            rows.append(_row(d, clf, "", hint))
    headers = {h.get("name", ""): str(h.get("value", ""))[:2000] for h in mail.get("headers", [])[:100] if isinstance(h, dict)}
    return Report(kind="dsn", recipients=rows, format="amazonses", original_message_id=mail.get("messageId"), original_headers=headers, **base)


def _dsn_report(d: dsn_mod.Dsn, clf: Classifier, base: dict[str, Any]) -> Report:
    rows = [_row(r, clf, d.human_text, d.permanent_hint) for r in d.recipients]
    return Report(
        kind="dsn",
        recipients=rows,
        format=d.format,
        original_message_id=dsn_mod.original_message_id(d.original_headers),
        original_headers=d.original_headers,
        **base,
    )


def _row(r: dsn_mod.DsnRecipient, clf: Classifier, prose: str, hint: bool | None) -> RecipientResult:
    diag = (r.diagnostic_code or "").strip()
    code, enhanced = find_codes(diag) if diag else (None, None)
    # The server's own code is usually more precise than the reporting MTA's Status (often x.0.0).
    status = enhanced if enhanced and enhanced[0] in "45" else r.status or enhanced
    action = (r.action or "").lower() or None
    if action in ("delivered", "relayed", "expanded"):
        c = Classification("delivered", False, f"dsn:action={action}")
    else:
        c = clf.classify(code, enhanced or status, diag)
        if c.rule.startswith(("default:", "rfc", "rfc3463", "rfc5321")) and prose:
            # the server's words were missing or generic: try the bounce's own prose
            # (its diagnostic sentence; with no diagnostic at all, its opening text)
            for extra in (dsn_mod.prose_diagnostic(prose), "" if diag else prose[:_PROSE_CLASSIFY_CHARS]):
                if not extra:
                    continue
                c2 = clf.classify(code, enhanced or status, diag + " " + extra)
                if not c2.rule.startswith(("default:", "rfc")):
                    c = c2
                    break
        if code is None and enhanced is None and status is None:
            perm = True if action == "failed" else False if action == "delayed" else hint
            if perm is not None and perm != c.permanent:
                c = Classification(_flip(c.category, perm), perm, c.rule)
        elif action == "delayed" and c.permanent:
            c = Classification(_flip(c.category, False), False, c.rule)
    if (r.smtp_command == "MAIL" or _AT_MAIL_FROM.search(diag)) and c.category in _RECIPIENT_CATEGORIES:
        # rejected at MAIL FROM: the problem is our sender (domain, address), not this recipient
        c = Classification("policy", c.permanent, c.rule + "+mail_from")
    c = _weigh_unknown_user(c, enhanced, r.smtp_command)
    return RecipientResult(
        recipient=r.final_recipient,
        status=status,
        reply=diag or None,
        category=c.category,
        permanent=c.permanent,
        action=action,
        original_recipient=r.original_recipient,
        remote_mta=r.remote_mta,
        rule=c.rule,
        hard=c.hard,
        smtp_command=r.smtp_command,
    )


def _weigh_unknown_user(c: Classification, reply_enhanced: str | None, stage: str | None) -> Classification:
    """Keep "user unknown" (a hard bounce: the address gets suppressed) only when nothing contradicts it.

    Why: suppression is forever, so a false hard bounce loses a real customer. The
    words "user unknown" say the address does not exist when the recipient lookup
    said them, i.e. at RCPT. Said after end-of-data they come from a content filter
    rejecting a message, not an address (Sisimai's "filtered"): policy, not hard.
    Exceptions that stay hard: the reply's own X.1.1 code (RFC 3463 "the mailbox
    does not exist", a machine-readable verdict on the address) and provider rules
    (their wording is known to come from the provider's account lookup, e.g. Yahoo's
    "dd This user doesn't have a yahoo.com account", which it gives after DATA).
    A reply whose own code is X.7.x is the server's policy decision unless it came at RCPT.
    """
    if c.category != "unknown_user" or not c.permanent:
        return c
    generic = c.rule.startswith(_GENERIC_RULES)
    if stage == "DATA" and generic and reply_enhanced not in ("5.1.1", "4.1.1"):
        return Classification("policy", c.permanent, c.rule + "+after_data")
    if stage != "RCPT" and reply_enhanced and reply_enhanced[1:4] == ".7.":
        return Classification("policy", c.permanent, c.rule + "+x.7")
    return c


_GENERIC_RULES = ("generic.", "weak.", "rfc", "default:")


_PROSE_CLASSIFY_CHARS = 1500  # a bounce's reason is in its first paragraphs; the rest is boilerplate
_AT_MAIL_FROM = re.compile(r"(?i)after MAIL FROM:|in reply to MAIL FROM command|>>> MAIL FROM:")
_RECIPIENT_CATEGORIES = frozenset({"unknown_user", "bad_domain", "mailbox_disabled", "mailbox_full", "transient_other", "permanent_other"})


def _flip(category: str, permanent: bool) -> str:
    if category in ("transient_other", "permanent_other"):
        return "permanent_other" if permanent else "transient_other"
    return category
