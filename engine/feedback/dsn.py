"""Delivery status notifications: RFC 3464 and the non-standard bounces of common MTAs.

Standard DSNs (``multipart/report; report-type=delivery-status``) carry one
block of fields per recipient; we read those. Many MTAs and providers still
send plain-text bounces (qmail, Exim, old Postfix and Sendmail, Exchange 2003,
Gmail's old format, Yahoo, ...), so when there is no status part we fall back
to recognising their wording: recipient lines, the diagnostic that follows,
and the SMTP codes inside it. The aim is "the recipient and the server's
reply", which is what classification and suppression need.

Everything here works on a message already parsed by :mod:`mimeutil` (bounded
and never raising); these functions themselves never raise on odd input.

Why one module of ~600 lines: the RFC 3464 reader and the plain-text fallback
share one vocabulary (recipient lines, diagnostic blocks, SMTP-stage detection)
and are tuned together against the same corpus; splitting them would put one
grammar in two files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

from engine.feedback import mimeutil
from engine.feedback.classify import find_codes

ADDR = r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,128}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}"
_ADDR_RE = re.compile(rf"(?<![\w.+=/-]){ADDR}(?![\w-])")
_STATUS_RE = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")

MAX_RECIPIENTS = 500


@dataclass
class DsnRecipient:
    """One recipient's delivery status as the report states it (fields as in RFC 3464)."""

    final_recipient: str | None
    original_recipient: str | None = None
    action: str | None = None
    status: str | None = None
    diagnostic_code: str | None = None
    remote_mta: str | None = None
    last_attempt_date: str | None = None
    smtp_command: str | None = None  # the SMTP stage the reply answered (CONN/EHLO/MAIL/RCPT/DATA), when the bounce shows it


@dataclass
class Dsn:
    """What a bounce says: per-recipient results plus what identifies the original message."""

    format: str
    recipients: list[DsnRecipient] = field(default_factory=list)
    reporting_mta: str | None = None
    original_headers: dict[str, str] = field(default_factory=dict)
    human_text: str = ""
    permanent_hint: bool | None = None


# --------------------------------------------------------------------------- field blocks


def parse_field_blocks(text: str) -> list[dict[str, str]]:
    """``Name: value`` blocks separated by blank lines (RFC 822 style, with continuations).

    Keys are lower-cased; the first value of a repeated key wins.
    """
    blocks: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    last: str | None = None
    for line in text.splitlines()[:5000]:
        if not line.strip():
            if cur:
                blocks.append(cur)
            cur, last = {}, None
            continue
        if line[:1] in (" ", "\t") and last is not None:
            cur[last] = (cur[last] + " " + line.strip()).strip()
            continue
        m = re.match(r"^([A-Za-z][A-Za-z0-9-]{0,40}) ?:\s*(.*)$", line)  # Mimecast writes "Final-Recipient : ..."
        if m:
            key = m.group(1).lower()
            if key not in cur:
                cur[key] = m.group(2).strip()
                last = key
            else:
                last = None
        else:
            last = None
    if cur:
        blocks.append(cur)
    return blocks


def _typed_value(value: str | None) -> str | None:
    """``rfc822; <a@b>`` -> ``a@b``; ``smtp; 550 ...`` -> ``550 ...``."""
    if not value:
        return None
    v = value.strip()
    if ";" in v:
        kind, _, rest = v.partition(";")
        if re.fullmatch(r"\s*[A-Za-z0-9-]{1,20}\s*", kind):
            v = rest.strip()
    v = v.strip()
    return v or None


def _address(value: str | None) -> str | None:
    v = _typed_value(value)
    if not v:
        return None
    m = _ADDR_RE.search(v)
    return m.group(0).strip().lower() if m else None


_RECIPIENT_KEYS = ("final-recipient", "original-recipient", "x-actual-recipient")


