"""An SMTP reply as a value, and the one judgement this client makes of it.

The client only says *delivered / temporary / permanent* from the reply code
class, keeping the exact code, enhanced status and text; what a reply means
(bounce category, throttling) is the classifier's job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["delivered", "temporary", "permanent"]

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


def parse_enhanced_status(text: str) -> str | None:
    """The RFC 3463 enhanced status code at the start of a reply text, e.g. ``"5.1.1"``."""
    match = _ENHANCED.match(text.lstrip())
    return ".".join(match.groups()) if match else None


def kind_of(code: int | None) -> Kind:
    """delivered / temporary / permanent from the reply code class; anything odd is temporary."""
    if code is not None and 200 <= code < 300:
        return "delivered"
    if code is not None and 500 <= code < 600:
        return "permanent"
    return "temporary"


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply; multi-line texts are joined with newlines, codes stripped from the lines."""

    code: int
    text: str

    @property
    def enhanced_status(self) -> str | None:
        return parse_enhanced_status(self.text)

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


__all__ = ["Kind", "Reply", "kind_of", "parse_enhanced_status"]
