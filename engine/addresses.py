"""Mailbox address checks shared by every way mail comes in.

Deliberately strict and cheap: an address is ``local@domain`` with no spaces,
no control characters, no angle brackets or quotes tricks, a local part of at
most 64 octets and a domain of dotted labels (or an address literal). Anything
else is refused before it can reach a header or an SMTP command.
"""

from __future__ import annotations

import functools
import ipaddress
import re

_LOCAL_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010FFFF-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010FFFF-]+)*$")
_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9\u0080-\U0010FFFF-]{1,63}(?<!-)$")
_LITERAL_RE = re.compile(r"^\[(?:IPv6:[0-9A-Fa-f:.]+|\d{1,3}(?:\.\d{1,3}){3})\]$")


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class AddressError(ValueError):
    pass


def split_address(address: str) -> tuple[str, str]:
    """Validate ``address`` and return ``(local, domain)``; raises AddressError with the reason."""
    if not isinstance(address, str) or not address:
        raise AddressError("address is empty")
    if len(address) > 254:
        raise AddressError("address is longer than 254 characters")
    if _CONTROL_RE.search(address):
        raise AddressError("address contains control characters")
    local, sep, domain = address.rpartition("@")
    if not sep or not local or not domain:
        raise AddressError(f"{address!r} is not of the form local@domain")
    if len(local.encode()) > 64:
        raise AddressError("local part is longer than 64 octets")
    if not _LOCAL_RE.match(local):
        raise AddressError(f"{address!r} has an invalid local part")
    if not (_LITERAL_RE.match(domain) or _valid_domain(domain)):
        raise AddressError(f"{address!r} has an invalid domain")
    return local, domain


@functools.lru_cache(maxsize=8192)
def _valid_domain(domain: str) -> bool:
    """Cached: bulk submissions repeat the same few domains thousands of times."""
    labels = domain.rstrip(".").split(".")
    return len(labels) >= 1 and len(domain) <= 253 and all(_LABEL_RE.match(label) for label in labels)


def normalize_domain(domain: str) -> str:
    return domain.rstrip(".").lower()


def is_valid(address: str) -> bool:
    try:
        split_address(address)
    except AddressError:
        return False
    return True


def is_address_literal(domain: str) -> bool:
    """Is ``domain`` an address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``) rather than a name?

    Literals skip MX routing (and any static route), so the relay and the REST API refuse
    them unless ``[routing] allow_address_literals`` is set.
    """
    return domain.startswith("[")


def literal_is_public(domain: str) -> bool:
    """Is the IP inside address literal ``domain`` globally routable (not loopback, private, link-local...)?"""
    inner = domain.strip()[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        ip = ipaddress.ip_address(inner)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast
