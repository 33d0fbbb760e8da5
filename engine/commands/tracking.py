"""``engine tracking keygen``: a new signing key for tracking and unsubscribe links.

Keys rotate without breaking links already sent: add the new key, deploy, then
retire the old one (it still verifies for ``key_grace_period``).
"""

from __future__ import annotations

import argparse
import secrets

from engine.commands import Subparsers


def register(sub: Subparsers) -> None:
    """``engine tracking keygen --id N``."""
    grp = sub.add_parser("tracking", help="tracking link keys").add_subparsers(dest="tracking_cmd", required=True)
    p = grp.add_parser("keygen", help="print a new [[tracking.keys]] entry")
    p.add_argument("--id", type=int, default=1, choices=range(256), metavar="0-255")
    p.set_defaults(func=cmd_tracking_keygen)


def cmd_tracking_keygen(args: argparse.Namespace) -> int:
    """Print a fresh key as a TOML snippet; add it, deploy, then retire the old key."""
    key_id = int(getattr(args, "id", 1))
    print(f'[[tracking.keys]]\nid = {key_id}\nsecret = "{secrets.token_urlsafe(32)}"')
    return 0
