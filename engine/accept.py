"""Acceptance: the one door every message passes to enter the outbox.

Both the SMTP relay and the REST API end here. This module turns validated
input into outbox rows (deduplicating recipients, picking stream and priority),
applies idempotency, and makes the single enqueue call. It never renders or
delivers: "accepted" means committed in Postgres, nothing more.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import structlog

from engine import metrics
from engine.addresses import normalize_domain, split_address
from engine.apikeys import ApiKey
from engine.compose.mime import Attachment, InlineImage, Mailbox, MessageContent, check_submission
from engine.compose.mime_policy import MimeError
from engine.compose.render import Renderer, TemplateError
from engine.compose.stored import StoredAttachment, StoredContent, StoredImage, pin_template
from engine.config import Settings
from engine.db.pool import acquire
from engine.db.queries import q
from engine.errors import DatabaseUnavailable, EngineError, ValidationFailed
from engine.ids import uuid7
from engine.outbox import EnqueuedRecipient, NewMessage, NewRecipient, Outbox
from engine.submit.identity import extract_identity
from engine.submit.models import AddressIn, MessageIn, as_mailbox
from engine.suppression import Suppressions
from engine.templates_db import DbTemplateStore

log = structlog.get_logger(__name__)

IDEMPOTENCY_KEY_MAX = 255


class IdempotencyConflict(EngineError):
    """The Idempotency-Key was used before with a different request body."""


SLICE_RECIPIENTS = 5000
"""A request with more recipients than this is built and enqueued in slices of about this many
(in one transaction): its memory is bounded by the slice, not by the request."""


@dataclass(frozen=True, slots=True)
class Accepted:
    status: int
    body: bytes
    """The answer, serialised JSON (a large batch's is built slice by slice, never as Python objects)."""
    replayed: bool = False


def _mentions(item: MessageIn) -> int:
    """Recipients a message names before deduplication: an upper bound of its rows, known without building."""
    if item.envelope is not None:
        return len(item.envelope.rcpt_to)
    return len(item.to) + len(item.cc) + len(item.bcc)


class _Answer:
    """The answer of a large batch, appended as JSON bytes slice by slice (about 65 bytes a
    recipient instead of ~300 as dicts), with the counts the metrics need."""

    def __init__(self) -> None:
        self.json = bytearray(b'{"messages":[')
        self.messages: dict[str, int] = {}
        self.states: dict[tuple[str, str], int] = {}
        self._open = False

    def add(self, msg: NewMessage, rows: Sequence[EnqueuedRecipient], first: bool) -> None:
        if first:
            if self._open:
                self.json += b"]},"
            self.json += b'{"id":"%s","recipients":[' % str(msg.id).encode()
            self._open = True
            self.messages[msg.source] = self.messages.get(msg.source, 0) + 1
        elif rows:
            self.json += b","
        self.json += orjson.dumps([{"id": r.id, "email": r.address, "state": r.state} for r in rows])[1:-1]
        for r in rows:
            self.states[(msg.source, r.state)] = self.states.get((msg.source, r.state), 0) + 1

    def finish(self) -> bytes:
        self.json += b"]}]}" if self._open else b"]}"
        return bytes(self.json)

    def observe(self, t0: float) -> None:
        """Count what was committed (call after the commit)."""
        m = metrics.get()
        took = time.perf_counter() - t0
        for source, n in self.messages.items():
            metrics.inc(m.received, n, source=source)
            for _ in range(n):
                m.submit_latency.labels(source=source).observe(took)
        for (source, state), n in self.states.items():
            metrics.inc(m.recipients_received, n, source=source, state=state)


def _stored_mailbox(value: AddressIn) -> Mailbox:
    mb = as_mailbox(value)
    return Mailbox(mb.email, mb.name)


def _recipient(
    address: str, kind: str, vars_: dict[str, Any] | None = None, *, validated: bool = False,
    contact_id: str | None = None, external: dict[str, Any] | None = None,
) -> NewRecipient:
    """An outbox row for ``address``; ``validated``: the schema already checked it, just split."""
    if validated:
        local, _, domain = address.rpartition("@")
    else:
        local, domain = split_address(address)
    domain = normalize_domain(domain)
    return NewRecipient(
        address=f"{local}@{domain}", domain=domain, kind=kind, vars=vars_, contact_id=contact_id, external=external
    )


def envelope_recipient(address: str) -> NewRecipient:
    """An outbox row for an envelope address we must validate (raises ValueError when it is not one)."""
    return _recipient(address, "envelope")


async def enqueue_notifications(conn: asyncpg.Connection, outbox: Outbox, messages: Sequence[NewMessage]) -> None:
    """Mail the engine writes itself (DSNs back to relay senders) enters the queue by the same door.

    Called inside the outcome writer's transaction: the failure and the notice about it
    commit together. Suppression applies to these recipients like to any other.
    """
    if not messages:
        return
    await outbox.enqueue(messages, conn=conn, suppress=True)


def _dedupe(recipients: list[NewRecipient]) -> list[NewRecipient]:
    """One row per address per message: the first mention (to before cc before bcc) wins."""
    seen: set[str] = set()
    out = []
    for r in recipients:
        if r.address not in seen:
            seen.add(r.address)
            out.append(r)
    return out


def _observe(messages: Sequence[NewMessage], rows: Sequence[Sequence[EnqueuedRecipient]], t0: float) -> None:
    """Count what was committed (after the commit: a rolled-back batch counts nothing)."""
    m = metrics.get()
    took = time.perf_counter() - t0
    states: dict[tuple[str, str], int] = {}
    for msg, rs in zip(messages, rows):
        metrics.inc(m.received, source=msg.source)
        m.submit_latency.labels(source=msg.source).observe(took)
        for r in rs:
            states[(msg.source, r.state)] = states.get((msg.source, r.state), 0) + 1
    for (source, state), n in states.items():
        metrics.inc(m.recipients_received, n, source=source, state=state)


class GroupCommitter:
    """Coalesce concurrent commits into one transaction, like a database's group commit.

    Twenty SMTP sessions each committing one message would cost twenty
    transactions and ~100 round trips; while one commit is in flight, the
    others queue and the next transaction takes them all. A lone caller waits
    for nothing extra. None is told "accepted" without a commit.

    One caller can never fail another: when the shared transaction fails, the
    batch is split in halves and each half retried in its own transaction, down
    to the member that fails alone and gets its error (one culprit among N costs
    about 2*log2(N) extra transactions, and only when something failed). A
    database outage (:class:`DatabaseUnavailable`) is not split: everyone in the
    batch gets it at once and answers "try later".
    """

    def __init__(
        self, commit: Callable[[Sequence[NewMessage]], Awaitable[list[list[EnqueuedRecipient]]]], max_messages: int = 1000
    ) -> None:
        self._commit = commit
        self._max = max_messages
        self._waiting: list[tuple[Sequence[NewMessage], asyncio.Future[list[list[EnqueuedRecipient]]]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, messages: Sequence[NewMessage]) -> list[list[EnqueuedRecipient]]:
        fut: asyncio.Future[list[list[EnqueuedRecipient]]] = asyncio.get_running_loop().create_future()
        self._waiting.append((messages, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="group-commit")
        return await asyncio.shield(fut)

    async def _drain(self) -> None:
        while self._waiting:
            batch: list[tuple[Sequence[NewMessage], asyncio.Future[list[list[EnqueuedRecipient]]]]] = []
            count = 0
            while self._waiting and (not batch or count + len(self._waiting[0][0]) <= self._max):
                item = self._waiting.pop(0)
                batch.append(item)
                count += len(item[0])
            await self._commit_batch(batch)

    async def _commit_batch(
        self, batch: list[tuple[Sequence[NewMessage], asyncio.Future[list[list[EnqueuedRecipient]]]]]
    ) -> None:
        """Commit ``batch`` in one transaction; on failure, bisect so only the failing member fails."""
        messages = [m for ms, _ in batch for m in ms]
        try:
            rows = await self._commit(messages)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiters it concerns
            if len(batch) > 1 and isinstance(exc, Exception) and not isinstance(exc, DatabaseUnavailable):
                log.warning("group_commit_split", members=len(batch), error=f"{type(exc).__name__}: {exc}")
                half = len(batch) // 2
                await self._commit_batch(batch[:half])
                await self._commit_batch(batch[half:])
                return
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        i = 0
        for ms, fut in batch:
            if not fut.done():
                fut.set_result(rows[i : i + len(ms)])
            i += len(ms)


class Acceptor:
    def __init__(
        self,
        settings: Settings,
        outbox: Outbox,
        *,
        renderer: Renderer | None = None,
        templates: DbTemplateStore | None = None,
        suppressions: Suppressions | None = None,
    ) -> None:
        self.settings = settings
        self.outbox = outbox
        self.renderer = renderer
        self.templates = templates
        self.suppressions = suppressions
        self._group = GroupCommitter(self._commit_now)

    # -- building rows -------------------------------------------------------------------

    def _stream(self, stream: str | None, default: str, field: str) -> tuple[str, int]:
        name = stream or default
        if name not in self.settings.queue.streams:
            known = ", ".join(sorted(self.settings.queue.streams))
            raise ValidationFailed(f"unknown stream {name!r}; configured streams: {known}", field)
        return name, self.settings.stream_priority(name)

    def _check_composable(self, item: MessageIn, stream: str, prefix: str) -> None:
        """Run compose's own field checks now (one validator), so what is accepted never bounces 5.6.0 for them.

        Bodies stay empty: only names, types and header-bound values are checked
        here. A template's subject is rendered (and made one line) later.
        """
        assert item.from_ is not None
        try:
            check_submission(
                MessageContent(
                    sender=_stored_mailbox(item.from_),
                    to=[_stored_mailbox(a) for a in item.to],
                    cc=[_stored_mailbox(a) for a in item.cc],
                    reply_to=[_stored_mailbox(item.reply_to)] if item.reply_to is not None else (),
                    subject=item.subject or "",
                    text=item.text,
                    html=item.html if item.template is None else (item.html or ""),
                    headers=item.headers,
                    stream=stream,
                    inline_images=[InlineImage(i.content_id, i.content_type, b"", i.filename) for i in item.inline_images],
                    attachments=[Attachment(a.filename, a.content_type, b"") for a in item.attachments],
                ),
                self.settings.mime,
                bcc=[_stored_mailbox(a) for a in item.bcc],
            )
        except MimeError as exc:
            field = (exc.field or "").replace(".mime_type", ".content_type").replace("reply_to[0]", "reply_to")
            raise ValidationFailed(exc.message.replace(exc.field or "\0", field), f"{prefix}{field}") from None

    def build_http_message(self, item: MessageIn, key: ApiKey, prefix: str = "") -> NewMessage:
        """Turn one validated REST message into outbox rows (no I/O)."""
        stream, priority = self._stream(item.stream, self.settings.queue.default_stream, f"{prefix}stream")
        if item.raw is not None:
            assert item.envelope is not None  # guaranteed by MessageIn
            raw_bytes, contact_id, external = extract_identity(item.raw.encode("utf-8"))
            recipients = _dedupe(
                [_recipient(a, "envelope", contact_id=contact_id, external=external) for a in item.envelope.rcpt_to]
            )
            mail_from = item.envelope.mail_from
            raw: bytes | None = raw_bytes
            content: dict[str, Any] | None = None
        else:
            recipients = _dedupe(
                [
                    _recipient(mb.email, kind, mb.vars, validated=True, contact_id=mb.contact_id, external=mb.external)
                    for kind, group in (("to", item.to), ("cc", item.cc), ("bcc", item.bcc))
                    for mb in map(as_mailbox, group)
                ]
            )
            assert item.from_ is not None
            mail_from = as_mailbox(item.from_).email
            raw = None
            content = StoredContent(
                sender=_stored_mailbox(item.from_),
                to=[_stored_mailbox(a) for a in item.to],
                cc=[_stored_mailbox(a) for a in item.cc],
                subject=item.subject,
                text=item.text,
                html=item.html,
                headers=item.headers,
                template=item.template,
                vars=item.vars,
                inline_images=[StoredImage(i.content_id, i.content_type, i.content, i.filename) for i in item.inline_images]
                if item.inline_images else [],
                attachments=[StoredAttachment(a.filename, a.content_type, a.content) for a in item.attachments]
                if item.attachments else [],
                reply_to=_stored_mailbox(item.reply_to) if item.reply_to is not None else None,
            ).to_json()
            self._check_composable(item, stream, prefix)
        if content is not None and stream in self.settings.mime.bulk_streams and not self.settings.tracking.keys:
            # Compose would bounce it later (bulk mail needs a one-click List-Unsubscribe, which needs a signing key).
            raise ValidationFailed(
                f"stream {stream!r} is bulk and needs a List-Unsubscribe, which needs [[tracking.keys]] "
                "(make one with `engine tracking keygen --id 1`)", f"{prefix}stream",
            )
        limit = self.settings.api.max_recipients_per_message
        if len(recipients) > limit:
            raise ValidationFailed(f"too many recipients: {len(recipients)} > {limit}", f"{prefix}to")
        return NewMessage(
            id=uuid7(),
            source="http",
            mail_from=mail_from,
            stream=stream,
            priority=priority,
            recipients=recipients,
            raw=raw,
            content=content,
            metadata=item.metadata,
            api_key_id=key.id,
            send_at=item.send_at,
        )

    def build_smtp_message(
        self, mail_from: str, rcpt_tos: Sequence[str], data: bytes, api_key_id: int | None, stream: str | None = None
    ) -> NewMessage:
        name, priority = self._stream(stream, self.settings.smtp.default_stream, "stream")
        data, contact_id, external = extract_identity(data)
        return NewMessage(
            id=uuid7(),
            source="smtp",
            mail_from=mail_from,
            stream=name,
            priority=priority,
            recipients=_dedupe([_recipient(a, "envelope", contact_id=contact_id, external=external) for a in rcpt_tos]),
            raw=data,
            api_key_id=api_key_id,
        )

    # -- committing ----------------------------------------------------------------------

    @staticmethod
    def _body(messages: Sequence[NewMessage], rows: Sequence[Sequence[EnqueuedRecipient]]) -> list[dict[str, Any]]:
        return [
            {"id": str(m.id), "recipients": [{"id": r.id, "email": r.address, "state": r.state} for r in rs]}
            for m, rs in zip(messages, rows)
        ]

    async def commit(self, messages: Sequence[NewMessage]) -> list[list[EnqueuedRecipient]]:
        """Durably enqueue; concurrent callers share one transaction (group commit)."""
        t0 = time.perf_counter()
        rows = await self._group.submit(messages)
        _observe(messages, rows, t0)
        return rows

    async def _commit_now(self, messages: Sequence[NewMessage]) -> list[list[EnqueuedRecipient]]:
        return await self.outbox.enqueue(messages, suppress=self.suppressions is not None)

    # -- policy: templates and suppressions ----------------------------------------------

    async def check_templates(
        self, items: Sequence[MessageIn], messages: Sequence[NewMessage], prefix: str, first: int = 0
    ) -> None:
        """Resolve and pin each message's template, and refuse missing variables (422).

        ``name`` is pinned to ``name@N`` (the latest upload now), so sending and
        click re-rendering later use this exact version. Compiled templates and
        their variable sets are cached by the Renderer: no re-parsing per message. ``first``:
        the index of ``items[0]`` in the request (for the field named in an error).
        """
        refs = [it.template for it in items if it.template]
        if not refs or self.renderer is None:
            return
        if self.templates is not None:
            await self.templates.prepare(refs)
        for i, (item, msg) in enumerate(zip(items, messages), start=first):
            if not item.template or msg.content is None:
                continue
            p = prefix.format(i)
            try:
                pinned = self.renderer.resolve(item.template)
                required = self.renderer.required_variables(pinned)
            except TemplateError as exc:
                raise ValidationFailed(exc.message, f"{p}template") from None
            pin_template(msg.content, pinned)
            self._check_vars(item, pinned, required, p)

    @staticmethod
    def _check_vars(item: MessageIn, pinned: str, required: set[str], p: str) -> None:
        missing = required - set(item.vars)
        if not missing:
            return
        # Each recipient row (first mention of an address wins, as in _dedupe) with its own vars.
        seen: set[str] = set()
        mentions: list[tuple[str, set[str]]] = []
        for group_name, group in (("to", item.to), ("cc", item.cc), ("bcc", item.bcc)):
            for idx, value in enumerate(group):
                mb = as_mailbox(value)
                address = _recipient(mb.email, group_name).address
                if address not in seen:
                    seen.add(address)
                    mentions.append((f"{group_name}[{idx}]", set(mb.vars or {})))
        for var in sorted(missing):
            lacking = [loc for loc, keys in mentions if var not in keys]
            if not lacking:
                continue
            if len(lacking) == len(mentions):
                raise ValidationFailed(
                    f"template {pinned!r} needs variable {var!r}: give it in vars (or in every recipient's vars)",
                    f"{p}vars.{var}",
                )
            raise ValidationFailed(
                f"template {pinned!r} needs variable {var!r}: recipient {lacking[0]} has no such var "
                "and the message's vars do not give it",
                f"{p}{lacking[0]}.vars.{var}",
            )

    async def accept_http(
        self,
        key: ApiKey,
        items: Sequence[MessageIn],
        *,
        batch: bool,
        idempotency_key: str | None,
        request_body: bytes,
    ) -> Accepted:
        """Validate everything, enqueue in one transaction, and answer; replays the first answer for a reused key.

        Every message is built (validated) before anything is written, so a bad field is a
        422 naming it and nothing is half-accepted. Up to :data:`SLICE_RECIPIENTS` recipients
        the built messages are kept and committed at once (group commit); a larger request
        keeps only counts from that pass and is built again and enqueued slice by slice in one
        transaction (:meth:`_accept_sliced`), so its memory is bounded by the slice.
        """
        prefix = "messages[{}]." if batch else ""
        built: list[NewMessage] | None = []
        total = 0
        for i, it in enumerate(items):
            msg = self.build_http_message(it, key, prefix.format(i))
            total += len(msg.recipients)
            if built is not None:
                built.append(msg)
                if total > SLICE_RECIPIENTS:
                    built = None  # large: keep nothing per recipient; built again slice by slice
            del msg
        cap = self.settings.api.max_recipients_per_request
        if total > cap:
            raise ValidationFailed(
                f"too many recipients in one request: {total} > {cap} ([api] max_recipients_per_request)",
                "messages" if batch else "to", 413,
            )
        if idempotency_key is not None and (
            not idempotency_key or len(idempotency_key) > IDEMPOTENCY_KEY_MAX or not idempotency_key.isprintable()
        ):
            raise ValidationFailed(
                f"Idempotency-Key must be 1-{IDEMPOTENCY_KEY_MAX} printable characters", "Idempotency-Key", 400
            )
        if built is None:
            return await self._accept_sliced(key, items, prefix, idempotency_key, request_body)
        messages = built
        await self.check_templates(items, messages, prefix)
        if idempotency_key is None:
            rows = await self.commit(messages)
            return Accepted(202, orjson.dumps(self._wrap(self._body(messages, rows), batch)))
        t0 = time.perf_counter()
        async with acquire(self.outbox.pool) as conn, conn.transaction():
            replay = await self._claim(conn, key, idempotency_key, request_body)
            if replay is not None:
                return replay
            rows = await self.outbox.enqueue(messages, conn=conn, suppress=self.suppressions is not None)
            body = orjson.dumps(self._wrap(self._body(messages, rows), batch))
            await self._store(conn, key, idempotency_key, body)
        _observe(messages, rows, t0)
        return Accepted(202, body)

    async def _accept_sliced(
        self, key: ApiKey, items: Sequence[MessageIn], prefix: str, idempotency_key: str | None, request_body: bytes
    ) -> Accepted:
        """Build and enqueue a large, already validated request about :data:`SLICE_RECIPIENTS` rows at a
        time, all in one transaction: accepted still means committed, and all or nothing.

        Each message is built again when its slice comes (only counts were kept from the
        validation pass); its row goes with its first recipients. Template pins are checked per
        slice: an upload between the passes that breaks one rolls everything back (a 422).
        """
        t0 = time.perf_counter()
        answer = _Answer()
        suppress = self.suppressions is not None
        async with acquire(self.outbox.pool) as conn, conn.transaction():
            if idempotency_key is not None:
                replay = await self._claim(conn, key, idempotency_key, request_body)
                if replay is not None:
                    return replay
            i = 0
            while i < len(items):
                first = i
                new: list[NewMessage] = []
                parts: list[tuple[NewMessage, Sequence[NewRecipient]]] = []
                room = SLICE_RECIPIENTS
                while i < len(items) and (not new or _mentions(items[i]) <= room):
                    msg = self.build_http_message(items[i], key, prefix.format(i))
                    new.append(msg)
                    room -= len(msg.recipients)
                    i += 1
                await self.check_templates(items[first:i], new, prefix, first)
                for msg in new:  # a message larger than a slice is spread over several statements
                    for start in range(0, max(len(msg.recipients), 1), SLICE_RECIPIENTS):
                        parts.append((msg, msg.recipients[start : start + SLICE_RECIPIENTS]))
                await self._enqueue_parts(conn, new, parts, answer, suppress)
            body = answer.finish()
            if idempotency_key is not None:
                await self._store(conn, key, idempotency_key, body)
        answer.observe(t0)
        return Accepted(202, body)

    async def _enqueue_parts(
        self, conn: asyncpg.Connection, messages: list[NewMessage],
        parts: list[tuple[NewMessage, Sequence[NewRecipient]]], answer: _Answer, suppress: bool,
    ) -> None:
        """Enqueue ``parts`` at most :data:`SLICE_RECIPIENTS` rows a statement, the messages' rows with the first."""
        pending = list(messages)
        batch: list[tuple[NewMessage, Sequence[NewRecipient]]] = []
        rows_in_batch = 0
        seen: set[uuid.UUID] = set()

        async def flush() -> None:
            nonlocal pending, batch, rows_in_batch
            if not batch:
                return
            rows = await self.outbox.enqueue_part(conn, pending, batch, suppress=suppress)
            for (msg, _), rs in zip(batch, rows):
                answer.add(msg, rs, msg.id not in seen)
                seen.add(msg.id)
            pending, batch, rows_in_batch = [], [], 0

        for msg, recipients in parts:
            if batch and rows_in_batch + len(recipients) > SLICE_RECIPIENTS:
                await flush()
            batch.append((msg, recipients))
            rows_in_batch += len(recipients)
        await flush()

    async def _claim(
        self, conn: asyncpg.Connection, key: ApiKey, idempotency_key: str, request_body: bytes
    ) -> Accepted | None:
        """Claim the Idempotency-Key inside ``conn``'s transaction; the first answer when it was used before."""
        request_hash = hashlib.sha256(request_body).digest()
        ttl = self.settings.api.idempotency_ttl
        await conn.execute(*q("idempotency_purge_one", api_key_id=key.id, key=idempotency_key, ttl=ttl))
        claimed = await conn.fetchval(
            *q("idempotency_claim", api_key_id=key.id, key=idempotency_key, request_hash=request_hash)
        )
        if claimed is None:
            return await self._replay(conn, key, idempotency_key, request_hash)
        return None

    @staticmethod
    async def _store(conn: asyncpg.Connection, key: ApiKey, idempotency_key: str, body: bytes) -> None:
        await conn.execute(
            *q("idempotency_store", api_key_id=key.id, key=idempotency_key, status_code=202, response=body.decode())
        )

    @staticmethod
    async def expire_idempotency_keys(conn: asyncpg.Connection, ttl: float) -> None:
        """Housekeeping: forget idempotency keys older than ``[api] idempotency_ttl``."""
        await conn.execute(*q("idempotency_expire", ttl=ttl))

    @staticmethod
    async def _replay(conn: asyncpg.Connection, key: ApiKey, idem: str, request_hash: bytes) -> Accepted:
        row = await conn.fetchrow(*q("idempotency_get", api_key_id=key.id, key=idem))
        if row is None or row["status_code"] == 0:  # pragma: no cover - the claim lock makes this unreachable
            raise IdempotencyConflict("a request with this Idempotency-Key is still in progress; retry shortly")
        if bytes(row["request_hash"]) != request_hash:
            raise IdempotencyConflict(
                "this Idempotency-Key was already used with a different request body; use a new key"
            )
        log.info("idempotent_replay", idempotency_key=idem)
        return Accepted(row["status_code"], row["response"].encode(), replayed=True)

    @staticmethod
    def _wrap(bodies: list[dict[str, Any]], batch: bool) -> dict[str, Any]:
        return {"messages": bodies} if batch else bodies[0]


async def erase_idempotency(conn: asyncpg.Connection, address: str) -> int:
    """Forget stored answers that list an erased address (their replay would name it)."""
    return len(await conn.fetch(*q("idempotency_erase", address=address)))
