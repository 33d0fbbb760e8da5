"""Consent and identity: who may be mailed for which purpose, and erasure.

``config`` ([consent] settings), ``policy`` (stream -> purpose and rule, pure: used by the
outbox at enqueue and claim), ``store`` (the only writer of ``consent`` and
``consent_history``), ``erasure`` (the only writer of ``do_not_mail``; erases an address
through every table's owner), ``imports`` (NDJSON bulk sync).
"""
