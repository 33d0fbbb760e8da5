"""Config snippets shared by tests.

``BULK_WITHOUT_CONSENT``: since consent is enforced out of the box, bulk mail needs granted
marketing consent. Tests about other things (suppression, tracking, automation...) that send on
the bulk stream relax that rule instead of recording consent for every address they use.
"""

BULK_WITHOUT_CONSENT = '[consent.streams.bulk]\npurpose = "marketing"\nrule = "none"\n'

TRACKING_KEYS = '[[tracking.keys]]\nid = 1\nsecret = "0123456789abcdef0123456789abcdef-test"\n'
"""Bulk mail needs a one-click List-Unsubscribe, which needs a signing key (else 422 at submit)."""

BOUNCE_DOMAIN = "bounces.example.test"

MARKETING_GRANT = {"purpose": "marketing", "status": "granted", "legal_basis": "consent", "source": "crm:hubspot",
                   "captured_at": "2026-01-05T10:00:00Z", "policy_version": "2026-01"}
"""A CRM's marketing opt-in as the consent API takes it."""



def inbound_feedback(verp_secret: str) -> str:
    """VERP under :data:`BOUNCE_DOMAIN` (key 1), global suppression, and the inbound bounce/FBL
    listener on an ephemeral loopback port (its section last, so a caller may append keys to it)."""
    return f"""
[feedback]
bounce_domain = "{BOUNCE_DOMAIN}"
suppress_scope = "global"

[[feedback.keys]]
id = 1
secret = "{verp_secret}"

[feedback.inbound]
enabled = true
listen = "127.0.0.1:0"
accept_domains = ["fbl.example.test"]
"""


def tracked_feedback(tracking_secret: str, verp_secret: str, *, tracking_key: int = 1, track_opens: bool = True) -> str:
    """The sections an end-to-end engine needs to see every kind of event: webhooks to loopback,
    signed tracking links (key ``tracking_key``) and :func:`inbound_feedback`."""
    opens = "" if track_opens else "track_opens = false\n"
    return f"""
[webhooks]
allow_private_targets = true
poll_interval = "50ms"

[tracking]
base_url = "https://t.example.test"
{opens}
[[tracking.keys]]
id = {tracking_key}
secret = "{tracking_secret}"
""" + inbound_feedback(verp_secret)
