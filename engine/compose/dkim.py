"""DKIM signing (RFC 6376) with RSA-SHA256 and Ed25519-SHA256 (RFC 8463), and key generation.

Why not just ``dkim.sign``: dkimpy re-parses the PEM key and signs with a
pure-Python RSA on every call (about 6 ms per signature). Here keys are parsed
once with ``cryptography`` and the hash is signed through OpenSSL (about
0.3 ms for RSA-2048). dkimpy still parses the header block (``rfc822_parse``) and
supplies the body-trailer rules; header selection and relaxed canonicalization are
dkimpy's rules rewritten with precompiled patterns and fast paths (profiling showed
them as a third of the time), and tests hold them byte-equal to dkimpy's own
``select_headers`` and ``Relaxed``. The seam is the signature itself: we build the
DKIM-Signature header, hash it as RFC 6376 section 3.7 says, and sign the digest
with the parsed key.

Per message the work is done once and shared by every signature (dual
RSA + Ed25519 signing, several selectors during rotation): the header block is
parsed once, the body canonicalized and hashed once, and the signed header
fields hashed once into a SHA-256 state that each signature copies.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.utils import getaddresses
from pathlib import Path
from typing import Any, Literal, Protocol, cast

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.errors import EngineError
from engine.linebreaks import crlf

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]

#: Header fields signed when present, chosen for bulk mail: what a receiver
#: shows the user or uses for threading, unsubscribe (RFC 8058 requires
#: List-Unsubscribe-Post to be signed) and feedback loops.
DEFAULT_SIGNED_HEADERS: tuple[str, ...] = (
    "from", "to", "subject", "date", "message-id", "mime-version", "content-type",
    "content-transfer-encoding", "reply-to", "cc", "list-unsubscribe",
    "list-unsubscribe-post", "feedback-id", "in-reply-to", "references",
)
#: Fields listed once more than present so nobody can add another instance
#: (a second From would otherwise pass verification and win in some clients).
DEFAULT_OVERSIGNED: tuple[str, ...] = ("from",)

_MIN_RSA_BITS = 1024  # RFC 8301: verifiers reject shorter keys
_RSA_BITS_ALLOWED = (1024, 2048, 3072, 4096)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_NAME_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_FOLD_WIDTH = 76  # keep every line of our header under 78 characters (RFC 5322)
_B64_CHUNK = 72
_PKCS1 = padding.PKCS1v15()
_PREHASHED = utils.Prehashed(hashes.SHA256())


class DkimError(EngineError):
    """A message cannot be signed (malformed header block, bad signing parameters)."""


class DkimKeyError(DkimError):
    """A DKIM private key file is missing, unreadable, or not the declared kind of key."""


# ---------------------------------------------------------------------------
# Configuration (to be moved into engine/config.py)
# ---------------------------------------------------------------------------


def _check_dns_name(value: str, what: str) -> str:
    value = value.strip().rstrip(".").lower()
    try:
        ascii_value = value.encode("idna").decode("ascii") if not value.isascii() else value
    except UnicodeError as exc:
        raise ValueError(f"{what} {value!r} is not a valid DNS name") from exc
    if len(ascii_value) > 253 or not _NAME_RE.match(ascii_value):
        raise ValueError(f"{what} {value!r} is not a valid DNS name (letters, digits, '-', '_', dots)")
    return ascii_value


class DkimKeyConfig(BaseModel):
    """One ``[[domains.dkim]]`` entry: every entry listed signs, so dual signing is two entries
    and key rotation is: publish the new selector, add it, later remove the old one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    selector: str = Field(description="DNS selector: the key is published at <selector>._domainkey.<domain>.")
    algorithm: Algorithm = Field(default="rsa-sha256", description="rsa-sha256 or ed25519-sha256.")
    key_file: Path = Field(description="PEM private key (PKCS#8 or PKCS#1); relative to the engine home.")

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: str) -> str:
        return _check_dns_name(v, "selector")