def recipients_from_blocks(blocks: list[dict[str, str]]) -> tuple[str | None, list[DsnRecipient]]:
    """Reporting MTA and per-recipient rows from parsed delivery-status blocks."""
    reporting = None
    out: list[DsnRecipient] = []
    for b in blocks:
        if "reporting-mta" in b and reporting is None:
            reporting = _typed_value(b["reporting-mta"])
        if not any(k in b for k in _RECIPIENT_KEYS):
            continue
        final = _address(b.get("final-recipient")) or _address(b.get("x-actual-recipient")) or _address(b.get("original-recipient"))
        status = None
        if b.get("status"):
            m = _STATUS_RE.search(b["status"])
            status = f"{m.group(1)}.{int(m.group(2))}.{int(m.group(3))}" if m else None
        out.append(
            DsnRecipient(
                final_recipient=final,
                original_recipient=_address(b.get("original-recipient")),
                action=(b.get("action") or "").strip().lower().split()[0] if (b.get("action") or "").strip() else None,
                status=status,
                diagnostic_code=_typed_value(b.get("diagnostic-code")),
                remote_mta=_typed_value(b.get("remote-mta")),
                last_attempt_date=b.get("last-attempt-date"),
            )
        )
        if len(out) >= MAX_RECIPIENTS:
            break
    return reporting, out


# --------------------------------------------------------------------------- message anatomy

# Lines after which a plain-text bounce quotes the original message.
_ORIGINAL_SEPARATORS = re.compile(
    r"(?im)^[ \t>*-]*(?:"
    r"[^\n]{0,40}copy of the (?:original )?message[^\n]{0,60}"
    r"|-* ?original message (?:follows|headers?|is attached|below|text)[^\n]{0,40}"
    r"|-+ ?original message ?-+"
    r"|original message:?"
    r"|[^\n]{0,20}(?:unsent|returned|undelivered|bounced|rejected) (?:message|mail|e-?mail)(?: headers?)?(?: (?:follows|below|was))?[^\n]{0,20}"
    r"|[^\n]{0,20}message headers? follows?[^\n]{0,20}"
    r"|[^\n]{0,30}headers? of the original message[^\n]{0,40}"
    r"|bounced e-?mail:"
    r"|content-type: (?:message/rfc822|text/rfc822-headers)[^\n]{0,40}"
    r")[ \t]*$"
    r"|(?:^|\n)\s*\n(?=(?:Received: from |Return-Path: |DKIM-Signature: |Delivered-To: ))"
)


def split_original(text: str) -> tuple[str, str]:
    """(bounce text, quoted original) split at the usual separators."""
    m = _ORIGINAL_SEPARATORS.search(text)
    if not m:
        return text, ""
    return text[: m.start()], text[m.end():]


@dataclass
class Anatomy:
    """The parts of a report message that matter, found once."""

    status_texts: list[str] = field(default_factory=list)
    human_texts: list[str] = field(default_factory=list)
    original: Message | None = None
    original_text: str = ""
    feedback_texts: list[str] = field(default_factory=list)
    report_type: str = ""


def anatomy(msg: Message) -> Anatomy:
    """Sort the parts of ``msg`` into status blocks, human text and the original message."""
    a = Anatomy()
    try:
        param = msg.get_param("report-type") if mimeutil.content_type(msg) == "multipart/report" else None
        a.report_type = param.lower() if isinstance(param, str) else ""
    except Exception:  # noqa: BLE001
        a.report_type = ""
    inside_original: set[int] = set()
    for part, _depth in mimeutil.iter_parts(msg):
        if id(part) in inside_original:
            if part.is_multipart():
                for child in _children(part):
                    inside_original.add(id(child))
            continue
        ctype = mimeutil.content_type(part)
        if ctype in ("message/delivery-status", "message/global-delivery-status"):
            a.status_texts.append(mimeutil.part_text(part))
        elif ctype == "message/feedback-report":
            a.feedback_texts.append(mimeutil.part_text(part))
        elif ctype in ("message/rfc822", "message/global", "message/partial"):
            if a.original is None:
                children = _children(part)
                if children:
                    a.original = children[0]
            for child in _children(part):
                inside_original.add(id(child))
        elif ctype in ("text/rfc822-headers", "message/rfc822-headers", "text/rfc822-header"):
            if a.original is None:
                a.original = mimeutil.load_message(mimeutil.part_bytes(part) + b"\n\n")
        elif ctype.startswith("text/") or (ctype.startswith("multipart/") and not part.is_multipart()):
            # a multipart whose parts could not be found is read as text (its body is all we have)
            text = mimeutil.part_text(part)
            if ctype == "text/plain" and a.human_texts and re.search(r"(?im)^final-recipient ?:", text) and re.search(r"(?im)^status ?:", text):
                a.status_texts.append(text)  # a delivery-status block sent as text/plain
            else:
                a.human_texts.append(text)
    return a


