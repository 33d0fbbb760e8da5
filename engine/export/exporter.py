"""The exporter: the only writer of ``export_state`` and ``export_batches``.

Each pass takes the destination's lease, fixes where the batch ends (recorded as *pending*
before any file is written), reads the batch in commit order (COPY, parsed by pyarrow; a large
batch in two halves by two backends, and the next batch read ahead while a backlog lasts),
writes one file per (event type, date, hour) named ``<first id>-<last id>``, a manifest, and
optionally the daily facts of the dates it touched, and only then moves the cursor. A crash
anywhere before that last step leaves the pending batch, which the next pass (this process or
another) writes again with the same boundaries, so the same names: nothing is lost, nothing is
written twice under two names. A destination that is down delays the export (logged, kept in
``export_state.last_error``) and never touches delivery: the exporter has its own pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import os
import socket
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import asyncpg
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import structlog

from engine.config import Settings
from engine.db.pool import acquire
from engine.db.queries import q
from engine.events.public import PUBLIC_TYPES
from engine.export.columns import FACTS_SCHEMA, READ, READ_TYPES, TS, schema_for
from engine.export.destinations import Destination, destination

log = structlog.get_logger(__name__)

TYPES = sorted(PUBLIC_TYPES)
# A batch of at least twice this many events is read in two halves by two backends at once.
SPLIT_AT = 5_000
# Columns whose values (nearly) never repeat within a file: no dictionary encoding.
UNIQUE_COLUMNS = frozenset({"event_id", "occurred_at", "message_id", "recipient_id", "contact_id", "external", "reply",
                            "next_attempt_at", "address_hash"})


Bound = tuple[int, int]


@dataclass
class Ahead:
    """The next batch, planned and read while the current one is written (a backlog only).

    A planned range lies below the snapshot's xmin, so no event can still join it: the range
    read ahead is exactly what the next pass would read, and it is used only when the next
    pass starts where it starts (and ends where any pending batch ends).
    """

    start: Bound
    task: asyncio.Task[tuple[Bound, pa.Table] | None]


@dataclass
class Batch:
    start: tuple[int, int]
    end: tuple[int, int]
    events: int = 0
    files: list[dict[str, Any]] = field(default_factory=list)
    manifest: str = ""
    first_at: datetime | None = None
    last_at: datetime | None = None


def _csv_to_table(data: bytes) -> pa.Table:
    return _with_partition(pacsv.read_csv(
        io.BytesIO(data),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types={n: t for n, t in READ}, strings_can_be_null=True, quoted_strings_can_be_null=False,
            null_values=[""], true_values=["t"], false_values=["f"],
        ),
        read_options=pacsv.ReadOptions(block_size=16 << 20),
    ))


_US_PER_DAY, _US_PER_HOUR = 86_400_000_000, 3_600_000_000


def _with_partition(table: pa.Table) -> pa.Table:
    """Add each event's UTC ``date`` (YYYY-MM-DD) and ``hour``, from ``occurred_us``.

    Whole-number arithmetic and one string per distinct day: formatting every row (SQL's
    to_char, or pyarrow's strftime at 1.6 us per event) costs more than the rest of the row.
    """
    us = table.column("occurred_us")
    days = pc.divide(us, _US_PER_DAY)  # integer division; event times are after 1970
    distinct = pc.unique(days)
    names = pa.array([date.fromordinal(_EPOCH_ORDINAL + d).isoformat() for d in distinct.to_pylist()], pa.string())
    day = pc.take(names, pc.index_in(days, value_set=distinct))
    hour = pc.cast(pc.subtract(pc.divide(us, _US_PER_HOUR), pc.multiply(days, 24)), pa.int32())
    return table.append_column("date", day).append_column("hour", hour)


_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


_PARTITION_KEYS = ("kind", "date", "hour")


def _runs(table: pa.Table) -> list[int]:
    """Where each run of equal (kind, date, hour) starts, and the end: [0, ..., num_rows]."""
    n = table.num_rows
    if n == 0:
        return [0]
    change = None
    for name in _PARTITION_KEYS:
        col = table.column(name)
        diff = pc.not_equal(col.slice(1), col.slice(0, n - 1))
        change = diff if change is None else pc.or_(change, diff)
    assert change is not None
    return [0, *(i + 1 for i in pc.indices_nonzero(change).to_pylist()), n]


def _partitions(table: pa.Table) -> list[tuple[str, str, int, pa.Table]]:
    """The batch split by (event type, date, hour), in key order, each part in stream order.

    One stable sort and one pass over the batch (none when it holds a single partition, as a
    backlog of one event type mostly does), not one filter over the whole batch per partition.
    """
    runs = _runs(table)
    if len(runs) > 2:
        table = table.take(pc.sort_indices(table, sort_keys=[(k, "ascending") for k in _PARTITION_KEYS]))  # stable
        runs = _runs(table)
    out = []
    for a, b in zip(runs, runs[1:], strict=False):
        part = table.slice(a, b - a)
        kind, day, hour = (part.column(k)[0].as_py() for k in _PARTITION_KEYS)
        out.append((kind, day, hour, part))
    return out


def _encode(table: pa.Table, fmt: str) -> bytes:
    if fmt == "ndjson":
        lines = [orjson.dumps(r, default=str) for r in table.to_pylist()]
        return gzip.compress(b"\n".join(lines) + b"\n", compresslevel=5)
    sink = pa.BufferOutputStream()
    # Dictionary pages only where values repeat: building one for ids and timestamps costs time
    # and is thrown away when it overflows (0.45 against 0.76 us per event, and smaller files).
    pq.write_table(table, sink, compression="zstd",
                   use_dictionary=[n for n in table.column_names if n not in UNIQUE_COLUMNS])
    return bytes(sink.getvalue().to_pybytes())


class Exporter:
    def __init__(
        self, settings: Settings, pool: asyncpg.Pool, *, dest: Destination | None = None, owner: str | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = settings.export
        self.pool = pool
        self.dest = dest or destination(settings)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:export"
        self.ext = "ndjson.gz" if self.cfg.format == "ndjson" else "parquet"
        self.ahead: Ahead | None = None

    async def close(self) -> None:
        """Drop the batch being read ahead (its range stays in the stream: nothing is lost)."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            ahead.task.cancel()
            await asyncio.gather(ahead.task, return_exceptions=True)

    # -- the loop -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Export every ``interval`` (at once again while a full batch came back), until ``stop``."""
        try:
            while not stop.is_set():
                full = False
                try:
                    batch = await self.export_once()
                    full = batch is not None and batch.events >= self.cfg.batch_events
                except Exception as exc:  # the store is down, the database is away: try again later
                    log.warning("export_failed", destination=self.dest.name, error=str(exc)[:500])
                if not full:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=self.cfg.interval)
        finally:
            await self.close()

    async def export_once(self) -> Batch | None:
        """One batch (or nothing new). Raises when the destination fails; the batch stays pending.

        While a backlog lasts (the batch is full), the next batch is planned and read in the
        background as soon as this one's read is done: Postgres works on batch N+1 while this
        process writes batch N (two cores instead of one, taking turns).
        """
        name = self.dest.name
        ahead, self.ahead = self.ahead, None
        read_ahead: tuple[Bound, pa.Table] | None = None
        async with acquire(self.pool) as conn:
            await conn.execute(*q("export_init", destination=name))
            row = await conn.fetchrow(
                *q("export_lease", destination=name, owner=self.owner, lease_seconds=self.cfg.lease)
            )
            if row is None:
                if ahead is not None:
                    ahead.task.cancel()
                return None  # another exporter holds it
            start = (row["tx"], row["event_id"])
            if ahead is not None and ahead.start == start:
                with contextlib.suppress(Exception):  # a failed read-ahead: read again below
                    read_ahead = await ahead.task
            elif ahead is not None:
                ahead.task.cancel()  # another exporter moved the cursor meanwhile
            end: Bound | None
            if row["pending_tx"] is not None:
                end = (row["pending_tx"], row["pending_event_id"])
            elif read_ahead is not None:
                end = read_ahead[0]
            else:
                end = await self._plan(conn, start)
                if end is None:
                    await conn.execute(*q("export_release", destination=name, owner=self.owner, error=None))
                    return None
            if row["pending_tx"] is None:
                await conn.execute(*q("export_set_pending", destination=name, owner=self.owner, tx=str(end[0]), id=end[1]))
        try:
            if read_ahead is not None and read_ahead[0] == end:
                table = read_ahead[1]
            else:
                table = await self.read(start, end)
            del read_ahead
            if table.num_rows >= self.cfg.batch_events:
                self.ahead = Ahead(end, asyncio.create_task(self._read_next(end)))
            batch = await self.write_batch(start, end, table)
        except Exception as exc:
            await self.close()  # the cursor stays: the next pass starts here again
            async with acquire(self.pool) as conn:
                await conn.execute(*q("export_release", destination=name, owner=self.owner, error=str(exc)[:1000]))
            raise
        async with acquire(self.pool) as conn:
            await conn.execute(
                *q(
                    "export_commit", destination=name, owner=self.owner, events=batch.events,
                    last_file=batch.files[-1]["path"] if batch.files else None,
                    start_tx=str(start[0]), start_id=start[1], end_tx=str(end[0]), end_id=end[1],
                    first_at=batch.first_at, last_at=batch.last_at, manifest=batch.manifest,
                )
            )
        log.info("export_batch_written", destination=name, events=batch.events, files=len(batch.files))
        return batch

    async def _plan(self, conn: asyncpg.Connection, start: Bound) -> Bound | None:
        plan = await conn.fetchrow(*q("export_plan", tx=str(start[0]), id=start[1], limit=self.cfg.batch_events))
        return None if plan is None else (plan["tx"], plan["id"])

    async def _read_next(self, start: Bound) -> tuple[Bound, pa.Table] | None:
        async with acquire(self.pool) as conn:
            end = await self._plan(conn, start)
        return None if end is None else (end, await self.read(start, end))

    # -- one batch ----------------------------------------------------------------------------

    async def read(self, start: Bound, end: Bound) -> pa.Table:
        """The batch (start, end], in stream order; a large one in two halves read at once.

        Postgres's side of the read (the joins, the JSON fields) is about two thirds of the
        export's CPU: one backend alone would cap the rate at what one core can do, so a batch
        of more than ``SPLIT_AT`` events is read by two backends, one half each.
        """
        mid: Bound | None = None
        half = self.cfg.batch_events // 2
        if half >= SPLIT_AT:
            async with acquire(self.pool) as conn:
                row = await conn.fetchrow(*q("export_split", start_tx=str(start[0]), start_id=start[1],
                                             end_tx=str(end[0]), end_id=end[1], half=half))
            if row is not None and (row["tx"], row["id"]) < end:
                mid = (row["tx"], row["id"])
        if mid is None:
            return await self._read_range(start, end)
        tasks = [asyncio.create_task(self._read_range(start, mid)), asyncio.create_task(self._read_range(mid, end))]
        try:
            first, second = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return pa.concat_tables([first, second])

    async def _read_range(self, start: Bound, end: Bound) -> pa.Table:
        sql, *args = q("export_events", start_tx=str(start[0]), start_id=start[1], end_tx=str(end[0]), end_id=end[1],
                       types=TYPES)
        chunks: list[bytes] = []

        async def sink(data: bytes) -> None:
            # A coroutine, not a file: asyncpg hands a file's write() to the thread pool once per
            # chunk received (3 us of this process's CPU per event, against 0.8 this way).
            chunks.append(data)

        async with acquire(self.pool) as conn, conn.transaction():
            await conn.execute(*q("export_session"))
            await conn.copy_from_query(sql, *args, output=sink, format="csv", header=True)
        data = b"".join(chunks)
        del chunks[:]
        return await asyncio.to_thread(_csv_to_table, data)

    async def write_batch(self, start: Bound, end: Bound, table: pa.Table | None = None) -> Batch:
        if table is None:
            table = await self.read(start, end)
        batch = Batch(start, end, events=table.num_rows)
        if table.num_rows:
            await asyncio.to_thread(self._write_files, table, batch)
            if self.cfg.facts:
                for day in sorted(set(table.column("date").to_pylist())):
                    await self.write_facts(date.fromisoformat(day), batch)
            manifest = {
                "start": {"tx": start[0], "event_id": start[1]}, "end": {"tx": end[0], "event_id": end[1]},
                "events": batch.events, "min_event_id": batch.files[0]["min_event_id"] if batch.files else None,
                "files": batch.files, "format": self.cfg.format, "written_at": datetime.now(UTC).isoformat(),
            }
            ids = table.column("event_id")
            batch.manifest = f"_manifests/{pc.min(ids).as_py()}-{pc.max(ids).as_py()}.json"
            await asyncio.to_thread(self.dest.write, batch.manifest, orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
            await asyncio.to_thread(self.dest.sync)  # every file and name durable before the cursor moves
        return batch

    def _write_files(self, table: pa.Table, batch: Batch) -> None:
        occurred = pc.cast(table.column("occurred_us"), pa.timestamp("us")).cast(TS)
        batch.first_at = pc.min(occurred).as_py()
        batch.last_at = pc.max(occurred).as_py()
        for kind, day, hour, part in _partitions(table):
            public = PUBLIC_TYPES[kind]
            schema = schema_for(kind)
            cols: dict[str, pa.Array] = {
                "event_id": part.column("event_id"),
                "event_type": pa.repeat(pa.scalar(public, pa.string()), part.num_rows),
                "occurred_at": pc.cast(part.column("occurred_us"), pa.timestamp("us")).cast(TS),
            }
            for f in schema:
                if f.name not in cols:
                    cols[f.name] = part.column(f.name).cast(READ_TYPES[f.name])
            out = pa.Table.from_pydict(cols, schema=schema)
            ids = part.column("event_id")
            lo, hi = pc.min(ids).as_py(), pc.max(ids).as_py()
            rel = f"event_type={public}/date={day}/hour={hour:02d}/{lo}-{hi}.{self.ext}"
            data = _encode(out, self.cfg.format)
            self.dest.write(rel, data)
            batch.files.append({
                "path": rel, "rows": out.num_rows, "min_event_id": lo, "max_event_id": hi,
                "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            })

    async def write_facts(self, day: date, batch: Batch) -> None:
        async with acquire(self.pool) as conn:
            rows = await conn.fetch(*q("export_facts", day=day))
        cols: dict[str, list[Any]] = {f.name: [] for f in FACTS_SCHEMA}
        for r in rows:
            cols["date"].append(day.isoformat())
            for name in FACTS_SCHEMA.names[1:]:
                cols[name].append(r[name])
        table = pa.Table.from_pydict(cols, schema=FACTS_SCHEMA)
        rel = f"facts/date={day.isoformat()}/facts.{self.ext}"
        data = _encode(table, self.cfg.format)
        await asyncio.to_thread(self.dest.write, rel, data)
        batch.files.append({"path": rel, "rows": table.num_rows, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})

    # -- operations ---------------------------------------------------------------------------

    async def backfill(self, since: datetime) -> tuple[int, int]:
        """Write again every stored batch that ends at or after ``since``, under the same names.

        Returns (batches rewritten, batches skipped). A batch some of whose events were purged
        since (retention) is skipped: rewriting it would replace complete files with partial ones.
        """
        async with acquire(self.pool) as conn:
            batches = await conn.fetch(*q("export_batches_since", destination=self.dest.name, since=since))
        done = skipped = 0
        for b in batches:
            start, end = (b["start_tx"], b["start_event_id"]), (b["end_tx"], b["end_event_id"])
            async with acquire(self.pool) as conn:
                n = await conn.fetchval(*q("export_count", start_tx=str(start[0]), start_id=start[1], end_tx=str(end[0]),
                                           end_id=end[1], types=TYPES))
            if n != b["events"]:
                log.warning("export_backfill_skipped", manifest=b["manifest"], stored=b["events"], now=n)
                skipped += 1
                continue
            await self.write_batch(start, end)
            done += 1
        return done, skipped


async def status(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    async with acquire(pool) as conn:
        return [dict(r) for r in await conn.fetch(*q("export_status"))]