class DomainDkimConfig(BaseModel):
    """The DKIM part of a ``[[domains]]`` entry (``name`` plus its ``[[domains.dkim]]`` keys)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Sending domain; mail whose From is this domain (or a subdomain) is signed with d=name.")
    dkim: list[DkimKeyConfig] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_dns_name(v, "domain")


class _DomainLike(Protocol):
    """What :meth:`DkimSigner.from_config` needs, so the future engine.config model fits as is."""

    @property
    def name(self) -> str: ...

    @property
    def dkim(self) -> Sequence[DkimKeyConfig]: ...


# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A parsed private key ready to sign, with its (domain, selector, algorithm)."""

    domain: str
    selector: str
    algorithm: Algorithm
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign a SHA-256 digest of the canonical header data.

        RSA signs it PKCS#1 v1.5 as a prehashed SHA-256; Ed25519 (RFC 8463 section 3)
        signs the 32-byte digest itself with PureEdDSA.
        """
        if self.algorithm == "rsa-sha256":
            return self.key.sign(digest, _PKCS1, _PREHASHED)  # type: ignore[call-arg]
        return self.key.sign(digest)  # type: ignore[call-arg]


def load_private_key(path: str | os.PathLike[str], algorithm: Algorithm) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    """Read and parse a private key file once; every failure becomes a :class:`DkimKeyError`
    that names the file and says what to do."""
    path = Path(path)
    hint = "generate one with `engine dkim keygen`"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DkimKeyError(f"DKIM key file {path} does not exist; {hint}") from None
    except IsADirectoryError:
        raise DkimKeyError(f"DKIM key file {path} is a directory, expected a PEM private key file") from None
    except PermissionError:
        raise DkimKeyError(f"DKIM key file {path} is not readable by this user (permission denied)") from None
    except OSError as exc:
        raise DkimKeyError(f"DKIM key file {path} cannot be read: {exc.strerror or exc}") from None
    key: Any
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise DkimKeyError(f"DKIM key file {path} is encrypted; store it without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm):
        key = _raw_ed25519(data) if algorithm == "ed25519-sha256" else None
        if key is None:
            raise DkimKeyError(f"DKIM key file {path} is not a PEM private key; {hint}") from None
    if algorithm == "rsa-sha256":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DkimKeyError(f"DKIM key file {path} holds an {_kind(key)} key but algorithm is rsa-sha256")
        if key.key_size < _MIN_RSA_BITS:
            raise DkimKeyError(f"DKIM key file {path} is a {key.key_size}-bit RSA key; receivers reject keys under {_MIN_RSA_BITS} bits")
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise DkimKeyError(f"DKIM key file {path} holds an {_kind(key)} key but algorithm is ed25519-sha256")
    return cast("rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey", key)


def _raw_ed25519(data: bytes) -> ed25519.Ed25519PrivateKey | None:
    """Accept the base64 32-byte seed that dkimpy's dknewkey writes, so existing keys keep working."""
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except ValueError:
        return None
    return ed25519.Ed25519PrivateKey.from_private_bytes(raw) if len(raw) == 32 else None


def _kind(key: object) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RSA"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "Ed25519"
    return type(key).__name__.removeprefix("_").replace("PrivateKey", "") or "unknown"


# ---------------------------------------------------------------------------
# Signing
# ---------------------------------------------------------------------------


