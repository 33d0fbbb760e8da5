"""The REST API (FastAPI): one module per resource, each a module-level ``router`` of named handlers.

``app.create_app`` assembles them; ``deps`` carries what handlers need (via ``app.state``
and FastAPI dependencies). The API calls the domain modules (accept, outbox, suppression,
templates, events); nothing outside ``engine.api``, ``engine.dashboard`` (its pages) and ``engine.app`` imports it.
"""
