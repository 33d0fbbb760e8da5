"""``[retention]``: how long each kind of data is kept, and how gently the purge works.

Lives next to the retention code (like ``engine.webhooks.config``); ``engine.config`` composes it.
A window is a duration (``"30d"``) or ``"never"`` (that kind is kept forever).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BeforeValidator, Field

from engine.configtypes import Duration, _Section, parse_duration

if TYPE_CHECKING:
    from engine.compose.tracking import TrackingConfig

NEVER = "never"


def _window(value: Any) -> float | None:
    """A duration in seconds, or None for ``"never"``; 0 is refused (it would purge at once, surely a mistake)."""
    if isinstance(value, str) and value.strip().lower() == NEVER:
        return None
    if value is None:
        return None
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"a retention window must be above 0 (or {NEVER!r} to keep forever), got {value!r}")
    return seconds


Window = Annotated[float | None, BeforeValidator(_window)]


class RetentionConfig(_Section):
    enabled: bool = Field(default=True, description="Run the purge inside `engine run` (any number of hosts may).")
    message_bodies: Window = Field(
        default=7 * 86400.0,
        description="Bodies (raw, content) are blanked this long after the message's last recipient became final.",
    )
    recipients: Window = Field(
        default=30 * 86400.0,
        description="Recipient rows and their attempts go this long after becoming final; a message goes with its last recipient.",
    )
    events: Window = Field(
        default=30 * 86400.0,
        description="Events go this long after they were written, unless a webhook endpoint still waits to receive them.",
    )
    audit: Window = Field(default=400 * 86400.0, description="Audit log entries go this long after they were written.")
    interval: Duration = Field(default=3600.0, gt=0, description="Time between purge passes.")
    batch_size: int = Field(default=5000, ge=1, le=100_000, description="Rows per statement (each its own short transaction).")
    pause: Duration = Field(default=0.2, description="Sleep between two batches, so the purge never hogs the database.")

    def caveats(self, tracking: TrackingConfig) -> list[str]:
        """What these windows break elsewhere, in words an operator can act on (printed by
        ``engine retention show``, logged once when the engine starts)."""
        out: list[str] = []
        bodies = self.message_bodies
        if tracking.keys and tracking.track_clicks and bodies is not None and bodies < tracking.click_ttl:
            out.append(
                f"tracked links are re-rendered from the message body: a click on a message whose body was purged "
                f"(message_bodies = {_days(bodies)}) answers 404, though [tracking] click_ttl is "
                f"{_days(tracking.click_ttl)}"
            )
        if tracking.keys and self.recipients is not None and self.recipients < tracking.unsubscribe_ttl:
            out.append(
                f"unsubscribe links (/u/...) need their recipient row: after recipients = {_days(self.recipients)} they "
                f"answer 404, though [tracking] unsubscribe_ttl is {_days(tracking.unsubscribe_ttl)} "
                "(keep recipients >= 30 days: CAN-SPAM wants an opt-out to work that long)"
            )
        if self.recipients is not None and (self.events is None or self.events > self.recipients):
            out.append(
                "events outlive their recipients: events of purged recipients keep their ids but lose the address "
                "and contact ids in GET /v1/events and webhook payloads"
            )
        return out


def _days(seconds: float) -> str:
    return f"{seconds / 86400:g}d"
