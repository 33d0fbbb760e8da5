"""Consent evidence and egress sources take an IP address through one check: same forms, same error."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from engine.consent.models import Evidence
from engine.deliver.pools import SourceConfig


@pytest.mark.parametrize("ip", ["192.0.2.7", "2001:db8::1", "::1"])
def test_both_accept_ipv4_and_ipv6(ip: str) -> None:
    assert Evidence(ip=ip).ip == ip
    assert SourceConfig(name="s1", address=ip).address == ip


@pytest.mark.parametrize("bad", ["999.1.1.1", "example.com", "10.0.0.0/8", ""])
def test_both_refuse_the_same_way(bad: str) -> None:
    messages = []
    for build in (lambda: Evidence(ip=bad), lambda: SourceConfig(name="s1", address=bad)):
        with pytest.raises(ValidationError) as info:
            build()
        messages.append(info.value.errors()[0]["msg"])
    assert messages[0] == messages[1] == f"Value error, {bad!r} is not an IP address"
    assert Evidence().ip is None and SourceConfig(name="s1").address is None
