"""``[dashboard]``: whether ``/dashboard`` is served, how long a login lasts, and the colour thresholds.

A number on the overview turns amber at its ``*_warn`` threshold and red at its ``*_alert``
threshold, so the people who depend on mail see at a glance whether unsubscribes and events are
reaching their systems in time and whether mail is stuck.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from engine.configtypes import Duration, _Section


class DashboardConfig(_Section):
    enabled: bool = Field(default=True, description="Serve the operations dashboard at /dashboard.")
    session_lifetime: Duration = Field(
        default=8 * 3600.0, gt=0, le=30 * 86400.0, description="A login lasts this long; then the key is asked again."
    )
    refresh: Duration = Field(default=5.0, ge=1.0, le=600.0, description="How often open pages refresh their numbers.")
    secure_cookie: bool = Field(
        default=True,
        description=(
            "Mark the session cookie Secure. Browsers keep Secure cookies on https and on http://127.0.0.1 / localhost; "
            "set false only for plain http on another address (not recommended: put TLS in front)."
        ),
    )
    event_lag_warn: Duration = Field(default=60.0, description="Webhook event lag (p95 or oldest pending) shown amber.")
    event_lag_alert: Duration = Field(default=300.0, description="... shown red.")
    unsubscribe_lag_warn: Duration = Field(default=300.0, description="Oldest unsubscribe/consent change not yet delivered, amber.")
    unsubscribe_lag_alert: Duration = Field(default=3600.0, description="... red.")
    queue_age_warn: Duration = Field(default=3600.0, description="Oldest waiting recipient, amber.")
    queue_age_alert: Duration = Field(default=86400.0, description="... red.")

    @model_validator(mode="after")
    def _ordered(self) -> DashboardConfig:
        for name in ("event_lag", "unsubscribe_lag", "queue_age"):
            warn, alert = getattr(self, f"{name}_warn"), getattr(self, f"{name}_alert")
            if alert < warn:
                raise ValueError(f"{name}_alert ({alert:g}s) must be >= {name}_warn ({warn:g}s)")
        return self

    def level(self, name: str, seconds: float) -> str:
        """``ok``, ``warn`` or ``alert`` for a lag or age against this config's thresholds."""
        if seconds >= float(getattr(self, f"{name}_alert")):
            return "alert"
        if seconds >= float(getattr(self, f"{name}_warn")):
            return "warn"
        return "ok"
