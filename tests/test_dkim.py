"""DKIM signing: every signature is checked by dkimpy's verifier and by independent ones.

Independent verifiers: Perl's Mail::DKIM (Debian ``libmail-dkim-perl``; its Debian
version has no Ed25519) and OpenDKIM's test mode (Debian ``opendkim``; RSA and
Ed25519). Both read the public keys from a local file, not DNS. Each is skipped with
the reason when absent, dkimpy never is.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import random
import re
import shutil
import stat
import subprocess
from pathlib import Path

import aiosmtplib
import dkim
import pytest
from aiosmtpd.smtp import SMTP
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from dkim.canonicalization import Relaxed
from pydantic import ValidationError

from engine.commands.dkim import register
from engine.compose.dkim import (
    DkimError,
    DkimKeyConfig,
    DkimKeyError,
    DkimSigner,
    DomainDkimConfig,
    SigningKey,
    keygen,
    load_private_key,
    relaxed_body,
    relaxed_header,
)

FROM_DOMAIN = "example.com"

MESSAGE = (
    b'From: "Example News" <news@example.com>\r\n'
    b"To: Someone <someone@example.org>\r\n"
    b"Subject: Your weekly digest\r\n"
    b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"Message-ID: <digest.1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 7bit\r\n"
    b"List-Unsubscribe: <https://example.com/u/abc>, <mailto:unsub@example.com>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"Received: from somewhere by relay\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b"\r\n"
    b"this is the  digest body.\r\n"
)


# ---------------------------------------------------------------------------
# keys and verifiers
# ---------------------------------------------------------------------------


def _txt_value(record: str) -> str:
    """The TXT content as a resolver hands it over: the quoted strings concatenated."""
    return "".join(re.findall(r'"([^"]*)"', record))


class Keys:
    """Key files made with our keygen, and the DNS view of them (name -> TXT value)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.txt: dict[str, str] = {}
        self.paths: dict[str, Path] = {}
        for domain, selector, alg in [
            (FROM_DOMAIN, "rsa1", "rsa"),
            (FROM_DOMAIN, "rsa2", "rsa"),
            (FROM_DOMAIN, "ed1", "ed25519"),
            ("example.net", "relay", "rsa"),
        ]:
            path, record = keygen(domain, selector, alg, root)
            name = record.split(" ", 1)[0].rstrip(".")
            assert name == f"{selector}._domainkey.{domain}"
            self.txt[name] = _txt_value(record)
            self.paths[selector] = path

    def entry(self, selector: str) -> DkimKeyConfig:
        alg = "ed25519-sha256" if selector.startswith("ed") else "rsa-sha256"
        return DkimKeyConfig(selector=selector, algorithm=alg, key_file=self.paths[selector])

    def signer(self, *selectors: str, **options: object) -> DkimSigner:
        domains = [DomainDkimConfig(name=FROM_DOMAIN, dkim=[self.entry(s) for s in selectors if s != "relay"])]
        if "relay" in selectors:
            domains.append(DomainDkimConfig(name="example.net", dkim=[self.entry("relay")]))
        return DkimSigner.from_config(domains, **options)

    def dnsfunc(self, name: bytes, timeout: int = 5) -> bytes | None:
        value = self.txt.get(name.decode().rstrip("."))
        return value.encode() if value is not None else None


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("dkim-keys"))


def n_signatures(message: bytes) -> int:
    return len(re.findall(rb"(?im)^DKIM-Signature:", message))


def dkimpy_results(keys: Keys, message: bytes) -> list[bool]:
    """dkimpy's verdict for each DKIM-Signature, top to bottom (a mismatch raises inside dkimpy)."""
    results = []
    for i in range(n_signatures(message)):
        try:
            results.append(bool(dkim.DKIM(message).verify(idx=i, dnsfunc=keys.dnsfunc)))
        except dkim.DKIMException:
            results.append(False)
    return results


