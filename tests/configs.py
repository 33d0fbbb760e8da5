"""Config snippets shared by tests.

``BULK_WITHOUT_CONSENT``: since consent is enforced out of the box, bulk mail needs granted
marketing consent. Tests about other things (suppression, tracking, automation...) that send on
the bulk stream relax that rule instead of recording consent for every address they use.
"""

BULK_WITHOUT_CONSENT = '[consent.streams.bulk]\npurpose = "marketing"\nrule = "none"\n'

TRACKING_KEYS = '[[tracking.keys]]\nid = 1\nsecret = "0123456789abcdef0123456789abcdef-test"\n'
"""Bulk mail needs a one-click List-Unsubscribe, which needs a signing key (else 422 at submit)."""
