"""The direct MIME writer: text, html or text+html messages written straight to bytes.

The stdlib builder (:mod:`engine.compose.mime`) parses every header it is given
into a tree and folds that tree back, and builds a MIMEPart per leaf: ~1 ms a
message. For the shapes nearly every message has (text, html, or both; no
images or attachments; ASCII addresses) the bytes are simple enough to write
directly, about ten times faster. ``build_message`` checks every input first and
then calls :func:`fast_head` and :func:`fast_body`; nothing here validates.

Equivalence with the stdlib builder (same headers in the same order, same
decoded values, same content types, charsets, transfer encodings and decoded
bodies; where the stdlib garbles a value, the value given) is what
tests/test_mime.py checks over generated content. Anything the writer is not
sure about (a value that looks like an encoded word, odd whitespace in a value
that needs folding, a word that cannot fit in 998 characters) is handed to the
stdlib's own header folding, so it comes out exactly as before.
"""

from __future__ import annotations

import base64
import binascii
import email.quoprimime
import random
import re
import sys
from collections.abc import Sequence
from email.headerregistry import Address

from engine.compose.mime_policy import HEADERS, POLICY, MimeError

_MAX_LINE = 78  # POLICY.max_line_length: fold here where possible
_HARD_LINE = 998  # RFC 5322: never longer
_EW_BYTES = 42  # raw bytes per encoded word: 56 base64 chars, "=?utf-8?b?...?=" is 68 wide
_CLEAN_WORDS_RE = re.compile(r"^[^\s]+(?: [^\s]+)*$")
"""Words separated by single spaces: the only whitespace folding and encoding may touch."""
_BODY_7BIT_MAX: int = POLICY.max_line_length or _MAX_LINE  # the policy's 78 (typed optional in the stdlib)


def _stdlib_fold(name: str, value: str) -> str:
    return HEADERS(name, value).fold(policy=POLICY)


def _fold(name: str, pieces: Sequence[str]) -> str | None:
    """``Name:`` then pieces that each start with a space (a legal fold point).

    Greedy: a piece goes on the current line if that stays within 78 characters, else it
    starts a continuation line (it begins with a space, so unfolding restores it
    exactly), as the stdlib folder does. None when a piece cannot fit in 998 characters.
    """
    lines: list[str] = []
    bare = cur = name + ":"
    for p in pieces:
        if len(cur) + len(p) <= _MAX_LINE:
            cur += p
        elif cur is bare and len(p) > _MAX_LINE:
            # Moving it would not make it fit, and a break right after the colon reads
            # back as a leading space; the stdlib keeps such a word on the first line too.
            if len(cur) + len(p) > _HARD_LINE:
                return None
            cur += p
        else:
            if len(p) > _HARD_LINE:
                return None
            lines.append(cur)
            cur = p
    lines.append(cur)
    return "\r\n".join(lines) + "\r\n"


def _encoded_words(value: str) -> list[str]:
    """RFC 2047 ``B`` encoded words for ``value``, each whole characters and 68 wide at most."""
    data = value.encode("utf-8")
    words: list[str] = []
    start = 0
    n = len(data)
    while start < n:
        end = min(start + _EW_BYTES, n)
        while end < n and 0x80 <= data[end] < 0xC0:  # never split a character
            end -= 1
        words.append("=?utf-8?b?" + base64.b64encode(data[start:end]).decode("ascii") + "?=")
        start = end
    return words


def _unstructured(name: str, value: str) -> str:
    """A free-text header (Subject, Feedback-ID, List-Unsubscribe, custom ones), folded."""
    if "=?" in value:  # the stdlib decodes look-alike encoded words: let it do so
        return _stdlib_fold(name, value)
    if value.isascii():
        if not value:
            return name + ":\r\n"
        if len(name) + 2 + len(value) <= _MAX_LINE:
            return f"{name}: {value}\r\n"
        if not _CLEAN_WORDS_RE.match(value):
            return _stdlib_fold(name, value)
        folded = _fold(name, [" " + w for w in value.split(" ")])
        return folded if folded is not None else _stdlib_fold(name, value)
    if not _CLEAN_WORDS_RE.match(value):
        return _stdlib_fold(name, value)
    # ASCII words stay readable; each run of words with non-ASCII characters becomes
    # encoded words (spaces inside a run are encoded with it: the blank between two
    # encoded words is dropped on decoding, the one next to a plain word is kept).
    pieces: list[str] = []
    run: list[str] = []
    for w in value.split(" "):
        if w.isascii():
            if run:
                pieces.extend(" " + ew for ew in _encoded_words(" ".join(run)))
                run = []
            pieces.append(" " + w)
        else:
            run.append(w)
    if run:
        pieces.extend(" " + ew for ew in _encoded_words(" ".join(run)))
    folded = _fold(name, pieces)
    return folded if folded is not None else _stdlib_fold(name, value)