PERL_VERIFIER = r"""
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Net::DNS;
# Public keys come from a local file ("name<TAB>TXT value" lines), never from DNS:
# Mail::DKIM::DNS::query is the one place Mail::DKIM asks DNS, so it is replaced.
my %keys;
open(my $kf, '<', $ARGV[0]) or die "keys: $!";
while (my $line = <$kf>) { chomp $line; my ($n, $v) = split /\t/, $line, 2; $keys{lc $n} = $v; }
{
    no warnings 'redefine';
    *Mail::DKIM::DNS::query = sub {
        my ($name, $type) = @_;
        my $v = $keys{lc $name};
        unless (defined $v) { $@ = 'NXDOMAIN'; return; }
        my @chunks = unpack('(A255)*', $v);
        return (Net::DNS::RR->new(name => $name, type => 'TXT', txtdata => \@chunks));
    };
}
binmode STDIN;
my $dkim = Mail::DKIM::Verifier->new();
while (my $l = <STDIN>) { $dkim->PRINT($l); }
$dkim->CLOSE;
foreach my $sig ($dkim->signatures) {
    printf "%s %s %s %s\n", $sig->result, $sig->algorithm, $sig->domain, $sig->selector;
}
"""


def perl_results(keys: Keys, message: bytes, tmp: Path) -> dict[str, str]:
    """Mail::DKIM's verdict per selector ('pass', 'fail', 'invalid', ...)."""
    if shutil.which("perl") is None or subprocess.run(
            ["perl", "-MMail::DKIM::Verifier", "-MNet::DNS", "-e", "1"], capture_output=True).returncode != 0:
        pytest.skip("Perl Mail::DKIM is not installed (apt-get install -y libmail-dkim-perl)")
    script = tmp / "verify.pl"
    script.write_text(PERL_VERIFIER)
    keyfile = tmp / "keys.tsv"
    keyfile.write_text("".join(f"{n}\t{v}\n" for n, v in keys.txt.items()))
    proc = subprocess.run(["perl", str(script), str(keyfile)], input=message, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode()
    out = {}
    for line in proc.stdout.decode().splitlines():
        result, _alg, _domain, selector = line.split()
        out[selector] = result
    return out


OPENDKIM = "/usr/sbin/opendkim"


def opendkim_results(keys: Keys, message: bytes, tmp: Path) -> dict[str, str]:
    """OpenDKIM's verdict per selector, from the Authentication-Results its test mode prints."""
    if not os.access(OPENDKIM, os.X_OK):
        pytest.skip("OpenDKIM is not installed (apt-get install -y opendkim)")
    keyfile = tmp / "opendkim-keys.txt"
    keyfile.write_text("".join(f"{n} {v}\n" for n, v in keys.txt.items()))
    conf = tmp / "opendkim.conf"
    conf.write_text(f"Mode v\nTestPublicKeys {keyfile}\nSyslog no\n")
    msgfile = tmp / "message.eml"
    msgfile.write_bytes(message)
    proc = subprocess.run([OPENDKIM, "-x", str(conf), "-t", str(msgfile), "-vv"], capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode()
    found = re.findall(r"dkim=(\w+)[^;]*?header\.s=([\w.-]+)", proc.stdout.decode())
    return {selector: result for result, selector in found}


def assert_all_pass(keys: Keys, message: bytes, tmp: Path, selectors: list[str]) -> None:
    """Every listed selector signed the message and every verifier agrees it passes."""
    assert all(dkimpy_results(keys, message)), "dkimpy rejected a signature"
    od = opendkim_results(keys, message, tmp)
    for s in selectors:
        assert od.get(s) == "pass", f"OpenDKIM: {od}"
    pl = perl_results(keys, message, tmp)
    for s in selectors:
        if not s.startswith("ed"):  # Debian's Mail::DKIM (1.20230212) predates Ed25519
            assert pl.get(s) == "pass", f"Mail::DKIM: {pl}"


def tags(message: bytes, idx: int = 0) -> dict[bytes, bytes]:
    sig_headers = [v for n, v in dkim.rfc822_parse(message)[0] if n.lower() == b"dkim-signature"]
    return dkim.util.parse_tag_value(re.sub(rb"\s+", b"", sig_headers[idx]))


# ---------------------------------------------------------------------------
# signing and verifying
# ---------------------------------------------------------------------------


def test_rsa_signature_verifies_everywhere(keys: Keys, tmp_path: Path) -> None:
    signed = keys.signer("rsa1").sign(MESSAGE)
    assert signed.endswith(MESSAGE) and n_signatures(signed) == 1
    t = tags(signed)
    assert (t[b"a"], t[b"d"], t[b"s"], t[b"c"]) == (b"rsa-sha256", b"example.com", b"rsa1", b"relaxed/relaxed")
    # Present bulk-mail fields are signed, Received is not, From once more than present.
    assert t[b"h"].split(b":") == [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
                                   b"content-type", b"content-transfer-encoding", b"list-unsubscribe",
                                   b"list-unsubscribe-post", b"from"]
    assert_all_pass(keys, signed, tmp_path, ["rsa1"])


def test_ed25519_signature_verifies(keys: Keys, tmp_path: Path) -> None:
    signed = keys.signer("ed1").sign(MESSAGE)
    assert tags(signed)[b"a"] == b"ed25519-sha256"
    assert_all_pass(keys, signed, tmp_path, ["ed1"])


def test_dual_signing_rsa_and_ed25519(keys: Keys, tmp_path: Path) -> None:
    signed = keys.signer("rsa1", "ed1").sign(MESSAGE)
    assert n_signatures(signed) == 2
    assert {tags(signed, 0)[b"s"], tags(signed, 1)[b"s"]} == {b"rsa1", b"ed1"}
    assert tags(signed, 0)[b"bh"] == tags(signed, 1)[b"bh"]
    assert_all_pass(keys, signed, tmp_path, ["rsa1", "ed1"])


def test_rotation_signs_with_the_active_selectors_given(keys: Keys, tmp_path: Path) -> None:
    both = keys.signer("rsa1", "rsa2").sign(MESSAGE)
    assert [tags(both, i)[b"s"] for i in range(2)] == [b"rsa1", b"rsa2"]
    assert_all_pass(keys, both, tmp_path, ["rsa1", "rsa2"])
    new_only = keys.signer("rsa2").sign(MESSAGE)
    assert n_signatures(new_only) == 1 and tags(new_only)[b"s"] == b"rsa2"


def test_second_from_added_after_signing_fails(keys: Keys, tmp_path: Path) -> None:
    forge = b"From: ceo@example.com\r\n"
    signed = keys.signer("rsa1", "ed1").sign(MESSAGE)
    for forged in (forge + signed, signed.replace(b"Subject:", forge + b"Subject:", 1)):
        assert dkimpy_results(keys, forged) == [False, False]
        assert set(opendkim_results(keys, forged, tmp_path).values()) == {"fail"}
        assert perl_results(keys, forged, tmp_path)["rsa1"] == "fail"
    # Why over-sign: verifiers take repeated fields bottom-up, so without it a From added
    # on top passes Mail::DKIM (dkimpy's verifier guards itself against this, others do not).
    plain = keys.signer("rsa1", oversigned=()).sign(MESSAGE)
    assert perl_results(keys, forge + plain, tmp_path)["rsa1"] == "pass"


def test_existing_signature_is_preserved_and_ours_goes_on_top(keys: Keys, tmp_path: Path) -> None:
    relayed = keys.signer("relay").sign(MESSAGE, domain="example.net")
    assert tags(relayed)[b"d"] == b"example.net"
    signed = keys.signer("rsa1", "relay").sign(relayed)
    assert signed.endswith(relayed)
    assert [tags(signed, i)[b"d"] for i in range(2)] == [b"example.com", b"example.net"]
    assert b"dkim-signature" not in tags(signed)[b"h"].lower()
    assert_all_pass(keys, signed, tmp_path, ["rsa1", "relay"])


def test_8bit_body(keys: Keys, tmp_path: Path) -> None:
    msg = (MESSAGE.replace(b"7bit", b"8bit").replace(b"Your weekly digest", b"=?utf-8?q?R=C3=A9sum=C3=A9?=")
           + "Grüße, naïve café — ünïcödé ✓\r\n".encode())
    signed = keys.signer("rsa1", "ed1").sign(msg)
    assert_all_pass(keys, signed, tmp_path, ["rsa1", "ed1"])


def test_long_folded_headers_and_many_signed_fields(keys: Keys, tmp_path: Path) -> None:
    to = ",\r\n\t".join(f"Person {i} <person{i}@example.org>" for i in range(30))
    extra = (b"Cc: a@example.org,\r\n  b@example.org\r\nReply-To: replies@example.com\r\n"
             b"Feedback-ID: c1:news:example\r\nIn-Reply-To: <a@b>\r\nReferences: <a@b>\r\n <c@d>\r\n")
    msg = MESSAGE.replace(b"To: Someone <someone@example.org>\r\n", b"To: " + to.encode() + b"\r\n" + extra)
    msg = msg.replace(b"Your weekly digest", b"A subject " + b"that goes on " * 20 + b"\r\n and on")
    signed = keys.signer("rsa1", "ed1").sign(msg)
    ours = signed[: len(signed) - len(msg)]
    assert all(len(line) <= 78 for line in ours.split(b"\r\n")), ours.decode()
    assert set(tags(signed)[b"h"].split(b":")) >= {b"cc", b"reply-to", b"feedback-id", b"in-reply-to", b"references"}
    assert_all_pass(keys, signed, tmp_path, ["rsa1", "ed1"])


@pytest.mark.parametrize("msg", [
    b"From: news@example.com\r\nSubject: headers only\r\n",
    b"From: news@example.com\r\nSubject: empty body\r\n\r\n",
    b"From: news@example.com\r\nSubject: blank lines only\r\n\r\n\r\n\r\n",
], ids=["no-separator", "empty-body", "blank-lines"])
def test_message_without_body(keys: Keys, tmp_path: Path, msg: bytes) -> None:
    signed = keys.signer("rsa1", "ed1").sign(msg)
    assert tags(signed)[b"bh"] == base64.b64encode(hashlib.sha256(b"").digest())
    assert_all_pass(keys, signed, tmp_path, ["rsa1", "ed1"])


def test_relaxed_canonicalization_tolerates_whitespace_changes(keys: Keys, tmp_path: Path) -> None:
    signed = keys.signer("rsa1", "ed1").sign(MESSAGE)
    mangled = (signed.replace(b"Hello,\r\n", b"Hello,   \t\r\n")          # trailing white space
               .replace(b"the  digest", b"the \t digest")                # runs of white space
               .replace(b"Subject: Your weekly", b"subject:   Your\r\n\tweekly")  # case, refolding
               + b"\r\n\r\n")                                             # trailing empty lines
    assert_all_pass(keys, mangled, tmp_path, ["rsa1", "ed1"])
    altered = signed.replace(b"digest body", b"digest bodY")
    assert dkimpy_results(keys, altered) == [False, False]


def test_lf_line_endings_are_signed_as_crlf(keys: Keys, tmp_path: Path) -> None:
    signed = keys.signer("rsa1").sign(MESSAGE.replace(b"\r\n", b"\n"))
    assert b"\n" not in signed.replace(b"\r\n", b"")
    assert_all_pass(keys, signed, tmp_path, ["rsa1"])


# ---------------------------------------------------------------------------
# which key signs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("from_value", [
    b"news@example.com", b"<news@example.com>", b'"Doe, John (news)" <news@Example.COM>',
    b"=?utf-8?q?Caf=C3=A9?= <news@example.com>", b"news@example.com (comment)",
    b'"spoof@evil.test" <news@example.com>',
])
def test_domain_is_taken_from_the_from_header(keys: Keys, from_value: bytes) -> None:
    msg = b"From: " + from_value + b"\r\nSubject: x\r\n\r\nbody\r\n"
    signed = keys.signer("rsa1", "relay").sign(msg)
    assert tags(signed)[b"d"] == b"example.com"


