"""SMTP intake: the relay (AUTH, policy at RCPT, commit at DATA), the listener base it shares with the
bounce/FBL listener, TLS, and the REST request schema. Intake ends in :mod:`engine.accept`; the REST
routes themselves live in :mod:`engine.api`."""