class DkimSigner:
    """Holds parsed keys for sending domains and signs messages with every active key of the
    message's domain. Thread-safe and cheap to call; build it once (at start and on reload)."""

    def __init__(
        self,
        keys: Iterable[SigningKey],
        *,
        signed_headers: Sequence[str] = DEFAULT_SIGNED_HEADERS,
        oversigned: Sequence[str] = DEFAULT_OVERSIGNED,
        match_parent_domains: bool = True,
    ) -> None:
        """``match_parent_domains``: mail From ``news.example.com`` is signed with the
        ``example.com`` keys when the subdomain has none of its own (still aligned under
        DMARC relaxed alignment)."""
        self._by_domain: dict[str, tuple[SigningKey, ...]] = {}
        for k in keys:
            try:
                domain, selector = _check_dns_name(k.domain, "domain"), _check_dns_name(k.selector, "selector")
            except ValueError as exc:
                raise DkimError(str(exc)) from None
            k = SigningKey(domain, selector, k.algorithm, k.key)
            self._by_domain[domain] = self._by_domain.get(domain, ()) + (k,)
        self._sign_set = frozenset(h.lower().encode("ascii") for h in signed_headers)
        self._oversigned = tuple(h.lower().encode("ascii") for h in oversigned)
        if b"from" not in self._sign_set and b"from" not in self._oversigned:
            raise DkimError("the From header field must be signed (RFC 6376 section 5.4)")
        self._match_parent = match_parent_domains
        # The tag run "v=1; a=...; c=...; d=...; s=..." is fixed per key: build it once.
        self._head = {id(k): _fold(f"v=1; a={k.algorithm}; c=relaxed/relaxed; d={k.domain}; s={k.selector};".encode("ascii"),
                                   len(b"DKIM-Signature: "))
                      for ks in self._by_domain.values() for k in ks}
        self._h_cache: dict[tuple[bytes, ...], bytes] = {}

    @classmethod
    def from_config(cls, domains: Iterable[_DomainLike], base_dir: str | os.PathLike[str] | None = None,
                    **options: Any) -> DkimSigner:
        """Build from ``[[domains]]`` entries, parsing every key file now so a bad key stops
        the start (or the reload) instead of failing message after message."""
        keys: list[SigningKey] = []
        for d in domains:
            domain = _check_dns_name(d.name, "domain")
            for entry in d.dkim:
                path = Path(entry.key_file)
                if base_dir is not None and not path.is_absolute():
                    path = Path(base_dir) / path
                keys.append(SigningKey(domain, entry.selector, entry.algorithm, load_private_key(path, entry.algorithm)))
        return cls(keys, **options)

    @property
    def domains(self) -> frozenset[str]:
        """Domains we hold at least one key for."""
        return frozenset(self._by_domain)

    def keys_for(self, domain: str) -> tuple[SigningKey, ...]:
        """Active keys for ``domain`` (exact, then closest parent if enabled); empty if none."""
        domain = domain.strip().rstrip(".").lower()
        if not domain.isascii():
            try:
                domain = domain.encode("idna").decode("ascii")
            except UnicodeError:
                return ()
        found = self._by_domain.get(domain)
        if found or not self._match_parent:
            return found or ()
        while "." in domain:
            domain = domain.split(".", 1)[1]
            found = self._by_domain.get(domain)
            if found:
                return found
        return ()

    def sign(self, message: bytes, domain: str | None = None, *, timestamp: int | None = None) -> bytes:
        """Return ``message`` with our DKIM-Signature header(s) prepended, above any existing
        ones (relayed mail keeps its signatures). Unchanged when no key matches.

        ``domain`` forces d= (exact match); otherwise the From header's domain picks it.
        Bare LF line endings are turned into CRLF first, as SMTP will send them.
        """
        message = _crlf(message)
        headers = self._headers_to_sign(message, domain, timestamp)
        return headers + message if headers else message

    def signature_headers(self, message: bytes, domain: str | None = None, *, timestamp: int | None = None) -> bytes:
        """Only the DKIM-Signature header lines (CRLF-terminated) to prepend; ``b""`` if no key matches."""
        return self._headers_to_sign(_crlf(message), domain, timestamp)

    def _headers_to_sign(self, message: bytes, domain: str | None, timestamp: int | None = None) -> bytes:
        headers, body = _split(message)
        if domain is not None:
            try:
                keys = self._by_domain.get(_check_dns_name(domain, "domain"), ())
            except ValueError as exc:
                raise DkimError(f"cannot sign: {exc}") from None
        else:
            from_domain = _from_domain(headers)
            keys = self.keys_for(from_domain) if from_domain else ()
        if not keys:
            return b""

        # Shared by every signature: body hash and the hash state after the signed fields.
        bh = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
        include, selected = self._include(headers)
        hstate = hashlib.sha256()
        for name, value in selected:
            hstate.update(relaxed_header(name, value) + b"\r\n")
        h_tag = self._h_tag(include)
        t_bh = b"\r\n t=%d; bh=%s;\r\n b=" % (int(time.time()) if timestamp is None else timestamp, bh)
        out = []
        for key in keys:
            prefix = self._head[id(key)] + h_tag + t_bh
            h = hstate.copy()
            # RFC 6376 3.7: our own field, canonicalized, with b= empty and no trailing CRLF.
            h.update(relaxed_header(b"DKIM-Signature", prefix))
            sig = base64.b64encode(key.sign_digest(h.digest()))
            out.append(b"DKIM-Signature: " + prefix
                       + b"\r\n   ".join([sig[i:i + _B64_CHUNK] for i in range(0, len(sig), _B64_CHUNK)]) + b"\r\n")
        return b"".join(out)

    def _h_tag(self, include: list[bytes]) -> bytes:
        """The folded ``h=`` line; the same header set recurs message after message, so cache it."""
        key = tuple(include)
        tag = self._h_cache.get(key)
        if tag is None:
            if len(self._h_cache) >= 1024:
                self._h_cache.clear()
            tag = self._h_cache[key] = b"\r\n " + _fold(b"h=" + b":".join(include) + b";", 1)
        return tag

    def _include(self, headers: list[list[bytes]]) -> tuple[list[bytes], list[list[bytes]]]:
        """The h= list and the fields it selects, in one pass.

        h= lists the present signable fields in message order (each instance once), then the
        over-signed names once more. Selection follows RFC 6376 5.4.2 (repeated names are
        taken bottom-up), the same as dkimpy's ``select_headers`` (a test holds them equal),
        without its scan per name.
        """
        sign_set = self._sign_set
        include: list[bytes] = []
        where: dict[bytes, list[int]] = {}
        for i, (name, _) in enumerate(headers):
            lname = name.lower()
            if lname in sign_set:
                include.append(lname)
                where.setdefault(lname, []).append(i)
        include.extend(self._oversigned)
        selected = []
        for lname in include:
            found = where.get(lname)
            if found:
                selected.append(headers[found.pop()])
        return include, selected


