"""VERP return paths: round trip, case folding, forgeries, truncation, foreign domains, key rotation."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from engine.compose.tracking import Keyring, TokenKind
from engine.config import load_settings
from engine.errors import ConfigError
from engine.feedback.verp import Verp

SECRET = "verp-secret-" + "k" * 32
DOMAIN = "bounces.example.test"


def make(**kw) -> Verp:
    return Verp(DOMAIN, {1: SECRET}, **kw)


@pytest.mark.parametrize("rid", [0, 1, 127, 128, 2**28 - 1, 2**28, 10**12, 2**63 - 1])
def test_round_trip_and_shape(rid: int) -> None:
    v = make()
    addr = v.return_path(rid)
    local, _, domain = addr.partition("@")
    assert domain == DOMAIN and re.fullmatch(r"b-[a-z2-7]+", local) and len(local) <= 64
    assert v.parse(addr) == rid
    assert v.parse(addr.upper()) == rid  # case folded on the way back
    assert v.parse(f"<{addr}>") == rid
    assert v.parse(addr + ".") == rid  # trailing root dot on the domain


def test_compact() -> None:
    assert len(make().return_path(10**7).partition("@")[0]) == 2 + 24


def test_forged_truncated_and_foreign_are_none() -> None:
    v = make()
    addr = v.return_path(4242)
    local, _, domain = addr.partition("@")
    tok = local[2:]
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    for i in range(len(tok)):  # every single-character change is refused
        for c in alphabet[:3]:
            if tok[i] != c:
                assert v.parse(f"b-{tok[:i]}{c}{tok[i + 1:]}@{domain}") is None
    for cut in (1, 5, len(tok) - 2):
        assert v.parse(f"b-{tok[:-cut]}@{domain}") is None
    assert v.parse(f"b-{tok}@evil.example") is None
    assert v.parse(f"x-{tok}@{domain}") is None
    assert Verp(DOMAIN, {1: "another-" + "z" * 32}).parse(addr) is None
    # A tracking token signed with the same secret is not a VERP token.
    ring = Keyring({1: SECRET})
    assert v.parse(f"b-{ring.sign(TokenKind.OPEN, 4242).lower()}@{domain}") is None


@pytest.mark.parametrize(
    "junk",
    ["", "@", "b-@" + DOMAIN, "b-" + "a" * 500 + "@" + DOMAIN, "b-ééé@" + DOMAIN, "\x00@\x00", "no-at-sign",
     "b-" + "a" * 24 + "@" + DOMAIN, None, 42, b"bytes@example.test", "b-" + "1" * 24 + "@" + DOMAIN],
)
def test_hostile_input_never_raises(junk) -> None:
    assert make().parse(junk) is None  # type: ignore[arg-type]


def test_rotation_and_grace() -> None:
    now = time.time()
    old = Verp(DOMAIN, {1: SECRET})
    addr = old.return_path(7)
    rotated = Verp(DOMAIN, {1: SECRET, 2: "new-secret-" + "n" * 32}, retired_at={1: now - 86400}, grace_period=7 * 86400)
    assert rotated.signing_key_id == 2
    assert rotated.parse(addr) == 7  # retired a day ago: still inside the grace period
    assert rotated.parse(rotated.return_path(8)) == 8
    expired = Verp(DOMAIN, {1: SECRET, 2: "new-secret-" + "n" * 32}, retired_at={1: now - 30 * 86400}, grace_period=7 * 86400)
    assert expired.parse(addr) is None


def test_find_in_text_counts_forgeries() -> None:
    v = make()
    good = v.return_path(99)
    bad = good[:-len(DOMAIN) - 3] + "aa@" + DOMAIN
    ids, forged = v.find([f"Return-Path: <{good}>", f"To: {bad}", "nothing here", None])
    assert ids == [99] and forged == (0 if bad == good else 1)


def _settings(tmp_path: Path, text: str):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return load_settings(p, env={"ENGINE_HOME": str(tmp_path)})


def test_from_settings(tmp_path: Path) -> None:
    assert Verp.from_settings(_settings(tmp_path, "")) is None  # no bounce_domain: VERP off
    s = _settings(tmp_path, f'[feedback]\nbounce_domain = "Bounces.Example.TEST."\n[[feedback.keys]]\nid = 4\nsecret = "{SECRET}"\n')
    v = Verp.from_settings(s)
    assert v is not None and v.domain == DOMAIN and v.signing_key_id == 4
    # Reusing the tracking keys (no [[feedback.keys]]).
    s = _settings(tmp_path, f'[feedback]\nbounce_domain = "{DOMAIN}"\n[[tracking.keys]]\nid = 2\nsecret = "{SECRET}"\n')
    v2 = Verp.from_settings(s)
    assert v2 is not None and v2.parse(v2.return_path(5)) == 5
    # A bounce domain without any keys fails at load, before any listener opens (issue 16, first run 2).
    with pytest.raises(ConfigError, match="feedback.bounce_domain needs signing keys"):
        _settings(tmp_path, f'[feedback]\nbounce_domain = "{DOMAIN}"\n')


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="feedback.bounce_domain"):
        _settings(tmp_path, '[feedback]\nbounce_domain = "not a domain"\n')
    with pytest.raises(ConfigError, match="suppress_scope"):
        _settings(tmp_path, '[feedback]\nsuppress_scope = "everywhere"\n')
    with pytest.raises(ConfigError, match="inbound"):
        _settings(tmp_path, "[feedback.inbound]\nenabled = true\n")


def test_bare_token_for_message_ids() -> None:
    """The token the composer puts in a personalized Message-ID verifies alone; anything else gives None."""
    v = make()
    tok = v.token(4242)
    assert v.parse_token(tok) == 4242 and v.parse_token(tok.upper()) == 4242
    assert v.parse_token(tok[:-1] + ("a" if tok[-1] != "a" else "b")) is None
    assert Verp(DOMAIN, {1: "other-" + "x" * 32}).parse_token(tok) is None
    for junk in ("", "4242", "a" * 24, "a" * 400, None, 12):
        assert v.parse_token(junk) is None  # type: ignore[arg-type]