def _children(part: Message) -> list[Message]:
    try:
        payload = part.get_payload()
    except Exception:  # noqa: BLE001
        return []
    if isinstance(payload, list):
        return [p for p in payload[: mimeutil.MAX_PARTS] if isinstance(p, Message)]
    return []


# --------------------------------------------------------------------------- text heuristics

_PERMANENT_HINT = re.compile(
    r"(?i)permanent(ly)? (error|failure|fatal)|failed permanently|this is a permanent error|"
    r"i've given up|unrecoverable error|could not be delivered|delivery has failed|undeliverable|"
    r"no further delivery attempts|permanent fatal errors"
)
_TEMPORARY_HINT = re.compile(
    r"(?i)has been delayed|will be retried|will retry|delivery (is )?delayed|temporary failure|"
    r"still (trying|undelivered)|not yet been delivered|this is only a warning|warning: message still undelivered|"
    r"delivery to the following recipients? (has been|is) delayed"
)


def permanent_hint(text: str) -> bool | None:
    """Does the bounce prose say it gave up (True) or will retry (False)?"""
    head = text[:6000]
    tmp = _TEMPORARY_HINT.search(head)
    perm = _PERMANENT_HINT.search(head)
    if tmp and (not perm or tmp.start() < perm.start()):
        return False
    if perm:
        return True
    return None


_SERVICE_ADDR = re.compile(r"(?i)^(mailer-daemon|postmaster|mail-daemon|maildaemon|noreply|no-reply|abuse|bounce[s]?|root|daemon)@")


def _block_after(text: str, start: int, limit: int = 1200) -> str:
    """The paragraph(s) after ``start``: the diagnostic that follows a recipient line."""
    chunk = text[start : start + limit]
    lines = chunk.splitlines()
    out: list[str] = []
    blank_run = 0
    for i, ln in enumerate(lines):
        if not ln.strip():
            blank_run += 1
            if out and (blank_run >= 1 and i > 1 and len(out) >= 2):
                break
            continue
        blank_run = 0
        if out and _ADDR_START_RE.match(ln) and i > 0:
            break
        out.append(ln.strip())
    return " ".join(out).strip()


# A line that is (almost) only an address: the recipient list style of qmail, Exim, Gmail, Sendmail.
_ADDR_LINE_RE = re.compile(rf"^\s*(?:RCPT TO:\s*)?[<\"]?({ADDR})[>\"]?\s*(?:\(.*\))?\s*:?\s*$")
# A line that starts with an address: the next recipient's entry begins.
_ADDR_START_RE = re.compile(rf"^\s*(?:RCPT TO:\s*)?[\"<]?{ADDR}[\">]?(?::|\s|$)")
# Exchange 2003 and others: "addr on <date>" then an indented reason.
_ADDR_ON_RE = re.compile(rf"(?m)^\s*<?({ADDR})>?\s+on\s+\S.{{3,60}}$")
# qmail: "<addr>:" then the diagnostic on the following lines.
_QMAIL_RE = re.compile(rf"(?m)^<({ADDR})>:\s*$")
# Postfix/Sendmail one-liners: "<addr>: host x said: 550 ..." or "<addr>... User unknown"
_INLINE_RE = re.compile(rf"(?m)^\s*<({ADDR})>(?:\s*\(expanded from [^)]*\))?(?::|\.\.\.)\s*(\S.*)$")
_BRACKETED_RE = re.compile(rf"<({ADDR})>")
_CODE_WITH_ADDR_RE = re.compile(rf"(?m)^.*?\b([245]\d\d)[ -]+(?:[245]\.\d{{1,3}}\.\d{{1,3}}\s+)?.*?<?({ADDR})>?.*$")


