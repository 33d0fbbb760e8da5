"""engine: a self-hosted email sending engine (durable outbox, SMTP relay, REST submit)."""

__version__ = "0.1.0"
