"""``engine consent import|export|show|erase``: the consent records from a shell.

The same records, rules and outcomes as the REST API (everything goes through
:mod:`engine.consent.store` and :mod:`engine.consent.erasure`, the owners of those tables);
changes are recorded with actor ``cli``. ``import`` reads NDJSON from a file or ``-`` (stdin),
gzip or not (recognised by its magic bytes, so ``.gz`` files work as they are), applies valid
lines in batches, prints each bad line's number, field and reason on stderr, and exits 1 when
any line was refused.
"""

from __future__ import annotations

import argparse
import gzip
import io
import sys
from collections.abc import Iterator
from typing import IO, Any, cast

import orjson

from engine.commands import Subparsers
from engine.consent.imports import BATCH, empty_totals, parse_line
from engine.consent.models import ConsentIn, ConsentRecord
from engine.consent.policy import ConsentPolicy
from engine.consent.store import ConsentStore, check_purpose
from engine.errors import EngineError, ValidationFailed
from engine.runtime import database
from engine.suppression import Suppressions, normalize_address


def register(sub: Subparsers) -> None:
    grp = sub.add_parser("consent", help="consent records: import, export, show, erase").add_subparsers(
        dest="consent_cmd", required=True
    )
    p = grp.add_parser("import", help="record consent from NDJSON (one record per line; gzip ok)")
    p.add_argument("file", help="an NDJSON file (.gz ok), or - for stdin")
    p.set_defaults(func=cmd_consent_import)
    p = grp.add_parser("export", help="every current consent record, in address order")
    p.add_argument("--ndjson", action="store_true", help="one JSON object per line (as GET /v1/consent?format=ndjson)")
    p.add_argument("--purpose", default=None, help="only this purpose")
    p.set_defaults(func=cmd_consent_export)
    p = grp.add_parser("show", help="one address: consent per purpose, suppressions, history")
    p.add_argument("address")
    p.set_defaults(func=cmd_consent_show)
    p = grp.add_parser("erase", help="erase an address everywhere; it is never mailed again")
    p.add_argument("address")
    p.set_defaults(func=cmd_consent_erase)


def _open(name: str) -> IO[bytes]:
    """The file (or stdin) as bytes, inflated when it starts with the gzip magic."""
    try:
        raw: io.BufferedReader = sys.stdin.buffer if name == "-" else open(name, "rb")  # type: ignore[assignment]
    except OSError as exc:
        raise EngineError(f"cannot read {name}: {exc.strerror}") from None
    if raw.peek(2)[:2] == b"\x1f\x8b":
        return cast(IO[bytes], gzip.GzipFile(fileobj=raw))
    return raw


def _lines(fh: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, line without its newline); blank lines count but are not returned."""
    try:
        for n, line in enumerate(fh, 1):
            line = line.rstrip(b"\r\n")
            if line.strip():
                yield n, line
    except (OSError, EOFError) as exc:  # a truncated or corrupt gzip stream
        raise EngineError(f"cannot read the input: {exc}") from None


async def cmd_consent_import(args: argparse.Namespace) -> int:
    policy = ConsentPolicy.from_config(args.settings.consent)
    totals = empty_totals()
    fh = _open(args.file)
    async with database(args.settings) as pool:
        store = ConsentStore(pool, policy)
        batch: list[ConsentIn | ConsentRecord] = []

        async def flush() -> None:
            if batch:
                applied = await store.record(batch, "cli")
                for k, v in applied.counts.items():
                    totals[k] += v
                totals["pending_stopped"] += applied.stopped
                batch.clear()

        for n, line in _lines(fh):
            totals["lines"] += 1
            try:
                batch.append(parse_line(line, policy))
            except ValidationFailed as exc:
                totals["invalid"] += 1
                print(f"line {n}: {exc.field}: {exc.message}", file=sys.stderr)
                continue
            if len(batch) >= BATCH:
                await flush()
        await flush()
    if fh is not sys.stdin.buffer:
        fh.close()
    print(" ".join(f"{k}={v}" for k, v in totals.items()))
    return 1 if totals["invalid"] else 0


async def cmd_consent_export(args: argparse.Namespace) -> int:
    policy = ConsentPolicy.from_config(args.settings.consent)
    if args.purpose is not None:
        check_purpose(policy, args.purpose)
    out = sys.stdout.buffer
    async with database(args.settings) as pool:
        store = ConsentStore(pool, policy)
        pos: tuple[str, str] | None = None
        while True:
            rows = await store.page(pos, 5000, args.purpose)
            if not rows:
                break
            for r in rows:
                if args.ndjson:
                    out.write(orjson.dumps(r) + b"\n")
                else:
                    out.write(
                        f"{r['address']:<40} {r['purpose']:<14} {r['status']:<8} {r['source']:<24} "
                        f"{r['captured_at']:%Y-%m-%d %H:%M:%S%z}{'  legacy' if r['legacy'] else ''}\n".encode()
                    )
            pos = (rows[-1]["address"], rows[-1]["purpose"])
    out.flush()
    return 0


def _when(value: Any) -> str:
    return value.isoformat() if value is not None else "-"


async def cmd_consent_show(args: argparse.Namespace) -> int:
    from engine.consent.erasure import is_erased

    address = normalize_address(args.address)  # before any connection: a bad address is exit 1
    policy = ConsentPolicy.from_config(args.settings.consent)
    async with database(args.settings) as pool:
        store = ConsentStore(pool, policy)
        current = await store.current(address)
        history = await store.history(address)
        suppressions = await Suppressions(pool).list(address, 1000)
        erased = await is_erased(pool, address)
    print(address + ("  (erased: on the do-not-mail list)" if erased else ""))
    print("consent:" if current else "consent: none recorded")
    for r in current:
        print(f"  {r['purpose']:<14} {r['status']:<8} basis={r['legal_basis'] or '-'} source={r['source']} "
              f"captured_at={_when(r['captured_at'])} policy={r['policy_version'] or '-'}"
              f"{' contact_id=' + r['contact_id'] if r['contact_id'] else ''}{' legacy' if r['legacy'] else ''}")
    print("suppressions:" if suppressions else "suppressions: none")
    for s in suppressions:
        print(f"  {s.scope:<16} {s.reason} ({s.source}, {s.created_at:%Y-%m-%d %H:%M:%S})")
    print("history:" if history else "history: none")
    for h in history:
        print(f"  {_when(h['recorded_at'])} {h['purpose']:<14} {h['old_status'] or '-'} -> {h['status']} "
              f"by {h['actor']} (source {h['source']}, captured_at {_when(h['captured_at'])})")
    return 0


async def cmd_consent_erase(args: argparse.Namespace) -> int:
    normalize_address(args.address)
    from engine.consent.erasure import erase_contact  # imported by the command that needs it: fast `engine --help`

    async with database(args.settings) as pool:
        report = await erase_contact(pool, args.address, "cli")
    print(f"erased: {report.address_hash} (recipients={report.recipients} messages_blanked={report.messages_blanked} "
          f"events={report.events} suppressions={report.suppressions} consent_rows={report.consent_rows})")
    return 0
