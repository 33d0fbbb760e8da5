"""Composition per message on one core: template render + MIME + tracking + DKIM.

Run: .venv/bin/python -m benchmarks.bench_compose [--seconds 3] [--profile]
Prints messages/s for no signing, RSA-2048, Ed25519 and dual (RSA + Ed25519), with the
'receipt' file template, per-recipient variables, click/open tracking and List-Unsubscribe
(bulk stream): the whole path a delivery worker runs per personalized copy. Then MIME alone
(``build_message``), direct writer against the stdlib builder (``fast=False``), on the
message the composer produced. ``--profile`` prints where the no-DKIM case spends its time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

from engine.compose.dkim import keygen
from engine.compose.mime import ListUnsubscribe, Mailbox, MessageContent, build_message
from engine.compose.pipeline import Composer, MessageRow
from engine.config import load_settings
from engine.ids import uuid7

COMMAND = ".venv/bin/python -m benchmarks.bench_compose"


def settings_for(keys: dict[str, Path], tmp: Path):  # type: ignore[no-untyped-def]
    lines = ['[tracking]\n[[tracking.keys]]\nid = 1\nsecret = "bench-secret-0123456789abcdef0123456789"\n']
    if keys:
        lines.append('[[domains]]\nname = "example.com"\n')
        for sel, path in keys.items():
            alg = "ed25519-sha256" if sel.startswith("ed") else "rsa-sha256"
            lines.append(f'[[domains.dkim]]\nselector = "{sel}"\nalgorithm = "{alg}"\nkey_file = "{path}"\n')
    cfg = tmp / f"c{len(keys)}{''.join(keys)}.toml"
    cfg.write_text("".join(lines))
    return load_settings(cfg, env={})


def bench_row() -> MessageRow:
    return MessageRow.from_stored(
        id=uuid7(), mail_from="shop@example.com", stream="bulk", raw=None, metadata={"campaign": "c1"},
        content={"from": {"email": "shop@example.com", "name": "Shop"}, "to": [{"email": "ann@example.net"}],
                 "cc": [], "subject": None, "text": None, "html": None, "headers": {}, "template": "receipt",
                 "vars": {"order_id": "A-17", "currency": "EUR", "total": "42.00",
                          "items": [{"name": f"Item {i}", "quantity": 1, "price": "4.20"} for i in range(10)]}},
    )


def measure(composer: Composer, seconds: float) -> tuple[float, int]:
    msg = bench_row()
    n, size = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds and n < 200_000:
        out = composer.compose(msg, 1000 + n, {"name": f"Customer {n}"})
        size = len(out)
        n += 1
    return n / (time.perf_counter() - start), size


def measure_mime(composer: Composer, seconds: float, fast: bool) -> float:
    """build_message alone, on the subject and bodies the composer rendered (with tracking)."""
    from engine.compose.tracking import track_html, unsubscribe_url

    content = bench_row().content
    assert content is not None
    subject, html, text = composer._parts(content, {"name": "Customer 1"})
    assert composer.keyring is not None and html is not None
    html, _ = track_html(html, 1000, composer.keyring, composer.settings.tracking, composer.base_url)
    content = MessageContent(
        sender=Mailbox("shop@example.com", "Shop"), to=[Mailbox("ann@example.net")], subject=subject, text=text,
        html=html, stream="bulk", list_unsubscribe=ListUnsubscribe(url=unsubscribe_url(composer.base_url, 1000, composer.keyring)),
        feedback={"campaign": "c1"},
    )
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds and n < 500_000:
        build_message(content, sending_domain="example.com", message_id=f"m.{n}", config=composer.settings.mime, fast=fast)
        n += 1
    return n / (time.perf_counter() - start)


def profile(composer: Composer, seconds: float) -> None:
    prof = cProfile.Profile()
    prof.enable()
    measure(composer, seconds)
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--profile", action="store_true", help="profile the no-DKIM case instead of measuring")
    args = ap.parse_args()
    if args.profile:
        with tempfile.TemporaryDirectory() as d:
            profile(Composer(settings_for({}, Path(d))), args.seconds)
        print(f"command: {COMMAND} --seconds {args.seconds} --profile")
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rsa, _ = keygen("example.com", "rsa1", "rsa", tmp)
        ed, _ = keygen("example.com", "ed1", "ed25519", tmp)
        cases = {"no DKIM": {}, "RSA-2048": {"rsa1": rsa}, "Ed25519": {"ed1": ed}, "dual RSA + Ed25519": {"rsa1": rsa, "ed1": ed}}
        print("render + MIME + tracking + List-Unsubscribe + DKIM, one core, 'receipt' template, 10 items")
        for name, keys in cases.items():
            rate, size = measure(Composer(settings_for(keys, tmp)), args.seconds)
            print(f"  {name:<20} {rate:8,.0f} messages/s  ({size:,} bytes each)")
        composer = Composer(settings_for({}, tmp))
        print("MIME only (build_message), same content")
        for name, fast in [("direct writer", True), ("stdlib builder", False)]:
            print(f"  {name:<20} {measure_mime(composer, args.seconds, fast):8,.0f} messages/s")
    print(f"command: {COMMAND} --seconds {args.seconds}")


if __name__ == "__main__":
    main()