def _mailbox_pieces(addr: Address) -> list[str] | None:
    """Fold units of one mailbox; None when the stdlib must format it."""
    name = addr.display_name
    if not name:
        return [" " + addr.addr_spec]
    if "=?" in name:
        return None
    if name != name.strip():  # the stdlib drops or keeps such blanks depending on folding
        return None
    angle = f" <{addr.addr_spec}>"
    if name.isascii():
        text = str(addr)  # the stdlib's own quoting of the display name
        if not text.endswith(angle):
            return None
        phrase = text[: -len(angle)]
        if phrase.startswith('"') or not _CLEAN_WORDS_RE.match(phrase):
            return [" " + phrase, angle]  # a quoted string stays whole
        return [" " + w for w in phrase.split(" ")] + [angle]
    return [" " + ew for ew in _encoded_words(name)] + [angle]


def _address_header(name: str, addrs: Sequence[Address]) -> str:
    pieces: list[str] = []
    for i, a in enumerate(addrs):
        mp = _mailbox_pieces(a)
        if mp is None:
            return HEADERS(name, list(addrs)).fold(policy=POLICY)
        if i < len(addrs) - 1:
            mp[-1] += ","
        pieces.extend(mp)
    folded = _fold(name, pieces)
    return folded if folded is not None else HEADERS(name, list(addrs)).fold(policy=POLICY)


def fast_head(*, date: str, sender: Address, to: Sequence[Address], cc: Sequence[Address],
               reply_to: Sequence[Address], subject: str, msgid: str, feedback_id: str | None,
               unsub: str, one_click: bool, custom: Sequence[tuple[str, str]]) -> str:
    """The header block before Content-Type, in the stdlib builder's order.

    Every value must already be checked (``build_message`` does): nothing here
    refuses input, it only folds and encodes.
    """
    out = [f"Date: {date}\r\n", _address_header("From", [sender]), _address_header("To", to)]
    if cc:
        out.append(_address_header("Cc", cc))
    if reply_to:
        out.append(_address_header("Reply-To", reply_to))
    out.append(_unstructured("Subject", subject))
    out.append(_fold("Message-ID", [" " + msgid]) or _stdlib_fold("Message-ID", msgid))
    out.append("MIME-Version: 1.0\r\n")
    if feedback_id:
        out.append(_unstructured("Feedback-ID", feedback_id))
    if unsub:
        out.append(_unstructured("List-Unsubscribe", unsub))
        if one_click:
            out.append("List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")
    for name, value in custom:
        out.append(_unstructured(name, value))
    return "".join(out)


def _encode_text(text: str) -> tuple[str, str]:
    """(transfer encoding, CRLF body): the choice ``set_content`` makes under ``POLICY``.

    7bit when ASCII with lines of at most 78 octets; else quoted-printable, or base64
    when the first ten lines come out shorter that way (mostly non-Latin scripts).
    """
    lines = text.encode("utf-8").splitlines()
    if max((len(x) for x in lines), default=0) <= _BODY_7BIT_MAX:
        body = b"\r\n".join(lines) + b"\r\n"
        if body.isascii():
            return "7bit", body.decode("ascii")
    sniff = b"\r\n".join(lines[:10]) + b"\r\n"
    sniff_qp = email.quoprimime.body_encode(sniff.decode("latin-1"), _BODY_7BIT_MAX)
    if len(sniff_qp) > len(binascii.b2a_base64(sniff)):
        data = b"\r\n".join(lines) + b"\r\n"
        step = _BODY_7BIT_MAX // 4 * 3
        return "base64", "".join(
            binascii.b2a_base64(data[i : i + step]).decode("ascii") for i in range(0, len(data), step)
        ).replace("\n", "\r\n")
    if len(lines) <= 10:
        qp = sniff_qp
    else:
        qp = email.quoprimime.body_encode((b"\n".join(lines) + b"\n").decode("latin-1"), _BODY_7BIT_MAX)
    return "quoted-printable", qp.replace("\n", "\r\n")


def _leaf_bytes(text: str, subtype: str) -> str:
    cte, body = _encode_text(text)
    return f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n{body}'


def _boundary(parts: Sequence[str]) -> str:
    """A random boundary (the stdlib's shape) that occurs nowhere in the parts, not even
    mid-line: stricter than RFC 2046 needs, and a redraw is a one-in-2**63 event."""
    for _ in range(100):
        b = "=" * 15 + "%019d" % random.randrange(sys.maxsize) + "=="
        if not any(b in p for p in parts):
            return b
    raise MimeError("no multipart boundary could be found", field="content")  # pragma: no cover


def fast_body(head: str, text: str | None, html: str | None) -> bytes:
    """The whole message: ``head`` (from :func:`fast_head`), then Content-Type and the body.

    Both parts give multipart/alternative (text first) with a fresh boundary; one part
    is a single text/plain or text/html leaf. At least one of ``text``/``html`` is set.
    """
    if text is not None and html is not None:
        parts = [_leaf_bytes(text, "plain"), _leaf_bytes(html, "html")]
        b = _boundary(parts)
        msg = (f'{head}Content-Type: multipart/alternative;\r\n boundary="{b}"\r\n\r\n'
               f"--{b}\r\n{parts[0]}\r\n--{b}\r\n{parts[1]}\r\n--{b}--\r\n")
    else:
        msg = head + (_leaf_bytes(text, "plain") if text is not None else _leaf_bytes(html or "", "html"))
    return msg.encode("ascii")