def _candidate_rows(text: str, exclude: set[str], failed_hdr: list[str]) -> list[tuple[str, str]]:
    """(recipient, diagnostic) pairs found in bounce prose, most specific formats first."""
    seen: dict[str, str] = {}

    def add(addr: str, diag: str, weak: bool = False) -> None:
        a = addr.lower().strip(".")
        if weak and (a in exclude or _SERVICE_ADDR.match(a)):
            return
        if _SERVICE_ADDR.match(a) and a not in failed_hdr and a in exclude:
            return
        if a not in seen or (not seen[a] and diag):
            seen[a] = diag

    for m in _QMAIL_RE.finditer(text):
        add(m.group(1), _block_after(text, m.end()))
    for m in _INLINE_RE.finditer(text):
        add(m.group(1), (m.group(2) + " " + _block_after(text, m.end())).strip())
    for m in _ADDR_ON_RE.finditer(text):
        add(m.group(1), _block_after(text, m.end()))
    pos = 0
    for line in text.splitlines(keepends=True):
        lm = _ADDR_LINE_RE.match(line)
        if lm:
            add(lm.group(1), _block_after(text, pos + len(line)))
        pos += len(line)
    for addr in failed_hdr:
        if addr not in seen:
            idx = text.lower().find(addr)
            add(addr, _block_after(text, idx + len(addr)) if idx >= 0 else "")
    if not seen:
        for m in _CODE_WITH_ADDR_RE.finditer(text):
            add(m.group(2), m.group(0).strip(), weak=True)
    if not seen:
        # an address in angle brackets in the prose: "could not be delivered to: <a@b>"
        for m in _BRACKETED_RE.finditer(text):
            add(m.group(1), _sentence_around(text, m.start(), m.end()), weak=True)
            if len(seen) >= 20:
                break
    if not seen:
        # last resort: addresses mentioned in the prose, outside URLs
        for m in _ADDR_RE.finditer(text):
            before = text[max(0, m.start() - 12) : m.start()]
            if "://" in before or "mailto:" in before.lower() or "=" in before[-1:]:
                continue
            add(m.group(0), _sentence_around(text, m.start(), m.end()), weak=True)
            if len(seen) >= 20:
                break
    return list(seen.items())[:MAX_RECIPIENTS]


def _paragraph_with(text: str, addr: str) -> str:
    """The paragraph that mentions ``addr`` (Lotus Notes puts the reason on the line before it)."""
    idx = text.lower().find(addr.lower())
    return _sentence_around(text, idx, idx + len(addr)) if idx >= 0 else ""


def _sentence_around(text: str, start: int, end: int) -> str:
    a = text.rfind("\n\n", 0, start)
    b = text.find("\n\n", end)
    para = text[a + 1 if a >= 0 else 0 : b if b >= 0 else end + 600]
    return re.sub(r"\s+", " ", para).strip()[:1500]


def _diagnostic_for(text: str, addr: str) -> str:
    """Find the server's words about ``addr`` in the prose (for DSNs with an empty Diagnostic-Code)."""
    low = text.lower()
    idx = low.find(addr.lower())
    best = ""
    while idx >= 0 and not best:
        block = _block_after(text, idx + len(addr))
        if find_codes(block) != (None, None) or len(block) > 20:
            best = block
        idx = low.find(addr.lower(), idx + 1)
    return best


_TRANSCRIPT_RE = re.compile(r"(?m)^(?:<<<|>>>)?\s*([45]\d\d)[ -]((?:[245]\.\d{1,3}\.\d{1,3}\s+)?.*)$")


def _smtp_lines(text: str) -> str:
    """The server reply lines in a text (Sendmail transcripts, Gmail's 'The error that the other server returned was')."""
    lines = [f"{m.group(1)} {m.group(2).strip()}" for m in _TRANSCRIPT_RE.finditer(text)]
    return " ".join(lines[:6])


