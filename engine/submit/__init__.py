"""Ways mail comes in: the SMTP relay and the REST API. Both end in engine.accept."""