def test_no_matching_key_returns_message_unchanged(keys: Keys) -> None:
    signer = keys.signer("rsa1")
    for msg in (MESSAGE.replace(b"news@example.com", b"news@other.test"),
                b"Subject: no from at all\r\n\r\nbody\r\n",
                b"From: undisclosed-recipients:;\r\n\r\nbody\r\n"):
        assert signer.sign(msg) == msg
        assert signer.signature_headers(msg) == b""
    assert signer.sign(MESSAGE, domain="other.test") == MESSAGE


def test_subdomain_uses_parent_keys_unless_disabled(keys: Keys) -> None:
    msg = MESSAGE.replace(b"news@example.com", b"news@mail.example.com")
    assert tags(keys.signer("rsa1").sign(msg))[b"d"] == b"example.com"
    assert keys.signer("rsa1", match_parent_domains=False).sign(msg) == msg


def test_explicit_domain_overrides_from(keys: Keys, tmp_path: Path) -> None:
    signed = keys.signer("rsa1", "relay").sign(MESSAGE, domain="example.net")
    assert n_signatures(signed) == 1 and tags(signed)[b"d"] == b"example.net"
    assert_all_pass(keys, signed, tmp_path, ["relay"])


def test_malformed_input_gives_clear_errors(keys: Keys) -> None:
    signer = keys.signer("rsa1")
    with pytest.raises(DkimError, match="malformed header"):
        signer.sign(b"From: news@example.com\r\nthis is not a header\r\n\r\nbody\r\n")
    with pytest.raises(DkimError, match="not a valid DNS name"):
        signer.sign(MESSAGE, domain="bad domain!")