_PROSE_DIAG = re.compile(
    r"(?is)(?:technical details of (?:permanent|temporary) failure:|the (?:error|response) (?:that the other server returned )?was:|"
    r"the response from the remote server was:|reason:|diagnostic[- ]code:|remote host said:|said:|"
    r"error message was:|the following error|delivery failed:|the error was:|because:|the problem appears to be\s*:|"
    r"additional information follows\s*:|failure reasons\s*-*)\s*(.{3,800}?)(?:\n\s*\n|$)"
)


def prose_diagnostic(text: str) -> str:
    m = _PROSE_DIAG.search(text)
    return re.sub(r"\s+", " ", m.group(1)).strip() if m else ""


# --------------------------------------------------------------------------- SMTP stage

# Why: a "user unknown" given at RCPT comes from the recipient lookup (the address is bad);
# the same words after end-of-data come from a content filter (the address may well exist).
# Only what the bounce itself says counts; no stage is guessed from the MTA's name.
_STAGE_PHRASES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("DATA", re.compile(
        r"(?i)in\s+reply\s+to\s+(?:end\s+of\s+)?DATA\s+command|after\s+end\s+of\s+data|after\s+(?:the\s+)?DATA\b"
        r"|during\s+DATA\b|in\s+reply\s+to\s+(?:the\s+)?end\s+of\s+data|(?m:^-+\s*SMTP\s+command\s*\n\s*DATA\s*$)"
    )),
    ("RCPT", re.compile(r"(?i)in\s+reply\s+to\s+RCPT\s+TO\s+command|after\s+RCPT\b|(?m:^-+\s*SMTP\s+command\s*\n\s*RCPT\b)")),
    ("MAIL", re.compile(r"(?i)in\s+reply\s+to\s+MAIL\s+FROM\s+command|after\s+MAIL\s+FROM\b|(?m:^-+\s*SMTP\s+command\s*\n\s*MAIL\b)")),
    ("EHLO", re.compile(r"(?i)in\s+reply\s+to\s+(?:EHLO|HELO)\s+command|after\s+(?:EHLO|HELO)\b")),
    ("CONN", re.compile(r"(?i)after\s+initial\s+connection|in\s+reply\s+to\s+(?:the\s+)?initial\s+(?:greeting|connection)")),
)
_SENT_RE = re.compile(r"^\s*>>>\s*(\S+)")
_RECV_RE = re.compile(r"^\s*<<<\s*([245]\d\d)")
_CMD_NAMES = {"MAIL": "MAIL", "RCPT": "RCPT", "DATA": "DATA", ".": "DATA", "EHLO": "EHLO", "HELO": "EHLO", "LHLO": "EHLO", "STARTTLS": "EHLO"}


def stage_in_text(text: str) -> str | None:
    """The SMTP stage a reply answered, from MTA wording ("in reply to end of DATA command",
    Exim's "after end of data", m-FILTER's "SMTP command: DATA"); None when no stage is
    named, or when several different stages are (then the text is about several replies)."""
    found = {name for name, rx in _STAGE_PHRASES if rx.search(text or "")}
    return found.pop() if len(found) == 1 else None


def transcript_stage(text: str, addr: str | None) -> str | None:
    """The stage from a Sendmail/Courier-style session transcript (``>>> DATA`` / ``<<< 550 ...``).

    With PIPELINING, RCPT replies arrive after ``>>> DATA`` was sent and the DATA reply
    (often ``503 Need RCPT`` / ``554 no valid recipients``) comes last: so a reply that
    is not the last one after a ``>>> DATA`` answered a RCPT, not the DATA.
    """
    if ">>>" not in text or "<<<" not in text:
        return None
    replies: list[list[Any]] = []  # [command, session number, code, the reply plus the MTA's own notes on it]
    cmd: str | None = None
    session = 0
    for ln in text.splitlines()[:2000]:
        m = _SENT_RE.match(ln)
        if m:
            word = m.group(1).rstrip(":").upper().split(":")[0]
            cmd = _CMD_NAMES.get(word, None if "@" in word else word[:8])
            session += 1
            continue
        m = _RECV_RE.match(ln)
        if m:
            replies.append([cmd, session, m.group(1), ln])
        elif not ln.strip() or re.match(r"(?i)\s*(?:\.\.\.\s*)?while talking to\b", ln):
            cmd, session = None, session + 1  # the end of this exchange
        elif replies and replies[-1][1] == session and "\n" not in replies[-1][3]:
            replies[-1][3] += "\n" + ln  # Sendmail's one line of its own about that reply names the recipient
    errors = [i for i, r in enumerate(replies) if r[2][0] in "45"]
    mine = [i for i in errors if addr and addr.lower() in replies[i][3].lower()]
    if not mine and len(errors) == 1:
        mine = errors
    if not mine:
        return None
    command: str | None = replies[mine[0]][0]
    sess = replies[mine[0]][1]
    if command == "DATA" and any(r[1] == sess for r in replies[mine[0] + 1 :]):
        return "RCPT"  # pipelined: a later reply answered the DATA command
    return command

