"""Events out: webhook endpoints, their deliveries, and the dispatcher that sends them.

``endpoints`` owns ``webhook_endpoints`` (configuration and secrets); ``deliveries`` owns
``webhook_deliveries`` and ``webhook_cursor`` (the webhook outbox: fan-out from the event
stream, claims with leases, retries, dead letters, replay); ``dispatcher`` runs the HTTP side.
"""
