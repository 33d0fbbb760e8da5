"""Agreement of ``parse_report`` with Sisimai's published results on its public bounce corpus.

Usage: .venv/bin/python benchmarks/corpus_agreement.py [CORPUS_DIR] [--misses]

CORPUS_DIR defaults to ../shared/corpora/sisimai (see its README.md). Prints the
overall figures and a per-category table; ``--misses`` lists every disagreeing row.
The same computation backs tests/test_sisimai_corpus.py.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.feedback.report import Report, parse_report  # noqa: E402

#: Sisimai reason -> our categories. The first is the natural mapping; the others
#: are also accepted where Sisimai's reason spans two of ours (its "filtered" is
#: "rejected after DATA", mostly user-unknown wording: we call it policy, and keep
#: unknown_user when the bounce does not show the stage; "expired" bounces often only
#: say "connection timed out"). transient_other/permanent_other compare as "other".
REASON_MAP: dict[str, tuple[str, ...]] = {
    "userunknown": ("unknown_user",),
    "hasmoved": ("unknown_user",),
    "filtered": ("unknown_user", "policy", "content_spam"),
    "hostunknown": ("bad_domain",),
    "notaccept": ("bad_domain",),
    "mailboxfull": ("mailbox_full",),
    "suspend": ("mailbox_disabled",),
    "exceedlimit": ("message_too_big",),
    "mesgtoobig": ("message_too_big",),
    "blocked": ("reputation_block", "policy"),
    "badreputation": ("reputation_block",),
    "requireptr": ("policy",),
    "rejected": ("policy", "reputation_block"),
    "policyviolation": ("policy", "content_spam"),
    "securityerror": ("auth_failure", "policy"),
    "authfailure": ("auth_failure",),
    "norelaying": ("policy",),
    "toomanyconn": ("rate_limited",),
    "speeding": ("rate_limited",),
    "spamdetected": ("content_spam",),
    "virusdetected": ("content_spam",),
    "contenterror": ("protocol_error", "content_spam"),
    "notcompliantrfc": ("protocol_error",),
    "syntaxerror": ("protocol_error",),
    "failedstarttls": ("protocol_error",),
    "networkerror": ("network_error", "bad_domain"),
    "expired": ("expired", "network_error"),
    "systemerror": ("other",),
    "systemfull": ("other", "mailbox_full"),
    "mailererror": ("other",),
    "onhold": ("other",),
    "undefined": ("other",),
    "delivered": ("delivered",),
    "feedback": ("complaint",),
    "vacation": ("auto_reply",),
}


def _norm_cat(cat: str | None) -> str | None:
    return "other" if cat in ("transient_other", "permanent_other") else cat


@dataclass
class Tally:
    n: int = 0
    ok: int = 0

    def add(self, good: bool) -> None:
        self.n += 1
        self.ok += bool(good)

    @property
    def pct(self) -> float:
        return 100.0 * self.ok / self.n if self.n else 100.0


@dataclass
class Agreement:
    recipients: Tally = field(default_factory=Tally)
    status: Tally = field(default_factory=Tally)
    hard_soft: Tally = field(default_factory=Tally)
    hard_soft_no_filtered: Tally = field(default_factory=Tally)
    category: Tally = field(default_factory=Tally)
    category_primary: Tally = field(default_factory=Tally)
    per_reason: dict[str, dict[str, Tally]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(Tally)))
    not_bounces: dict[str, str] = field(default_factory=dict)
    misses: list[str] = field(default_factory=list)
    files: int = 0
    seconds: float = 0.0


def _match(report: Report, recipient: str, reason: str) -> dict[str, Any] | None:
    want = recipient.lower()
    if reason == "vacation":
        if report.kind == "auto_reply":
            return {"recipient": report.report_from, "category": "auto_reply", "status": None, "hard": False}
        return None
    for row in report.recipients:
        if row.recipient and row.recipient.lower() == want:
            return {"recipient": row.recipient, "category": row.category, "status": row.status, "hard": row.hard, "reply": row.reply, "rule": row.rule}
    return None


def compute(corpus: Path) -> Agreement:
    """Parse every sample and compare with expected.json."""
    expected = json.loads((corpus / "expected.json").read_text())["samples"]
    agg = Agreement()
    t0 = time.perf_counter()
    for name, sample in sorted(expected.items()):
        raw = (corpus / sample["sample"]).read_bytes()
        report = parse_report(raw)
        agg.files += 1
        if not sample["rows"]:
            agg.not_bounces[name] = report.kind
            continue
        for row in sample["rows"]:
            reason = row["reason"]
            got = _match(report, row["recipient"], reason)
            tallies = agg.per_reason[reason]
            found = got is not None
            agg.recipients.add(found)
            tallies["found"].add(found)
            if not found:
                agg.misses.append(f"{name}: recipient {row['recipient']} not found (kind={report.kind}, got {[r.recipient for r in report.recipients][:4]})")
                continue
            accepted = REASON_MAP.get(reason, ())
            cat_ok = _norm_cat(got["category"]) in accepted
            agg.category.add(cat_ok)
            agg.category_primary.add(_norm_cat(got["category"]) == (accepted[0] if accepted else None))
            tallies["category"].add(cat_ok)
            if not cat_ok:
                agg.misses.append(f"{name}: {row['recipient']} reason={reason} got category={got['category']} rule={got.get('rule')} | ours: {(got.get('reply') or '')[:160]!r}")
            if row["bounce_class"] in ("hard", "soft"):
                hs_ok = got["hard"] == (row["bounce_class"] == "hard")
                agg.hard_soft.add(hs_ok)
                if reason != "filtered":
                    agg.hard_soft_no_filtered.add(hs_ok)
                tallies["hard_soft"].add(hs_ok)
                if not hs_ok:
                    agg.misses.append(f"{name}: {row['recipient']} bounce_class={row['bounce_class']} reason={reason} got hard={got['hard']} category={got['category']}")
            if row.get("status") and not row.get("status_is_sisimai_pseudo"):
                st_ok = got["status"] == row["status"]
                agg.status.add(st_ok)
                tallies["status"].add(st_ok)
                if not st_ok:
                    agg.misses.append(f"{name}: {row['recipient']} status={row['status']} got {got['status']}")
    agg.seconds = time.perf_counter() - t0
    return agg


def format_table(agg: Agreement) -> str:
    lines = [
        f"files parsed: {agg.files} in {agg.seconds:.2f}s ({agg.files / agg.seconds if agg.seconds else 0:.0f} msg/s)",
        f"recipients found:      {agg.recipients.ok}/{agg.recipients.n} = {agg.recipients.pct:.1f}%",
        f"status code agrees:    {agg.status.ok}/{agg.status.n} = {agg.status.pct:.1f}%  (rows with a non-pseudo status)",
        f"hard/soft agrees:      {agg.hard_soft.ok}/{agg.hard_soft.n} = {agg.hard_soft.pct:.1f}%"
        f"  (without Sisimai's 'filtered' rows: {agg.hard_soft_no_filtered.ok}/{agg.hard_soft_no_filtered.n} = {agg.hard_soft_no_filtered.pct:.1f}%;"
        " a 'user unknown' the bounce shows came after DATA is soft for both; Sisimai also calls it 'filtered' when the"
        " stage is unknown and the reply has no X.1.1, we keep those hard)",
        f"category accepted:     {agg.category.ok}/{agg.category.n} = {agg.category.pct:.1f}%  (primary mapping only: {agg.category_primary.pct:.1f}%)",
        f"not-bounce samples:    {agg.not_bounces}",
        "",
        f"{'sisimai reason':<16} {'rows':>5} {'found':>7} {'category':>9} {'hard/soft':>10} {'status':>8}  our categories",
    ]
    for reason in sorted(agg.per_reason, key=lambda r: -agg.per_reason[r]["found"].n):
        t = agg.per_reason[reason]

        def cell(key: str) -> str:
            return f"{t[key].pct:.0f}%" if t[key].n else "-"

        lines.append(
            f"{reason:<16} {t['found'].n:>5} {cell('found'):>7} {cell('category'):>9} {cell('hard_soft'):>10} {cell('status'):>8}  {'/'.join(REASON_MAP.get(reason, ('?',)))}"
        )
    return "\n".join(lines)


def classify_throughput(corpus: Path, rounds: int = 20) -> tuple[int, float]:
    """Replies classified per second over the corpus's diagnostic texts (cache bypassed)."""
    from engine.feedback.classify import load_rules, parse_reply

    expected = json.loads((corpus / "expected.json").read_text())["samples"]
    replies = [r.get("diagnosticcode") or "" for s in expected.values() for r in s["rows"]]
    clf = load_rules()
    n = 0
    t0 = time.perf_counter()
    for i in range(rounds):
        for reply in replies:
            code, enh, text = parse_reply(reply)
            clf.classify(code, enh, f"{text} {i}")  # distinct text each round: no cache hits
            n += 1
    return n, time.perf_counter() - t0


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    corpus = Path(args[0]) if args else ROOT.parent / "shared" / "corpora" / "sisimai"
    if not (corpus / "expected.json").exists():
        print(f"corpus not found at {corpus}", file=sys.stderr)
        return 2
    agg = compute(corpus)
    print("command: .venv/bin/python benchmarks/corpus_agreement.py " + " ".join(argv))
    print(format_table(agg))
    n, secs = classify_throughput(corpus)
    print(f"\nclassify: {n} replies in {secs:.2f}s = {n / secs:.0f} replies/s (one core, cache bypassed)")
    if "--misses" in argv:
        print("\nmisses:")
        print("\n".join(agg.misses))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
