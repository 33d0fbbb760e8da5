"""Every Prometheus metric, defined once; incremented by the stage that knows the fact.

``engine run`` is one listener process plus N delivery worker processes, so counters live in
prometheus_client's multiprocess mode: each process writes its values to memory-mapped files
under ``$ENGINE_HOME/metrics`` and ``/metrics`` (in the listener process) sums them. The mode
must be chosen before the first metric object exists, which is why the metrics are built by
:func:`init` (called once per process at startup) rather than at import; code that runs
without ``init`` (unit tests, one-shot commands) gets single-process metrics on first use.

What the database already knows (queue depth, oldest message, warm-up steps, automation
decisions, complaint rates, webhook backlogs and lag) is read at scrape time by
:mod:`engine.api.metrics` rather than counted here: those numbers are right across every
process and host with no bookkeeping. Labels are bounded: providers (shaping names, or
``other``), egress sources, streams, reasons; never domains or addresses.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from prometheus_client import values
from prometheus_client.metrics import Counter, Gauge, Histogram

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The engine's metrics (one instance per process)."""

    def __init__(self) -> None:
        self.received = Counter(
            "engine_messages_received", "Messages accepted (committed), by submission door.", ["source"],
        )
        self.recipients_received = Counter(
            "engine_recipients_received", "Recipients accepted, by submission door and initial state.", ["source", "state"],
        )
        self.submit_latency = Histogram(
            "engine_submit_latency_seconds", "Time from a submission's arrival to its commit.", ["source"],
            buckets=_LATENCY_BUCKETS,
        )
        self.delivered = Counter(
            "engine_messages_delivered", "Recipients delivered, by provider and egress source.", ["provider", "egress", "stream"],
        )
        self.transfail = Counter(
            "engine_messages_transfail", "Transient failures (deferrals), by provider and egress source.",
            ["provider", "egress", "stream"],
        )
        self.failed = Counter(
            "engine_messages_fail", "Permanent failures (bounces, expiries), by provider, egress and category.",
            ["provider", "egress", "stream", "category"],
        )
        self.connections = Gauge(
            "engine_connections_open", "SMTP connections open, by provider.", ["provider"], multiprocess_mode="livesum",
        )
        self.throttle_waits = Counter(
            "engine_throttle_waits", "Times a delivery waited for a shaping token or connection slot, by provider.",
            ["provider"],
        )
        self.suppressions_added = Counter(
            "engine_suppressions_added", "Suppression rows added, by reason.", ["reason"],
        )
        self.consent_changes = Counter(
            "engine_consent_changes", "Consent records applied, by purpose and new status.", ["purpose", "status"],
        )
        self.webhook_requests = Counter(
            "engine_webhook_requests", "Webhook requests sent, by outcome (ok, failed, gone).", ["outcome"],
        )
        self.webhook_events = Counter(
            "engine_webhook_events", "Events delivered to webhook endpoints (2xx).", [],
        )
        self.auth_failures = Counter(
            "engine_auth_failures", "Failed authentications, by door (http, smtp).", ["door"],
        )


_metrics: Metrics | None = None
_dir: str | None = None


def init(home: Path | None, *, fresh: bool = False) -> Metrics:
    """Choose the mode and build the metrics. ``home`` set: multiprocess under ``home/metrics``.

    ``fresh``: wipe the directory first (the supervising process at startup, before any worker).
    Worker processes inherit the directory through the environment and call this with ``fresh=False``.
    """
    global _metrics, _dir
    if _metrics is not None:
        return _metrics
    if home is not None:
        path = (home / "metrics").resolve()
        if fresh and path.exists():
            shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True, exist_ok=True)
        # prometheus_client reads the directory from the environment when it opens a value file,
        # and child processes inherit it from here.
        os.environ[MULTIPROC_ENV] = _dir = str(path)
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _metrics = Metrics()
    return _metrics


def get() -> Metrics:
    """The metrics of this process (single-process ones if :func:`init` was never called)."""
    return _metrics if _metrics is not None else init(None)


def multiprocess_dir() -> str | None:
    """The directory the processes' value files are in; None in single-process mode."""
    return _dir


def mark_dead(pid: int) -> None:
    """A worker exited: its live gauges (open connections) stop counting."""
    d = multiprocess_dir()
    if d:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, d)  # type: ignore[no-untyped-call]


def provider_label(provider: str) -> str:
    return provider or "other"


def inc(counter: Any, amount: float = 1.0, **labels: str) -> None:
    """Increment, never raising into the caller's work (a metrics bug must not stop mail)."""
    try:
        (counter.labels(**labels) if labels else counter).inc(amount)
    except Exception:  # pragma: no cover - defensive
        pass
