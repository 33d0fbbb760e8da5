"""Compose: render templates, build MIME, tracking links and DKIM signatures (no database, no network)."""
