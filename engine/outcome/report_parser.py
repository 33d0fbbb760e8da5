"""Parsing inbound reports in worker processes: off the event loop, and off its GIL.

A report within every limit of the listener can still take seconds of CPU to parse
(20,000 MIME parts in 740 kB: 2.6 s). In a thread that CPU is the loop's too: the
parser holds the GIL, and the loop waits for it at every switch, so four such
messages stalled ``/healthz`` for 2.4 s. :class:`ReportParser` sends each message to
a small pool of ``spawn`` processes (``[feedback.inbound] parse_concurrency`` of them,
started on first use, each loading the classifier rules once) and bounds how many
wait at once. A worker that dies (a parser crash, the OOM killer) costs that one
message a ``kind="error"`` report; the next message gets a fresh pool.

The worker side (:func:`_init_worker`, :func:`_parse`) imports only the parser, so a
worker starts in a fraction of a second and never holds a listener socket (``spawn``
passes no descriptors but its own pipes).
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import structlog

from engine.feedback.classify import Classifier, load_rules
from engine.feedback.report import Report, parse_report

log = structlog.get_logger(__name__)

_classifier: Classifier | None = None
"""The worker process's classifier, loaded once by :func:`_init_worker`."""


def _init_worker(rule_files: Sequence[str]) -> None:
    global _classifier
    _classifier = load_rules(rule_files)


def _parse(raw: bytes) -> Report:
    return parse_report(raw, _classifier)


class ReportParser:
    """``await parse(raw)``: :func:`engine.feedback.report.parse_report` in a bounded process pool."""

    def __init__(self, workers: int, rule_files: Sequence[str | Path] = ()) -> None:
        self._workers = workers
        self._rule_files = [str(p) for p in rule_files]
        self._slots = asyncio.Semaphore(workers)
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self._workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self._rule_files,),
            )
        return self._pool

    async def parse(self, raw: bytes) -> Report:
        """The parsed report; never raises on input (a dead worker gives ``kind="error"``)."""
        async with self._slots:
            pool = self._executor()
            try:
                return await asyncio.get_running_loop().run_in_executor(pool, _parse, raw)
            except BrokenProcessPool:
                log.warning("inbound_parser_process_died", size=len(raw))
                if self._pool is pool:
                    self._pool = None
                    pool.shutdown(wait=False, cancel_futures=True)
                return Report(kind="error", error="the parser process died on this message")

    def close(self) -> None:
        """Stop the worker processes (a parse under way is abandoned: its message was not answered)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
