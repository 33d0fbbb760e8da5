"""IP address checks shared by outside input (consent evidence) and configuration (egress sources).

One definition so the accepted forms and the error text cannot drift apart between
the places that take an IP address as text.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import AfterValidator


def check_ip(value: str) -> str:
    """``value`` unchanged if it is an IPv4 or IPv6 address, else ``ValueError`` naming it."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None
    return value


IpAddress = Annotated[str, AfterValidator(check_ip)]
"""A pydantic field type: an IP address kept as the text given."""
