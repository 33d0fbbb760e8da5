"""Feedback from receivers: SMTP replies, bounces (DSN), complaints (ARF), auto-replies.

Pure parsing, no state: the delivery code calls :func:`classify` /
:func:`classify_reply` on each SMTP reply, the inbound listener calls
:func:`parse_report` on each message it receives, and both get the same
category vocabulary (see :data:`CATEGORIES`).
"""

from engine.feedback.classify import (
    CATEGORIES,
    HARD_CATEGORIES,
    Classification,
    Classifier,
    classify,
    classify_reply,
    default_classifier,
    load_rules,
    parse_reply,
)
from engine.feedback.report import RecipientResult, Report, parse_report

__all__ = [
    "CATEGORIES",
    "HARD_CATEGORIES",
    "Classification",
    "Classifier",
    "RecipientResult",
    "Report",
    "classify",
    "classify_reply",
    "default_classifier",
    "load_rules",
    "parse_reply",
    "parse_report",
]