def recipient_stage(diagnostic: str | None, prose: str, addr: str | None, lone: bool = True) -> str | None:
    """Which SMTP command the recipient's rejection answered, as far as the bounce shows it.

    Looks at the diagnostic, then the prose right after the address, then a session
    transcript; stage wording elsewhere in the prose counts only for a ``lone`` recipient.
    """
    stage = stage_in_text(diagnostic or "")
    if stage:
        return stage
    if addr and prose:
        low = prose.lower()
        idx = low.find(addr.lower())
        while idx >= 0:
            stage = stage_in_text(_block_after(prose, idx + len(addr), 600))
            if stage:
                return stage
            idx = low.find(addr.lower(), idx + len(addr))
    stage = transcript_stage(prose, addr)
    if stage:
        return stage
    # one recipient and one stage named anywhere in the prose: it is about this recipient
    return stage_in_text(prose[:6000]) if lone else None


# --------------------------------------------------------------------------- entry points



def parse_dsn(msg: Message, an: Anatomy | None = None) -> Dsn | None:
    """A bounce's per-recipient results, or None when ``msg`` does not look like a bounce."""
    an = an or anatomy(msg)
    human = "\n\n".join(an.human_texts)
    bounce_text, quoted = split_original(human)
    orig_headers: dict[str, str] = {}
    if an.original is not None:
        orig_headers = mimeutil.headers_dict(an.original)
    elif quoted:
        orig_headers = _headers_from_text(quoted)

    blocks: list[dict[str, str]] = []
    for t in an.status_texts:
        blocks.extend(parse_field_blocks(t))
    reporting, rcpts = recipients_from_blocks(blocks)
    fmt = "rfc3464" if an.status_texts else ""
    if not rcpts and re.search(r"(?im)^final-recipient ?:", bounce_text):
        reporting, rcpts = recipients_from_blocks(parse_field_blocks(bounce_text))
        fmt = "inline-dsn" if rcpts else fmt

    hint = permanent_hint(bounce_text)
    if rcpts:
        for r in rcpts:
            if r.final_recipient and (not r.diagnostic_code or find_codes(r.diagnostic_code) == (None, None) and len(r.diagnostic_code) < 12):
                extra = _diagnostic_for(bounce_text, r.final_recipient)
                if extra:
                    r.diagnostic_code = (r.diagnostic_code + " " + extra).strip() if r.diagnostic_code else extra
            if not r.diagnostic_code:
                r.diagnostic_code = _smtp_lines(bounce_text) or prose_diagnostic(bounce_text) or None
            r.smtp_command = recipient_stage(r.diagnostic_code, bounce_text, r.final_recipient, lone=len(rcpts) == 1)
        return Dsn(fmt, rcpts, reporting, orig_headers, bounce_text[:4000], hint)

    if not looks_like_bounce(msg, an, bounce_text):
        return None
    exclude = _own_addresses(msg)
    failed = [a.lower() for a in _ADDR_RE.findall(mimeutil.header(msg, "X-Failed-Recipients"))]
    rows = _candidate_rows(bounce_text, exclude, failed)
    if not rows:
        # the bounce names no address: the original message's To is the best guess (one address only)
        to = _ADDR_RE.findall(_hdr(orig_headers, "To"))
        if len(to) == 1:
            m = re.search(r"(?i)(address\(es\) failed:|following (recipients?|address(es)?)[^\n]*:)", bounce_text)
            rows = [(to[0].lower(), re.sub(r"\s+", " ", bounce_text[m.end() if m else 0 :]).strip()[:1500])]
    out: list[DsnRecipient] = []
    for addr, diag in rows:
        if find_codes(diag) == (None, None):
            extra = _smtp_lines(bounce_text) or prose_diagnostic(bounce_text)
            if extra and extra not in diag:
                diag = (diag + " " + extra).strip()
        if not diag:
            diag = prose_diagnostic(bounce_text) or _paragraph_with(bounce_text, addr)
        code, enhanced = find_codes(diag)
        stage = recipient_stage(diag, bounce_text, addr, lone=len(rows) == 1)
        out.append(
            DsnRecipient(
                final_recipient=addr, action="failed" if hint is not False else "delayed", status=enhanced,
                diagnostic_code=diag or None, smtp_command=stage,
            )
        )
    return Dsn("heuristic", out, None, orig_headers, bounce_text[:4000], hint)


