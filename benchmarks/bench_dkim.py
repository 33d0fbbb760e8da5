"""DKIM signatures per second on one core for a 3 KB message.

Compares dkimpy's own ``dkim.sign`` (pure-Python RSA, key parsed per call) with our
:class:`engine.compose.dkim.DkimSigner` (keys parsed once, OpenSSL signing via
``cryptography``). Each figure includes parsing and canonicalization of the whole
message. The last line, OpenSSL's RSA signature alone, is the floor under the RSA figures and
shows how loaded the machine was. Run: ``.venv/bin/python -m benchmarks.bench_dkim [--seconds 2]``.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, utils

from engine.compose.dkim import DkimKeyConfig, DkimSigner, DomainDkimConfig, keygen, load_private_key

COMMAND = ".venv/bin/python -m benchmarks.bench_dkim"
ROUNDS = 5


def message_3kb() -> bytes:
    """A typical bulk message: the usual headers plus a plain-text body, 3072 bytes in all."""
    head = (
        b'From: "Example News" <news@example.com>\r\n'
        b"To: Someone <someone@example.org>\r\n"
        b"Subject: Your weekly digest of things worth reading\r\n"
        b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
        b"Message-ID: <digest.20240101.123456@example.com>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"List-Unsubscribe: <https://example.com/u/abcdef0123456789>, <mailto:unsub@example.com>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        b"Feedback-ID: c1:weekly:example\r\n"
        b"\r\n"
    )
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n"
    body = line * (3072 // len(line) + 1)
    return head + body[: 3072 - len(head) - 2] + b"\r\n"


def rate(fn: Callable[[], object], seconds: float, max_calls: int = 200_000) -> float:
    """Calls per second of ``fn`` over about ``seconds`` (bounded by time and by count)."""
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while n < max_calls:
        for _ in range(8):
            fn()
        n += 8
        if time.perf_counter() >= deadline:
            break
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="time per case (default 2)")
    args = ap.parse_args(argv)
    msg = message_3kb()
    with tempfile.TemporaryDirectory() as tmp:
        rsa_path, _ = keygen("example.com", "rsa1", "rsa", tmp)
        ed_path, _ = keygen("example.com", "ed1", "ed25519", tmp)
        rsa_entry = DkimKeyConfig(selector="rsa1", algorithm="rsa-sha256", key_file=rsa_path)
        ed_entry = DkimKeyConfig(selector="ed1", algorithm="ed25519-sha256", key_file=ed_path)

        def signer(*entries: DkimKeyConfig) -> DkimSigner:
            return DkimSigner.from_config([DomainDkimConfig(name="example.com", dkim=list(entries))])

        rsa_pem = Path(rsa_path).read_bytes()
        ours_rsa, ours_ed, ours_dual = signer(rsa_entry), signer(ed_entry), signer(rsa_entry, ed_entry)
        rsa_key = load_private_key(rsa_path, "rsa-sha256")
        digest = hashlib.sha256(msg).digest()
        cases: list[tuple[str, Callable[[], object]]] = [
            ("dkimpy dkim.sign rsa-sha256 2048 (baseline)", lambda: dkim.sign(
                msg, b"rsa1", b"example.com", rsa_pem, canonicalize=(b"relaxed", b"relaxed"))),
            ("DkimSigner rsa-sha256 2048", lambda: ours_rsa.sign(msg)),
            ("DkimSigner ed25519-sha256", lambda: ours_ed.sign(msg)),
            ("DkimSigner dual rsa-sha256 + ed25519-sha256", lambda: ours_dual.sign(msg)),
            ("floor: OpenSSL RSA-2048 sign of a digest only", lambda: rsa_key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))),
        ]
        print(f"message: {len(msg)} bytes; python {sys.version.split()[0]}; single thread; "
              f"{ROUNDS} interleaved rounds, {args.seconds:g} s per case")
        results: dict[str, list[float]] = {name: [] for name, _ in cases}
        for name, fn in cases:
            fn()  # warm up
        for _ in range(ROUNDS):
            for name, fn in cases:
                results[name].append(rate(fn, args.seconds / ROUNDS))
        baseline = max(results[cases[0][0]])
        print(f"  {'case':<48} {'best/s':>9} {'median/s':>9}")
        for name, rates in results.items():
            print(f"  {name:<48} {max(rates):>9,.0f} {statistics.median(rates):>9,.0f}   x{max(rates) / baseline:.1f}")
    print("best = least disturbed round (other processes share the 2 cores); median for context")
    print(f"command: {COMMAND}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