def test_signature_headers_and_fixed_timestamp(keys: Keys) -> None:
    signer = keys.signer("ed1")
    hdr = signer.signature_headers(MESSAGE, timestamp=1700000000)
    assert hdr.startswith(b"DKIM-Signature: ") and hdr.endswith(b"\r\n")
    assert tags(hdr + MESSAGE)[b"t"] == b"1700000000"
    # Ed25519 is deterministic: same message, same time, same bytes.
    assert hdr == signer.signature_headers(MESSAGE, timestamp=1700000000)


# ---------------------------------------------------------------------------
# through a real SMTP server
# ---------------------------------------------------------------------------


class _Sink:
    def __init__(self) -> None:
        self.received: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: object, envelope: object) -> str:
        self.received.append(envelope.original_content)  # type: ignore[attr-defined]
        return "250 OK"


async def test_signature_survives_smtp_transfer(keys: Keys, tmp_path: Path) -> None:
    sink = _Sink()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(sink, enable_SMTPUTF8=True), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        body_with_dots = b".leading dot line\r\n..two dots\r\n"
        msg = MESSAGE.replace(b"7bit", b"8bit") + body_with_dots + "ünïcödé\r\n".encode()
        signed = keys.signer("rsa1", "ed1").sign(msg)
        await asyncio.wait_for(aiosmtplib.send(signed, sender="bounce@example.com", recipients=["someone@example.org"],
                                               hostname="127.0.0.1", port=port, start_tls=False), 10)
    finally:
        server.close()
        await server.wait_closed()
    assert len(sink.received) == 1
    received = sink.received[0]
    assert received.rstrip(b"\r\n") == signed.rstrip(b"\r\n")
    await asyncio.to_thread(assert_all_pass, keys, received, tmp_path, ["rsa1", "ed1"])


