"""CLI: ``engine classify`` and ``engine bounce parse``.

Both print JSON lines so ops can pipe them into jq, and both handle thousands
of inputs in one process (rules compiled once). A bad input gives an error
line, never a traceback, because one broken bounce in a maildir must not stop
the other nine hundred.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from engine.commands import Subparsers
from engine.errors import EngineError
from engine.feedback.classify import Classifier, load_rules

MAX_FILE_BYTES = 50 * 1024 * 1024  # read at most this much of one file (the parser looks at the first 1 MiB)


def register(sub: Subparsers) -> None:
    """``engine classify`` and ``engine bounce parse``."""
    p = sub.add_parser("classify", help="classify SMTP replies (arguments, or one per line on stdin)")
    p.add_argument("replies", nargs="*", help="reply texts like '550 5.1.1 user unknown'; none = read stdin")
    p.add_argument("--rules", action="append", default=[], metavar="TOML", help="extra rule file (takes precedence; repeatable)")
    p.set_defaults(func=cmd_classify)

    b = sub.add_parser("bounce", help="bounce and complaint messages")
    bsub = b.add_subparsers(dest="bounce_command", required=True)
    bp = bsub.add_parser("parse", help="parse DSN / ARF / auto-reply files into one JSON line per recipient")
    bp.add_argument("files", nargs="+", help="message files (.eml, raw RFC 5322)")
    bp.add_argument("--rules", action="append", default=[], metavar="TOML", help="extra classifier rule file (repeatable)")
    bp.set_defaults(func=cmd_bounce_parse)


def _classifier(paths: list[str]) -> Classifier:
    try:
        return load_rules(paths)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def _emit(out: TextIO, obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj, ensure_ascii=False) + "\n")


def cmd_classify(args: argparse.Namespace, out: TextIO | None = None, stdin: TextIO | None = None) -> int:
    """One JSON object per reply: {reply, category, permanent, rule}."""
    out = out or sys.stdout
    clf = _classifier(args.rules)
    replies = args.replies if args.replies else (ln.rstrip("\r\n") for ln in (stdin or sys.stdin))
    for reply in replies:
        if not reply.strip():
            continue
        c = clf.classify_reply(reply)
        _emit(out, {"reply": reply, "category": c.category, "permanent": c.permanent, "rule": c.rule})
    return 0


def cmd_bounce_parse(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """One JSON object per recipient found; one {recipient: null, kind} line for non-bounces."""
    from engine.feedback.report import parse_report

    out = out or sys.stdout
    clf = _classifier(args.rules)
    status = 0
    for name in args.files:
        try:
            with open(name, "rb") as fh:
                raw = fh.read(MAX_FILE_BYTES)
        except OSError as exc:
            _emit(out, {"file": name, "recipient": None, "kind": "error", "error": f"cannot read: {exc.strerror or exc}"})
            status = 1
            continue
        rep = parse_report(raw, clf)
        if rep.kind == "error":
            _emit(out, {"file": name, "recipient": None, "kind": "error", "error": rep.error})
            status = 1
            continue
        if not rep.recipients or rep.kind in ("auto_reply", "unknown"):
            line = {"file": name, "recipient": None, "kind": rep.kind}
            if rep.kind == "auto_reply":
                line["from"] = rep.report_from
            _emit(out, line)
            continue
        for r in rep.recipients:
            _emit(
                out,
                {
                    "file": name,
                    "recipient": r.recipient,
                    "status": r.status,
                    "reply": r.reply,
                    "category": r.category,
                    "permanent": r.permanent,
                    "feedback_type": r.feedback_type,
                    "kind": rep.kind,
                    "original_message_id": rep.original_message_id,
                },
            )
    return status