_BOUNCE_SUBJECT = re.compile(
    r"(?i)undeliver|delivery (status|failure|failed|notification|problem|report)|returned mail|failure notice|"
    r"mail delivery|could not be delivered|not (be )?delivered|delivery has failed|non ?remis|rejected|"
    r"bounce|mail system error|nondeliverable|unzustellbar|returned to sender|delayed mail|warning: could not send|"
    r"failed delivery|message not delivered|error sending message|delivery notification"
)
_BOUNCE_FROM = re.compile(
    r"(?i)mailer-daemon|post_?master|mail delivery|mail-daemon|maildaemon|mdaemon|delivery subsystem|"
    r"mail administrator|system administrator|mailer_daemon"
)


def looks_like_bounce(msg: Message, an: Anatomy, bounce_text: str) -> bool:
    """A plain-text message is treated as a bounce only with a bounce-shaped sender or subject."""
    if an.report_type == "delivery-status" or an.status_texts:
        return True
    if mimeutil.header(msg, "X-Failed-Recipients"):
        return True
    subject = mimeutil.header(msg, "Subject")
    sender = mimeutil.header(msg, "From")
    if _BOUNCE_FROM.search(sender) or _BOUNCE_SUBJECT.search(subject):
        return True
    return bool(
        re.search(
            r"(?i)this is the (qmail-send|mail delivery|postfix) program|delivery status notification|could not be delivered to:\s*<",
            bounce_text[:3000],
        )
    )


def _own_addresses(msg: Message) -> set[str]:
    """Addresses of the bounce itself (its From/To): never a failed recipient."""
    out: set[str] = set()
    for name in ("From", "To", "Reply-To", "Sender", "Return-Path"):
        for a in _ADDR_RE.findall(mimeutil.header(msg, name)):
            out.add(a.lower())
    return out


def _headers_from_text(quoted: str) -> dict[str, str]:
    """Headers of an original message quoted inline after a separator line."""
    text = quoted.lstrip("\r\n")
    # drop a leading mbox "From " line
    if text.startswith("From "):
        text = text.split("\n", 1)[1] if "\n" in text else ""
    head = re.split(r"\r?\n\r?\n", text[:32000], maxsplit=1)[0]
    msg = mimeutil.load_message(head.encode("utf-8", "replace") + b"\n\n")
    headers = mimeutil.headers_dict(msg)
    return headers if any(k.lower() in ("message-id", "from", "to", "subject", "date") for k in headers) else {}


def _hdr(headers: dict[str, str], name: str) -> str:
    for k, v in headers.items():
        if k.lower() == name.lower():
            return v
    return ""


def original_message_id(headers: dict[str, str]) -> str | None:
    for k, v in headers.items():
        if k.lower() == "message-id":
            m = re.search(r"<[^<>\s]{1,500}>", v)
            return m.group(0) if m else (v.strip() or None)
    return None