_WSP = re.compile(rb"[\t ]+")
_WSP_RUN = re.compile(rb"\t[\t ]*| [\t ]+")


def relaxed_header(name: bytes, value: bytes) -> bytes:
    """``name:value`` in relaxed form (RFC 6376 3.4.2), no CRLF. Same rules as dkimpy's
    ``Relaxed.canonicalize_headers`` (a test holds them equal) with precompiled patterns."""
    # Removing every CRLF, then every lone LF, is exactly dkimpy's re.sub(b"\r?\n", b""), and
    # squeezing only when a tab or a double space exists skips the regex for most fields.
    v = value.replace(b"\r\n", b"")
    if b"\n" in v:
        v = v.replace(b"\n", b"")
    if b"\t" in v or b"  " in v:
        v = _WSP.sub(b" ", v)
    return name.lower().rstrip() + b":" + v.strip()


def relaxed_body(body: bytes) -> bytes:
    """Body in relaxed form (RFC 6376 3.4.4), equal to dkimpy's ``Relaxed.canonicalize_body``
    (a test holds them equal) at a third of the cost: squeeze only the runs that change,
    after which trailing white space is at most one space before CRLF."""
    from dkim.canonicalization import correct_empty_body, strip_trailing_lines  # dkimpy loads dnspython: not at import

    if b"\t" in body or b"  " in body:
        body = _WSP_RUN.sub(b" ", body)
    canonical: bytes = correct_empty_body(strip_trailing_lines(body.replace(b" \r\n", b"\r\n")))
    return canonical


def _crlf(message: bytes) -> bytes:
    """Line ends exactly as the SMTP client will send them (see :mod:`engine.linebreaks`)."""
    return crlf(message)


