"""The event stream: every recipient state change and observation, written only by :mod:`engine.events.store`.

Webhooks, the events API and exports read it; the tracking endpoints that record opens, clicks and
unsubscribes live in :mod:`engine.api.tracking`.
"""

from engine.events.store import EVENT_TYPES, Event, EventStore

__all__ = ["EVENT_TYPES", "Event", "EventStore"]