# ---------------------------------------------------------------------------
# our fast canonicalization equals dkimpy's
# ---------------------------------------------------------------------------


def _random_bytes(rng: random.Random, alphabet: bytes, n: int) -> bytes:
    return bytes(rng.choice(alphabet) for _ in range(n))


def test_relaxed_body_equals_dkimpy() -> None:
    rng = random.Random(8463)
    samples = [b"", b"\r\n", b"\r\n\r\n", b"a", b"a  ", b" \t \r\n", b"a \r \r\n", b"x\t\r\n\r\n \r\n"]
    samples += [_random_bytes(rng, b"ab \t\r\n", rng.randrange(0, 60)) for _ in range(2000)]
    for body in samples:
        assert relaxed_body(body) == Relaxed.canonicalize_body(body), body


def test_relaxed_header_equals_dkimpy() -> None:
    rng = random.Random(6376)
    samples = [b" x\r\n", b"\r\n", b" a \t b\r\n\t c \r\n", b"\r\r\n\n", b" a\nb\r\n"]
    samples += [_random_bytes(rng, b"ab \t\r\n\x0b", rng.randrange(0, 40)) for _ in range(2000)]
    for value in samples:
        (name, canon), = Relaxed.canonicalize_headers([(b"Sub-Ject ", value)])
        assert relaxed_header(b"Sub-Ject ", value) == name + b":" + canon[:-2], value


def test_header_selection_equals_dkimpy(keys: Keys) -> None:
    signer = keys.signer("rsa1")
    rng = random.Random(5322)
    names = [b"From", b"from", b"To", b"Subject", b"Received", b"X-Other", b"Cc", b"Reply-To"]
    for _ in range(500):
        headers = [[rng.choice(names), b" v%d\r\n" % i] for i in range(rng.randrange(0, 12))]
        include, selected = signer._include(headers)
        assert selected == dkim.select_headers(headers, include)
        assert include.count(b"from") == sum(1 for h in headers if h[0].lower() == b"from") + 1


# ---------------------------------------------------------------------------
# keys, keygen, config, CLI
# ---------------------------------------------------------------------------


def test_keygen_writes_private_key_0600_and_txt_record(tmp_path: Path) -> None:
    path, record = keygen("Example.ORG", "s2024", "rsa", tmp_path / "keys")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert record.startswith('s2024._domainkey.example.org. IN TXT "v=DKIM1; k=rsa; p=')
    strings = re.findall(r'"([^"]*)"', record)
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    key = load_private_key(path, "rsa-sha256")
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    pub = dkim.crypto.parse_public_key(base64.b64decode(_txt_value(record).split("p=")[1]))
    assert pub["modulus"] == key.public_key().public_numbers().n
    with pytest.raises(DkimError, match="already exists"):
        keygen("example.org", "s2024", "rsa", tmp_path / "keys")

    ed_path, ed_record = keygen("example.org", "e2024", "ed25519", tmp_path / "keys")
    assert stat.S_IMODE(ed_path.stat().st_mode) == 0o600
    assert re.fullmatch(r'e2024\._domainkey\.example\.org\. IN TXT "v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}="', ed_record)