def _split(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """Header fields (via dkimpy, so verifiers agree on them) and the body, without splitting
    the body into lines: only the header block goes through the line parser."""
    from dkim import MessageFormatError, rfc822_parse  # dkimpy loads dnspython: not at import (engine.config uses us)

    if message.startswith(b"\r\n"):
        head, body = b"", message[2:]
    else:
        end = message.find(b"\r\n\r\n")
        head, body = (message, b"") if end < 0 else (message[:end + 2], message[end + 4:])
    try:
        headers, _ = rfc822_parse(head)
    except MessageFormatError as exc:
        raise DkimError(f"cannot sign: malformed header block ({exc})") from None
    return headers, body


_FROM_SIMPLE = re.compile(rb'\s*(?:"(?:[^"\\]|\\.)*"|[^"(),:;<>@\\]*)\s*<?[^\s"(),:;<>@\\]+@([A-Za-z0-9.-]+)>?\s*')


def _from_domain(headers: list[list[bytes]]) -> str | None:
    """Domain of the first address in the first From field, or None if there is none.
    Plain ``Name <a@b>`` / ``a@b`` take a regex; anything else (quotes, comments, groups,
    several mailboxes, UTF-8) goes to the standard library's address parser."""
    for name, value in headers:
        if name.lower() == b"from":
            m = _FROM_SIMPLE.fullmatch(value)
            if m:
                return m.group(1).decode("ascii").rstrip(".").lower() or None
            text = value.decode("utf-8", "replace").replace("\r\n", "")
            for _, addr in getaddresses([text]):
                if "@" in addr:
                    return addr.rsplit("@", 1)[1].strip().strip(">").lower() or None
            return None
    return None


def _fold(value: bytes, first: int) -> bytes:
    """Fold a tag list at spaces (between tags) or after ':' (inside h=), both places where
    RFC 6376 allows folding white space, so lines stay under 78 characters. ``first`` is
    the width already used on the first line."""
    if first + len(value) <= _FOLD_WIDTH:
        return value
    atoms = re.findall(rb"[^ :]+(?::|(?= )|$)| ", value)
    lines: list[bytes] = []
    line = b""
    width = first
    for atom in atoms:
        if atom == b" ":
            if line:
                line += b" "
            continue
        if line.strip() and width + len(line) + len(atom) > _FOLD_WIDTH:
            lines.append(line.rstrip(b" "))
            line, width = b"", 1
        line += atom
    lines.append(line)
    return b"\r\n ".join(lines)


# ---------------------------------------------------------------------------
# Key generation
# ---------------------------------------------------------------------------


def _alg_name(algorithm: str) -> Algorithm:
    a = algorithm.lower()
    if a in ("rsa", "rsa-sha256"):
        return "rsa-sha256"
    if a in ("ed25519", "ed25519-sha256"):
        return "ed25519-sha256"
    raise DkimError(f"unknown DKIM algorithm {algorithm!r}: use rsa or ed25519")


def public_txt_value(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    """The TXT record content for a key: SubjectPublicKeyInfo for RSA (what opendkim-genkey
    publishes), the raw 32-byte public key for Ed25519 (RFC 8463 section 4)."""
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode("ascii")


def txt_record(domain: str, selector: str, value: str) -> str:
    """Zone-file line. The name ends with a dot so a zone file reads it as absolute (without
    it the zone's origin would be appended). DNS character-strings hold at most 255 bytes,
    so long values are split into several quoted strings that resolvers concatenate."""
    chunks = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    return f"{selector}._domainkey.{domain}. IN TXT {chunks}"


def keygen(domain: str, selector: str, algorithm: str = "rsa", out_dir: str | os.PathLike[str] = ".",
           bits: int = 2048) -> tuple[Path, str]:
    """Create a key pair, write the private key as PEM (mode 0600 from creation, never
    overwriting an existing file) and return (path, TXT record to publish)."""
    try:
        domain = _check_dns_name(domain, "domain")
        selector = _check_dns_name(selector, "selector")
    except ValueError as exc:
        raise DkimError(str(exc)) from None
    alg = _alg_name(algorithm)
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if alg == "rsa-sha256":
        if bits not in _RSA_BITS_ALLOWED:
            raise DkimError(f"RSA key size {bits} not supported: use one of {', '.join(map(str, _RSA_BITS_ALLOWED))}")
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    out = Path(out_dir)
    path = out / f"{domain}.{selector}.{'rsa' if alg == 'rsa-sha256' else 'ed25519'}.pem"
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise DkimError(f"{path} already exists; pick a new selector (rotation) or remove the old file") from None
    except OSError as exc:
        raise DkimError(f"cannot write {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return path, txt_record(domain, selector, public_txt_value(key))
