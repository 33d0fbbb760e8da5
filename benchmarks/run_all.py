"""`make bench`: run every benchmark in turn; each prints its figures and its command."""

from __future__ import annotations

import importlib
import subprocess
import sys

BENCHMARKS = ["benchmarks.bench_submit", "benchmarks.bench_dkim", "benchmarks.bench_compose", "benchmarks.bench_e2e", "benchmarks.bench_isolation", "benchmarks.bench_shaping", "benchmarks.bench_webhooks", "benchmarks.bench_retention", "benchmarks.bench_consent"]


def main() -> int:
    rc = 0
    for name in BENCHMARKS:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            print(f"skipping {name}: {exc}")
            continue
        print(f"== {name}")
        rc |= subprocess.call([sys.executable, "-m", name])
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