@pytest.mark.parametrize("kwargs, message", [
    ({"selector": "../etc"}, "not a valid DNS name"),
    ({"domain": "exa mple.com"}, "not a valid DNS name"),
    ({"algorithm": "dsa"}, "unknown DKIM algorithm"),
    ({"bits": 1000}, "not supported"),
])
def test_keygen_rejects_bad_input(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"domain": "example.com", "selector": "s1", "algorithm": "rsa", "out_dir": tmp_path, **kwargs}
    with pytest.raises(DkimError, match=message):
        keygen(**args)
    assert list(tmp_path.iterdir()) == []


def test_key_file_errors_are_clear(keys: Keys, tmp_path: Path) -> None:
    def load(path: Path, alg: str = "rsa-sha256") -> None:
        DkimSigner.from_config([DomainDkimConfig(name="example.com", dkim=[
            DkimKeyConfig(selector="s1", algorithm=alg, key_file=path)])])

    with pytest.raises(DkimKeyError, match="does not exist.*keygen"):
        load(tmp_path / "missing.pem")
    with pytest.raises(DkimKeyError, match="is a directory"):
        load(tmp_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    with pytest.raises(DkimKeyError, match="not a PEM private key"):
        load(garbage)
    with pytest.raises(DkimKeyError, match="holds an Ed25519 key but algorithm is rsa-sha256"):
        load(keys.paths["ed1"])
    with pytest.raises(DkimKeyError, match="holds an RSA key but algorithm is ed25519-sha256"):
        load(keys.paths["rsa1"], "ed25519-sha256")
    ec_file = tmp_path / "ec.pem"
    ec_file.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(DkimKeyError, match="holds an EC key but algorithm is rsa-sha256"):
        load(ec_file)
    enc = tmp_path / "enc.pem"
    enc.write_bytes(load_private_key(keys.paths["rsa1"], "rsa-sha256").private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(DkimKeyError, match="encrypted"):
        load(enc)


def test_dkimpy_style_raw_ed25519_key_is_accepted(keys: Keys, tmp_path: Path) -> None:
    key = load_private_key(keys.paths["ed1"], "ed25519-sha256")
    raw = tmp_path / "ed.key"
    raw.write_bytes(base64.b64encode(key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())) + b"\n")
    signer = DkimSigner([SigningKey(FROM_DOMAIN, "ed1", "ed25519-sha256", load_private_key(raw, "ed25519-sha256"))])
    assert dkimpy_results(keys, signer.sign(MESSAGE)) == [True]


def test_config_model_validates_and_resolves_relative_paths(keys: Keys) -> None:
    cfg = DomainDkimConfig.model_validate({"name": "Example.COM.", "dkim": [
        {"selector": "rsa1", "key_file": keys.paths["rsa1"].name},
        {"selector": "ed1", "algorithm": "ed25519-sha256", "key_file": keys.paths["ed1"].name}]})
    assert cfg.name == "example.com" and cfg.dkim[0].algorithm == "rsa-sha256"
    signer = DkimSigner.from_config([cfg], base_dir=keys.root)
    assert n_signatures(signer.sign(MESSAGE)) == 2
    for bad in ({"selector": "s1", "key_file": "k", "algorithm": "rsa-sha1"},
                {"selector": "s 1", "key_file": "k"},
                {"selector": "s1", "key_file": "k", "typo": 1}):
        with pytest.raises(ValidationError):
            DomainDkimConfig.model_validate({"name": "example.com", "dkim": [bad]})


def test_cli_keygen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="engine")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dkim", "keygen", "--domain", "example.com", "--selector", "cli1",
                              "--algorithm", "ed25519", "--out-dir", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "example.com.cli1.ed25519.pem") in out
    assert 'cli1._domainkey.example.com. IN TXT "v=DKIM1; k=ed25519; p=' in out
    with pytest.raises(SystemExit):
        parser.parse_args(["dkim", "keygen", "--domain", "example.com", "--selector", "x", "--algorithm", "dsa"])
