"""The event log (delivered, bounced, opened, clicked, unsubscribed, ...) and the tracking endpoints."""

from engine.events.store import EVENT_TYPES, Event, EventStore

__all__ = ["EVENT_TYPES", "Event", "EventStore"]
