"""``engine dkim keygen``: create a DKIM key pair and print the DNS TXT record to publish.

The key file is written by :func:`engine.compose.dkim.keygen` (mode 0600, never
overwriting); rotation means a new selector, so both keys sign during the switch.
"""

from __future__ import annotations

import argparse
import os

from engine.commands import Subparsers
from engine.compose.dkim import keygen


def register(sub: Subparsers) -> None:
    """Add the ``dkim`` command group (``dkim keygen``) to the engine CLI."""
    group = sub.add_parser("dkim", help="DKIM keys")
    dsub = group.add_subparsers(dest="dkim_command", required=True)
    p = dsub.add_parser("keygen", help="create a DKIM key pair and print the DNS TXT record to publish")
    p.add_argument("--domain", required=True, help="sending domain (d=)")
    p.add_argument("--selector", required=True, help="selector (s=), e.g. s2024a; use a new one per rotation")
    p.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    p.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    p.add_argument("--out-dir", default=None, help="directory for the private key (default $ENGINE_HOME/dkim)")
    p.set_defaults(func=cmd_dkim_keygen)


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    out_dir = args.out_dir or (args.settings.home / "dkim" if hasattr(args, "settings") else os.path.join("var", "dkim"))
    path, record = keygen(args.domain, args.selector, args.algorithm, out_dir, bits=args.bits)
    print(f"private key: {path}")
    print("publish this DNS record:")
    print(record)
    return 0
