"""Agreement with Sisimai on its public corpus of 629 real bounces from 77 MTAs.

The figures (and the reason -> category mapping table) live in
benchmarks/corpus_agreement.py so that a person can print the whole table;
this test computes the same thing, prints it (run with -s to see it) and holds
the floor. Run the script for per-row misses: ``benchmarks/corpus_agreement.py --misses``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from engine.feedback import parse_report
from tests.conftest import shared_corpus

REPO = Path(__file__).resolve().parent.parent


def _bench() -> ModuleType:
    """benchmarks/ is not a package: load the script by path (dataclasses need it in sys.modules)."""
    name = "_corpus_agreement"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "corpus_agreement.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def agreement():  # type: ignore[no-untyped-def]
    corpus = shared_corpus("sisimai")
    bench = _bench()
    agg = bench.compute(corpus)
    print("\n" + bench.format_table(agg))
    return agg


def test_every_sisimai_reason_has_a_mapping() -> None:
    import json

    corpus = shared_corpus("sisimai")
    bench = _bench()
    reasons = {r["reason"] for s in json.loads((corpus / "expected.json").read_text())["samples"].values() for r in s["rows"]}
    assert reasons <= set(bench.REASON_MAP)


def test_recipients_found(agreement) -> None:  # type: ignore[no-untyped-def]
    # measured 97.5% (652/669); the misses are Sisimai reading addresses we do not
    # see in the message (a truncated address, a recipient only in the original's headers)
    assert agreement.recipients.pct >= 97.0


def test_hard_soft_agreement(agreement) -> None:  # type: ignore[no-untyped-def]
    # A permanent "user unknown" that the bounce shows was given after DATA is
    # policy and soft for us too (a content filter said it, not the recipient
    # lookup). Sisimai goes further: "user unknown" wording at an unknown stage
    # without an X.1.1 code is "filtered" (soft) for it; we keep those hard, since
    # turning them soft costs more agreement on its own "userunknown" rows than it
    # gains (measured: +29 / -32 rows). Measured 92.8% overall (576/621), 97.0%
    # outside Sisimai's "filtered" rows; 95% overall is out of reach without that.
    assert agreement.hard_soft_no_filtered.pct >= 96.5
    assert agreement.hard_soft.pct >= 92.5
    assert agreement.per_reason["filtered"]["hard_soft"].pct >= 40.0  # was 12% before stage detection


def test_status_and_category_agreement(agreement) -> None:  # type: ignore[no-untyped-def]
    assert agreement.status.pct >= 97.5  # measured 98.1%
    assert agreement.category.pct >= 91.0  # measured 91.7%


def test_not_bounces_are_not_reported_as_bounces(agreement) -> None:  # type: ignore[no-untyped-def]
    assert agreement.not_bounces["not/is-not-bounce-01.eml"] == "unknown"
    assert agreement.not_bounces["not/is-not-bounce-02.eml"] == "unknown"


def test_no_sample_is_an_error() -> None:
    corpus = shared_corpus("sisimai")
    kinds = {p.name: parse_report(p.read_bytes()).kind for p in sorted((corpus / "samples").rglob("*.eml"))}
    assert len(kinds) >= 629
    assert [n for n, k in kinds.items() if k == "error"] == []
